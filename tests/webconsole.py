"""The web console in the test process: uvicorn on a free port in a thread, against the
test's database, and a logged-in HTTP client."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import psycopg
import uvicorn

from outbox.web import users
from outbox.web.app import create_app
from outbox.web.auth import LoginThrottle

PASSWORD = "correct horse battery"


@dataclass
class Console:
    url: str
    database_url: str
    throttle: LoginThrottle

    def user(self, name: str, role: str) -> str:
        """Create a user with PASSWORD; returns the name."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            users.add(conn, name, role, PASSWORD)
        return name

    def client(self, name: str | None = None, password: str = PASSWORD) -> httpx.Client:
        """An HTTP client with a session cookie, logged in as `name` when given."""
        client = httpx.Client(base_url=self.url, timeout=30, follow_redirects=False)
        page = client.get("/login")
        if name is not None:
            response = client.post(
                "/login", data={"csrf_token": csrf(page.text), "username": name, "password": password}
            )
            assert response.status_code == 303, response.text
        return client


def csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


@contextmanager
def serve(database_url: str) -> Iterator[Console]:
    throttle = LoginThrottle()
    app = create_app(database_url, secret="test secret", throttle=throttle, pool_size=4)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        ready = threading.Event()
        for _ in range(500):
            if server.started or not thread.is_alive():
                ready.set()
                break
            ready.wait(0.02)
        assert server.started, "the web console did not start"
        yield Console(f"http://127.0.0.1:{port}", database_url, throttle)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
