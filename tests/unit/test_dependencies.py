"""The private parts of dependencies this package still relies on, checked loudly: a release
that renames or reshapes one fails here, by name, rather than somewhere in delivery.
pyproject.toml bounds these dependencies below their next major version."""

from __future__ import annotations

import email.headerregistry
import email.policy
import importlib.metadata
import inspect

import aiosmtplib
import dramatiq
import dramatiq.worker

from outbox.core.message import POLICY, header_address


def major(dist: str) -> int:
    return int(importlib.metadata.version(dist).split(".")[0])


def test_dramatiq_worker_hooks_are_as_runner_overrides_them():
    """worker/runner.py `_Worker` overrides `_add_consumer(queue_name, *, delay)` (to start no
    delay-queue consumer) and `_add_worker()` (to give worker threads their own timeout)."""
    assert major("dramatiq") == 2
    params = inspect.signature(dramatiq.Worker._add_consumer).parameters
    assert list(params) == ["self", "queue_name", "delay"]
    assert params["delay"].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(inspect.signature(dramatiq.Worker._add_worker).parameters) == ["self"]
    hooks = inspect.getsource(dramatiq.worker._WorkerMiddleware)
    assert "_add_consumer(queue_name, delay=True)" in hooks
    assert "worker_timeout=self.worker_timeout" in inspect.getsource(dramatiq.Worker._add_worker)


def test_email_policy_fold_and_parse_tree_are_as_the_short_cut_needs():
    """outbox/core/message.py `_Policy._fold` overrides the stdlib's `EmailPolicy._fold(name,
    value, refold_binary)` and reads a header object's `_parse_tree`."""
    assert list(inspect.signature(email.policy.EmailPolicy._fold).parameters) == [
        "self",
        "name",
        "value",
        "refold_binary",
    ]
    subject = POLICY.header_factory("Subject", "hello")
    assert subject._parse_tree is not None and str(subject._parse_tree) == "hello"
    address = POLICY.header_factory("To", header_address("ann@example.org"))
    assert str(address._parse_tree) == "ann@example.org"
    assert POLICY.fold("Subject", subject) == "Subject: hello\r\n"
    assert email.policy.SMTP.fold("Subject", email.headerregistry.HeaderRegistry()("Subject", "hello")) == (
        "Subject: hello\r\n"
    )


def test_aiosmtplib_is_used_through_its_public_api_only():
    """The transport uses aiosmtplib to connect, greet, secure and authenticate; transactions
    are its own (worker/replies.py takes the transport over through asyncio's set_protocol)."""
    assert major("aiosmtplib") == 5
    for name in ("connect", "ehlo", "starttls", "login", "supports_extension", "get_transport_info", "close"):
        assert callable(getattr(aiosmtplib.SMTP, name)), name
    assert isinstance(inspect.getattr_static(aiosmtplib.SMTP, "is_connected"), property)


def test_the_plain_address_short_cut_knows_email_validators_special_use_names():
    """outbox/core/message.py decides common addresses without email-validator, refusing its
    special-use domains itself (tests/unit/test_message.py compares the two on many more)."""
    import email_validator

    from outbox.core import message

    assert set(message._SPECIAL_USE) == set(email_validator.SPECIAL_USE_DOMAIN_NAMES)
