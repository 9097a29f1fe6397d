"""Errors a caller or operator can act on. Each carries one clear line of text."""


class OutboxError(Exception):
    """Base class: a user's mistake or a refused operation, shown without a traceback."""


class ValidationError(OutboxError, ValueError):
    """Bad input to `enqueue` or the CLI; nothing was written."""


class ConflictError(ValidationError):
    """Refused because of what exists already (a name or address taken); exit 1, not 2."""


class NotFoundError(OutboxError, LookupError):
    """A message or connector that does not exist."""


class ConfigurationError(OutboxError):
    """A connector or setting that cannot work as configured."""
