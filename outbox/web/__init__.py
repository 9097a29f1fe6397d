"""The operators' web console (`outbox web`): the Outbox, Sent Items, one message, connectors
and the audit in a browser, for users managed with `outbox user …`.

Modules: `users` (accounts and password hashes), `auth` (sessions, CSRF, login throttling,
roles, security headers), `lists` (the filtered, keyset-paginated lists), `pages` (what is
read), `actions` (what changes, through `outbox.operations` and `outbox.connectors`), `app`
(routes and serving). Importing this package imports no web framework.
"""
