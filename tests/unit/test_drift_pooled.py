"""Drift counts pooled across replicas: each replica's sealed epochs, published once through
the pooled snapshot encoding and summed per epoch, give exactly the window (and so the
report) of one process that saw every row."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.drift.profile import Profile
from gateway.store import decode_counts, encode_counts, sum_counts
from gateway.store.pooled import Counts
from tests.unit.test_drift_monitor import (
    CANARY,
    N_FEATURES,
    STABLE,
    feed,
    make_monitor,
    profile,  # noqa: F401  # the fixture
)

REPLICAS = 3
EPOCHS = 4


def test_pooled_epochs_merge_exactly(profile: Profile) -> None:  # noqa: F811
    one, one_clock = make_monitor(profile)
    fleet = [make_monitor(profile) for _ in range(REPLICAS)]
    rng = np.random.default_rng(11)
    published: dict[int, dict[int, bytes]] = {}  # epoch -> replica -> payload
    sent = [-(10**9)] * REPLICAS  # each replica's newest epoch published
    for epoch in range(EPOCHS):
        # Rows spread unevenly; the shifted ones land on replica 1 only.
        for i, (monitor, _) in enumerate(fleet):
            x = rng.standard_normal((200 * (i + 1), N_FEATURES)).astype(np.float32)
            if i == 1 and epoch >= 2:
                x[:, 3] += 1.5
            feed(monitor, STABLE, x, batch=50)
            feed(one, STABLE, x, batch=50)
        for i, (monitor, clock) in enumerate(fleet):
            clock.advance(1)
            monitor.tick()
            phash, epochs = monitor.export_since(STABLE, sent[i])
            for e, counts in epochs:
                assert i not in published.get(e, {})  # each sealed epoch is published once
                published.setdefault(e, {})[i] = encode_counts(counts, profile_hash=phash)
                sent[i] = e
        one_clock.advance(1)
        one.tick()
    for monitor, clock in (*fleet, (one, one_clock)):
        clock.advance(2)
        monitor.tick()
    for i, (monitor, _) in enumerate(fleet):
        phash, epochs = monitor.export_since(STABLE, sent[i])
        for e, counts in epochs:
            published.setdefault(e, {})[i] = encode_counts(counts, profile_hash=phash)

    # The leader's merge: per epoch over replicas, then over the window's epochs.
    sealed, window_epochs, _ = one.epochs()
    per_epoch: list[Counts] = []
    for e in range(sealed - window_epochs + 1, sealed + 1):
        parts = [decode_counts(p) for p in published.get(e, {}).values()]
        assert all(h == profile.hash for _, h, _ in parts)
        per_epoch.append(sum_counts([c for c, _, _ in parts]))
    pooled = sum_counts(per_epoch)

    _, single = one.export_since(STABLE, -(10**9))
    expected = sum_counts([c for _, c in single])
    assert pooled.keys() == expected.keys()
    for key in expected:
        assert pooled[key].dtype == np.int64
        assert np.array_equal(pooled[key], expected[key]), key

    window_s = one.window_s(STABLE)
    assert one.report_counts(STABLE, pooled, window_s) == one.report(STABLE)
    alone = fleet[0][0].report(STABLE)  # replica 0 never saw the shift
    merged = one.report_counts(STABLE, pooled, window_s)
    assert (merged.inputs[0].name, merged.inputs[0].verdict) == ("f3", "drift")
    assert next(f for f in alone.inputs if f.name == "f3").verdict != "drift"


def test_compare_counts_refuses_other_profiles(profile: Profile) -> None:  # noqa: F811
    monitor, _ = make_monitor(profile)
    with pytest.raises(KeyError):
        monitor.compare_counts(STABLE, CANARY, {}, {}, 1.0)
    assert monitor.profiled() == [STABLE]
