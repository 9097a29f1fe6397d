"""outbox.resolve: which connector sends a message (DESIGN.md, "Connector resolution").

Pure: connectors are built directly, no database.
"""

from __future__ import annotations

import itertools

import pytest

from outbox.core.resolve import Connector, resolve

_ids = itertools.count(1)


def connector(
    name: str,
    address: str,
    *aliases: str,
    direction: str = "outgoing",
    enabled: bool = True,
    gateway: bool = False,
) -> Connector:
    return Connector(
        id=next(_ids),
        name=name,
        direction=direction,
        address=address,
        aliases=aliases,
        host=f"smtp.{name}.example",
        port=587,
        security="starttls",
        username=None if direction == "both" else f"{name}-user",
        password_env=None,
        password_enc=None,
        ca_file=None,
        enabled=enabled,
        is_default_gateway=gateway,
    )


def gateway(*, enabled: bool = True) -> Connector:
    return connector("gateway", "relay@corp.example", enabled=enabled, gateway=True)


SALES = connector("sales", "sales@corp.example", "orders@corp.example", "Billing@Corp.Example")


# -- rule 1 and 2: a match on an outbound connector -------------------------------------------


@pytest.mark.parametrize(
    "from_addr",
    [
        "sales@corp.example",
        "SALES@Corp.EXAMPLE",
        "orders@corp.example",
        "Orders@CORP.example",
        "billing@corp.example",
    ],
)
def test_from_matching_primary_address_or_alias_sends_through_that_connector(from_addr):
    route = resolve(from_addr, [gateway(), SALES])
    assert (route.action, route.connector) == ("send", SALES)


def test_the_matching_connector_is_chosen_among_several():
    support = connector("support", "support@corp.example", "help@corp.example")
    connectors = [gateway(), SALES, support]
    assert resolve("help@corp.example", connectors).connector == support
    assert resolve("orders@corp.example", connectors).connector == SALES


def test_both_connector_sends():
    shared = connector("shared", "team@corp.example", direction="both")
    route = resolve("team@corp.example", [gateway(), shared])
    assert (route.action, route.connector) == ("send", shared)


def test_incoming_connector_never_sends_even_when_the_address_matches():
    inbox = connector("inbox", "sales@corp.example", "orders@corp.example", direction="incoming")
    gw = gateway()
    for from_addr in ("sales@corp.example", "orders@corp.example"):
        route = resolve(from_addr, [inbox, gw])
        assert (route.action, route.connector) == ("send", gw)


def test_incoming_connector_alone_is_no_route():
    inbox = connector("inbox", "sales@corp.example", direction="incoming")
    route = resolve("sales@corp.example", [inbox])
    assert (route.action, route.connector) == ("fail", None)


def test_disabled_incoming_connector_does_not_hold():
    inbox = connector("inbox", "sales@corp.example", direction="incoming", enabled=False)
    assert resolve("sales@corp.example", [inbox, gateway()]).action == "send"


@pytest.mark.parametrize("from_addr", ["sales@corp.example", "Orders@Corp.Example"])
def test_match_on_a_disabled_connector_holds_and_never_uses_another(from_addr):
    disabled = connector("sales", "sales@corp.example", "orders@corp.example", enabled=False)
    other = connector("other", "other@corp.example")
    route = resolve(from_addr, [gateway(), other, disabled])
    assert route.action == "hold"
    assert route.connector == disabled
    assert "sales" in route.reason and "disabled" in route.reason


def test_held_message_stays_held_without_any_gateway():
    disabled = connector("sales", "sales@corp.example", enabled=False)
    assert resolve("sales@corp.example", [disabled]).action == "hold"


# -- rule 3 and 4: no match ---------------------------------------------------------------------


def test_no_match_sends_through_the_enabled_default_gateway():
    gw = gateway()
    route = resolve("someone@elsewhere.example", [SALES, gw])
    assert (route.action, route.connector) == ("send", gw)


def test_gateway_relays_for_its_own_address_too():
    gw = gateway()
    assert resolve("relay@corp.example", [SALES, gw]).connector == gw


def test_no_match_and_no_gateway_fails_naming_the_address():
    route = resolve("someone@elsewhere.example", [SALES])
    assert (route.action, route.connector) == ("fail", None)
    assert "someone@elsewhere.example" in route.reason
    assert "Default Gateway" in route.reason


def test_no_connectors_at_all_fails():
    route = resolve("someone@elsewhere.example", [])
    assert (route.action, route.connector) == ("fail", None)
    assert "someone@elsewhere.example" in route.reason


def test_no_match_and_a_disabled_gateway_fails():
    route = resolve("someone@elsewhere.example", [SALES, gateway(enabled=False)])
    assert (route.action, route.connector) == ("fail", None)
    assert "someone@elsewhere.example" in route.reason
    assert "disabled" in route.reason


def test_an_incoming_gateway_is_no_gateway():
    gw = connector("gateway", "relay@corp.example", direction="incoming", gateway=True)
    assert resolve("someone@elsewhere.example", [gw]).action == "fail"


def test_resolution_does_not_depend_on_connector_order():
    connectors = [
        gateway(),
        SALES,
        connector("inbox", "inbox@corp.example", direction="incoming"),
        connector("old", "old@corp.example", enabled=False),
    ]
    for from_addr in ("sales@corp.example", "inbox@corp.example", "old@corp.example", "x@y.example"):
        routes = {
            (r.action, r.connector.name if r.connector else None)
            for r in (resolve(from_addr, order) for order in itertools.permutations(connectors))
        }
        assert len(routes) == 1, (from_addr, routes)
