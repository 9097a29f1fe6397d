"""OAuth 2.0 peers for tests: a real HTTPS token endpoint (client-credentials grant, in a
thread, with a trustme certificate) and an SMTP server that offers only AUTH XOAUTH2 and
checks each bearer token with the endpoint that issued it."""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from tests.smtp import Recorder, Server, free_port


@dataclass
class Issued:
    token: str
    expires_at: float
    revoked: bool = False


@dataclass
class TokenEndpoint:
    """`POST /token` with grant_type=client_credentials. `answer`: "ok", "invalid_client"
    (400, OAuth error JSON that echoes the secret it was given, as a careless server might),
    or "401" (HTTP 401, no JSON). `revoke_first`/`revoke_all`: tokens issued already revoked
    (the SMTP server refuses them)."""

    client_id: str
    client_secret: str
    tls: ssl.SSLContext
    expires_in: int = 3600
    answer: str = "ok"
    revoke_first: bool = False
    revoke_all: bool = False
    port: int = 0
    issued: list[Issued] = field(default_factory=list)
    requests: list[dict[str, list[str]]] = field(default_factory=list)
    _httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/token"

    @property
    def fetches(self) -> int:
        return len(self.issued)

    def start(self) -> TokenEndpoint:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                form = parse_qs(self.rfile.read(length).decode())
                endpoint.requests.append(form)
                status, body = endpoint.respond(form)
                data = json.dumps(body).encode() if body is not None else b"Unauthorized"
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if body is not None else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.port = self.port or free_port()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.socket = self.tls.wrap_socket(self._httpd.socket, server_side=True)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def respond(self, form: dict[str, list[str]]) -> tuple[int, dict[str, Any] | None]:
        given = form.get("client_secret", [""])[0]
        if self.answer == "401":
            return 401, None
        if (
            self.answer == "invalid_client"
            or form.get("client_id") != [self.client_id]
            or given != self.client_secret
        ):
            return 400, {
                "error": "invalid_client",
                "error_description": f"AADSTS7000215: Invalid client secret provided: {given}",
            }
        if form.get("grant_type") != ["client_credentials"]:
            return 400, {"error": "unsupported_grant_type"}
        token = "at-" + secrets.token_urlsafe(24)
        revoked = self.revoke_all or (self.revoke_first and not self.issued)
        self.issued.append(Issued(token, time.time() + self.expires_in, revoked))
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in}

    def valid(self, token: str) -> bool:
        return any(i.token == token and not i.revoked and time.time() < i.expires_at for i in self.issued)

    def expired(self, token: str) -> bool:
        return any(i.token == token and time.time() >= i.expires_at for i in self.issued)


class XOAuth2Recorder(Recorder):
    """Offers AUTH XOAUTH2 only; accepts a token its endpoint issued, unexpired and unrevoked,
    for `mailbox`. A session whose token has expired is closed at the next MAIL (421), so the
    client must log in again."""

    endpoint: TokenEndpoint
    mailbox: str

    def __init__(self) -> None:
        super().__init__()
        self.presented: list[str] = []  # every token offered, in order
        self.refused = 0
        self.blobs: list[bytes] = []  # the raw AUTH arguments (to look for in leaks)

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> AuthResult:
        blob = args[1] if len(args) > 1 else await server.challenge_auth("", encode_to_b64=False)
        self.blobs.append(blob.encode() if isinstance(blob, str) else blob)
        fields = dict(
            part.split("=", 1) for part in base64.b64decode(blob).decode().split("\x01") if "=" in part
        )
        token = fields.get("auth", "").removeprefix("Bearer ")
        self.presented.append(token)
        if fields.get("user") == self.mailbox and self.endpoint.valid(token):
            server.session.token = token
            return AuthResult(success=True, auth_data=fields["user"])
        self.refused += 1
        # as Gmail and Exchange do: a 334 with a JSON error, the client's empty line, then 535
        await server.challenge_auth(json.dumps({"status": "401", "schemes": "bearer"}))
        return AuthResult(success=False, handled=False, message="535 5.7.3 Authentication unsuccessful")

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.endpoint.expired(getattr(session, "token", "")):
            return "421 4.7.0 token expired, closing the session"
        return await super().handle_MAIL(server, session, envelope, address, options)


def start_xoauth2_server(
    endpoint: TokenEndpoint, mailbox: str, tls: ssl.SSLContext, port: int | None = None
) -> Server:
    """STARTTLS required, then AUTH XOAUTH2 (no PLAIN or LOGIN) before MAIL."""
    recorder = XOAuth2Recorder()
    recorder.name, recorder.endpoint, recorder.mailbox = "xoauth2", endpoint, mailbox
    port = port or free_port()
    controller = Controller(
        recorder,
        hostname="localhost",
        port=port,
        server_hostname="localhost",
        decode_data=False,
        tls_context=tls,
        require_starttls=True,
        auth_require_tls=True,
        auth_required=True,
        auth_exclude_mechanism=["LOGIN", "PLAIN"],
    )
    controller.start()
    return Server(controller, recorder, port)
