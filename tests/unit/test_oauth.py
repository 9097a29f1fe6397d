"""Which AUTH refusals mean "this server wants OAuth", and the phases an oauth2 connector adds."""

from __future__ import annotations

import pytest

from outbox.core.policy import Verdict, classify, is_connector_problem
from worker.oauth import basic_auth_refused


@pytest.mark.parametrize(
    "reply, wants_oauth",
    [
        ("5.7.30 Basic authentication is not supported for Client Submission.", True),
        ("5.7.139 Authentication unsuccessful, basic authentication is disabled.", True),
        ("5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.", False),
        ("5.7.8 Username and Password not accepted.", False),
        ("5.7.3 Authentication unsuccessful", False),
    ],
)
def test_basic_auth_refusals(reply, wants_oauth):
    assert basic_auth_refused(reply) is wants_oauth


@pytest.mark.parametrize("code", [None, 400, 401, 535])
def test_a_token_step_failure_is_the_connectors_problem(code):
    assert classify("token", code) is Verdict.TRANSIENT
    assert is_connector_problem("token", {"a@example.org": Verdict.TRANSIENT})
