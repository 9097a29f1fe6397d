"""OAuth 2.0 access tokens for `oauth2` connectors (AUTH XOAUTH2).

The client-credentials grant is made by Authlib's httpx2 client (request, client
authentication, token response and its errors); this module only decides when to ask. Tokens
live in this process's memory, one source per connector pool: cached until shortly before they
expire, fetched once for all the sends waiting on them, and fetched anew once when the SMTP
server refuses one. They are never written anywhere.

The token endpoint's certificate is verified against the default trust store (OpenSSL's, which
$SSL_CERT_FILE / $SSL_CERT_DIR replace); a connector's `--ca-file` is for its SMTP server only.
A failure to get a token is the connector's problem, like a failure to log in (`TokenError`,
raised in the phases "token" or "auth").
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from outbox.core.connector_rules import oauth_scopes, token_url
from outbox.core.resolve import Connector
from outbox.store.secrets import client_secret_for

# A token is renewed this long before it expires (or halfway through a shorter life).
REFRESH_MARGIN_SECONDS = 60.0
# A token response without `expires_in` is used at most this long (or until refused).
DEFAULT_LIFETIME_SECONDS = 3600.0
# A refusal of a password naming Basic authentication (Exchange Online: "550 5.7.30 Basic
# authentication is not supported for Client Submission", "535 5.7.139 ... basic
# authentication is disabled"): the server wants OAuth.
_BASIC_AUTH_REFUSED = re.compile(r"5\.7\.30|\bbasic auth", re.IGNORECASE)


class TokenError(Exception):
    """No access token: the endpoint is unreachable, or refused the client (a connector problem)."""


@dataclass(frozen=True)
class _Token:
    value: str
    fresh_until: float  # time.time()


def trust() -> ssl.SSLContext:
    """The token endpoint's TLS: the default trust store, TLS 1.2 at least."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class TokenSource:
    """Access tokens of one connector for one process (owned by its connector pool)."""

    def __init__(self, connector: Connector, *, timeout: float) -> None:
        self.connector = connector
        self.timeout = timeout
        self.fetches = 0
        self._token: _Token | None = None
        self._lock = asyncio.Lock()

    @property
    def endpoint(self) -> str:
        return urlsplit(token_url(self.connector) or "").netloc

    async def get(self, *, refused: str | None = None) -> str:
        """A token to log in with: the cached one while it is fresh, else a new one, fetched
        once for every caller waiting here. `refused`: the token the server just refused;
        a caller that finds it already replaced uses the replacement."""
        async with self._lock:
            token = self._token
            if token is not None and token.value != refused and time.time() < token.fresh_until:
                return token.value
            self._token = None
            self._token = await self._fetch()
            return self._token.value

    async def _fetch(self) -> _Token:
        c = self.connector
        secret = client_secret_for(c)  # ConfigurationError when it cannot be read here
        url = token_url(c)
        assert url is not None and secret is not None
        self.fetches += 1
        scope = " ".join(oauth_scopes(c)) or None
        # Imported here: Authlib and httpx2 take ~80 ms to import, a cost only processes that
        # send through an oauth2 connector should pay (start-up matters for `run --until-idle`).
        import httpx2
        from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError

        try:
            async with AsyncOAuth2Client(
                client_id=c.oauth_client_id,
                client_secret=secret,
                token_endpoint_auth_method="client_secret_post",
                scope=scope,
                timeout=self.timeout,
                verify=trust(),
            ) as client:
                token = await client.fetch_token(url, grant_type="client_credentials")
        except OAuthError as exc:  # an OAuth error response: invalid_client, unauthorized_client, …
            why = f"{exc.error}: {exc.description}" if exc.description else exc.error
            raise TokenError(
                self._scrub(f"token endpoint {self.endpoint} refused the client: {why}", secret)
            ) from None
        except httpx2.HTTPStatusError as exc:
            raise TokenError(
                f"token endpoint {self.endpoint} answered HTTP {exc.response.status_code} "
                f"{exc.response.reason_phrase}"
            ) from None
        except (httpx2.HTTPError, ssl.SSLError, OSError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise TokenError(
                self._scrub(f"token endpoint {self.endpoint} unreachable: {why}", secret)
            ) from None
        except ValueError as exc:  # not a JSON object
            raise TokenError(f"token endpoint {self.endpoint}: {exc}") from None
        access = token.get("access_token")
        if not isinstance(access, str) or not access:
            raise TokenError(f"token endpoint {self.endpoint} answered without an access_token")
        now = time.time()
        expires_at = token.get("expires_at")
        life = float(expires_at) - now if isinstance(expires_at, int) else DEFAULT_LIFETIME_SECONDS
        return _Token(access, now + max(life - REFRESH_MARGIN_SECONDS, life / 2))

    @staticmethod
    def _scrub(text: str, secret: str) -> str:
        """One line, at most 500 characters, without the secret (should a server echo it)."""
        return " ".join(text.replace(secret, "[client secret]").split())[:500]


def basic_auth_refused(reply: str) -> bool:
    """True when an AUTH refusal says the server takes no password (Basic authentication)."""
    return bool(_BASIC_AUTH_REFUSED.search(reply))


def oauth_hint(connector: Connector) -> str:
    """How to move a password connector whose server wants OAuth 2.0."""
    return (
        f"the server requires OAuth 2.0 (XOAUTH2): switch with `outbox connector update "
        f"{connector.name} --auth oauth2 --oauth-client-id ID --oauth-tenant TENANT "
        f"--oauth-client-secret-stdin` (or --oauth-token-url URL --oauth-scope S)"
    )
