"""Pure rules derived from a connector's settings: the TLS mode it gets, and the OAuth token
endpoint and scopes it asks for. Used by the worker that sends and the admin side that shows
them."""

from __future__ import annotations

from outbox.core.resolve import Connector

# `--oauth-tenant T`: Microsoft Entra ID's token endpoint for that tenant, and the scope that
# covers SMTP AUTH (client credentials ask for an app's permissions with `.default`).
ENTRA_TOKEN_URL = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
ENTRA_SMTP_SCOPE = "https://outlook.office365.com/.default"


def effective_security(connector: Connector) -> str:
    """`tls`, `starttls` (required), `opportunistic` (STARTTLS when offered) or `none`."""
    if connector.security != "auto":
        return connector.security
    if connector.port == 465:
        return "tls"
    if connector.port == 587 or connector.has_credentials:
        return "starttls"
    return "opportunistic"


def token_url(connector: Connector) -> str | None:
    """The token endpoint of an `oauth2` connector (Entra ID's, from its tenant, or its URL)."""
    if connector.oauth_tenant:
        return ENTRA_TOKEN_URL.format(tenant=connector.oauth_tenant)
    return connector.oauth_token_url


def oauth_scopes(connector: Connector) -> tuple[str, ...]:
    """The scopes asked for: the connector's own, or Exchange Online's for a tenant."""
    if connector.oauth_scopes:
        return connector.oauth_scopes
    return (ENTRA_SMTP_SCOPE,) if connector.oauth_tenant else ()
