"""Traffic splitting: weights, sticky keys, minimal movement, validation."""

from __future__ import annotations

import asyncio
import collections

import pytest
from scipy import stats

from gateway.errors import InvalidInputError, ModelNotFoundError
from gateway.router import Router, sticky_choice
from gateway.types import InferRequest, Route, ShadowTarget, Variant

WEIGHTS = (Variant("1", 70), Variant("2", 20), Variant("3", 10))


def _chi2_pvalue(counts: collections.Counter[str], weights: tuple[Variant, ...]) -> float:
    total = sum(counts.values())
    scale = total / sum(v.weight for v in weights)
    observed = [counts[v.version] for v in weights]
    expected = [v.weight * scale for v in weights]
    return float(stats.chisquare(observed, expected).pvalue)


def test_random_split_matches_weights() -> None:
    router = Router(seed=1234)
    router.set_route(Route("m", WEIGHTS))
    counts = collections.Counter(router.choose("m") for _ in range(20_000))
    assert _chi2_pvalue(counts, WEIGHTS) > 0.001


def test_sticky_split_matches_weights_and_is_stable() -> None:
    router = Router(seed=1)
    router.set_route(Route("m", WEIGHTS))
    keys = [f"user-{i}" for i in range(20_000)]
    first = [router.choose("m", k) for k in keys]
    assert _chi2_pvalue(collections.Counter(first), WEIGHTS) > 0.001
    other = Router(seed=99)  # another replica, another process: same answers
    other.set_route(Route("m", WEIGHTS))
    assert [other.choose("m", k) for k in keys] == first


def test_raising_a_weight_moves_only_the_keys_that_must_move() -> None:
    keys = [f"k{i}" for i in range(20_000)]
    before = [sticky_choice(k, "m", (Variant("1", 90), Variant("2", 10))) for k in keys]
    after = [sticky_choice(k, "m", (Variant("1", 80), Variant("2", 20))) for k in keys]
    moved = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert 0.08 < len(moved) / len(keys) < 0.12
    assert all(b == "2" for _, b in moved)  # keys only move onto the raised variant


def test_zero_weight_variant_gets_nothing() -> None:
    router = Router(seed=0)
    router.set_route(Route("m", (Variant("1", 1), Variant("2", 0))))
    assert {router.choose("m") for _ in range(500)} == {"1"}
    assert {router.choose("m", f"k{i}") for i in range(500)} == {"1"}


def test_set_weights_keeps_shadows_and_validates() -> None:
    router = Router()
    router.set_route(Route("m", (Variant("1", 1),), (ShadowTarget("2", 0.5),)))
    route = router.set_weights("m", {"1": 50, "2": 50})
    assert route.shadows == (ShadowTarget("2", 0.5),)
    with pytest.raises(InvalidInputError, match="must not all be 0"):
        router.set_weights("m", {"1": 0})
    with pytest.raises(InvalidInputError, match=">= 0"):
        router.set_weights("m", {"1": -1})
    with pytest.raises(InvalidInputError, match="sample_rate"):
        router.set_route(Route("m", (Variant("1", 1),), (ShadowTarget("2", 2.0),)))
    assert router.get_route("m") == route


def test_a_routed_request_to_a_version_not_loaded_counts_as_its_error() -> None:
    router = Router(seed=0)
    router.set_route(Route("m", (Variant("9", 1),)))
    with pytest.raises(ModelNotFoundError):
        asyncio.run(router.infer(InferRequest("m", "", [])))
    (snap,) = router.traffic("m")
    assert (snap.version, snap.requests, snap.errors) == ("9", 1, 1)
    # A request that names the version itself is the client's mistake: not counted.
    with pytest.raises(ModelNotFoundError):
        asyncio.run(router.infer(InferRequest("m", "8", [])))
    assert [s.version for s in router.traffic("m")] == ["9"]
