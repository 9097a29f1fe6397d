"""The decision core: the message model and its validation, the connector rules of
resolution, the retry policy, the statuses and the settings model. Pure: no database, broker,
network or clock of its own; both sides (`outbox.store`/`outbox.admin` and `worker`) build
on it, and it imports neither (tests/unit/test_layers.py).
"""
