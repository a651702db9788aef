"""Sequential rollout tests: error control under continuous monitoring, speed of rollback,
agreement of the incremental, pooled and path forms, and checks against scipy (tests only).

The A/A simulations check the e-process after every observation (every request of either
arm), which is what "valid under continuous monitoring" has to survive.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from scipy import stats as sps

from gateway.rollout.sequential import (
    DEFAULT_FALSE_ROLLBACK_RATE,
    BernoulliCounts,
    MeanMoments,
    MeanTest,
    ProportionTest,
    exceedances,
    mean_samples_needed,
    proportion_samples_needed,
    split_alpha,
    step_deadline_s,
)

Bools = npt.NDArray[np.bool_]


def _aa_rollbacks(
    tests: tuple[ProportionTest, ...], share: float, *, runs: int, horizon: int, seed: int
) -> tuple[int, float]:
    """A/A rollouts rolled back by any of ``tests`` (each on its own event stream, both arms
    at a 1% event rate) within ``horizon`` candidate requests, checked after every request;
    and the largest log e-value any run reached, in units of its test's log(1/alpha)."""
    rng = np.random.default_rng(seed)
    length = int(horizon / share * 1.1)
    rejected, worst, chunk = 0, 0.0, 5  # small chunks stay in cache: 3x faster
    for _ in range(0, runs, chunk):
        is_candidate: Bools = rng.random((chunk, length)) < share
        within = np.cumsum(is_candidate, axis=1) <= horizon
        any_rejects = np.zeros(chunk, dtype=bool)
        for test in tests:
            is_event: Bools = rng.random((chunk, length)) < 0.01
            path = test.log_e_path(is_candidate, is_event)
            best = np.where(within, path, -np.inf).max(axis=1) / math.log(1 / test.alpha)
            any_rejects |= best >= 1.0
            worst = max(worst, float(best.max()))
        rejected += int(any_rejects.sum())
    return rejected, worst


@pytest.mark.parametrize("share", [0.05, 0.5])
def test_default_tests_roll_back_at_most_one_percent_of_aa_rollouts(share: float) -> None:
    # The default pair, error rate and latency exceedance (each at half the 1% budget), on
    # 1,000 identical candidates (1% errors, 1% slow requests on both arms), 2,000 candidate
    # requests each, checked after every request. Ville's inequality bounds the rate at 1%
    # for any horizon. Measured (seed 7): 0/1000 at 5% and at 50%; the largest e-value any
    # run reached was 200^0.39 ~ 8 (5%) and 200^0.14 ~ 2 (50%), against 200 to reject.
    defaults = (ProportionTest(name="error_rate"), ProportionTest(name="latency"))
    assert sum(t.alpha for t in defaults) == DEFAULT_FALSE_ROLLBACK_RATE
    rejected, worst = _aa_rollbacks(defaults, share, runs=1000, horizon=2000, seed=7)
    assert rejected <= 10, f"{rejected}/1000 A/A rollouts rolled back at {share:.0%}"
    assert worst < 1.0


def test_error_test_alone_at_the_whole_budget_on_aa_rollouts() -> None:
    # The bound does not lean on splitting: the error test alone at alpha 0.01 (50% split).
    # Measured (seed 8): 0/1000, the largest e-value 100^0.52 ~ 11 against 100.
    test = ProportionTest(alpha=DEFAULT_FALSE_ROLLBACK_RATE)
    rejected, worst = _aa_rollbacks((test,), 0.5, runs=1000, horizon=2000, seed=8)
    assert rejected <= 10
    assert worst < 1.0


def test_aa_through_steps_with_a_shared_outage_needs_per_step_windows() -> None:
    # The split moves 5% -> 25% -> 50% (4,000 requests per step) and an outage shared by
    # both arms (50% errors for 1,000 requests) strikes at a random time. Pooled over the
    # whole rollout, the arms' counts are confounded (Simpson): an outage during the 50%
    # step hits a larger part of the candidate's requests than of the stable arm's, and an
    # identical candidate looks worse. Per-step windows (one split each) with the budget
    # split over the steps keep the rate below alpha. Measured (seed 13, 400 runs): pooled
    # 266 rolled back; per step 0, the largest e-value 300^0.32 ~ 6 against 300.
    alpha, steps = DEFAULT_FALSE_ROLLBACK_RATE, 3
    pooled_test = ProportionTest(alpha=alpha)
    step_test = ProportionTest(alpha=split_alpha(alpha, steps))
    rng = np.random.default_rng(13)
    per_step = 4000
    shares = np.repeat([0.05, 0.25, 0.5], per_step)
    length = shares.size
    at = np.arange(length)
    pooled_rejected, step_rejected, worst = 0, 0, 0.0
    for _ in range(0, 400, 20):
        is_candidate = rng.random((20, length)) < shares
        start = rng.integers(0, length - 1000, size=(20, 1))
        rate = np.where((at >= start) & (at < start + 1000), 0.5, 0.01)
        is_error = rng.random((20, length)) < rate
        pooled = pooled_test.log_e_path(is_candidate, is_error).max(axis=1)
        pooled_rejected += int((pooled >= math.log(1 / alpha)).sum())
        best = np.max(
            [
                step_test.log_e_path(is_candidate[:, w], is_error[:, w]).max(axis=1)
                for w in (slice(i, i + per_step) for i in range(0, length, per_step))
            ],
            axis=0,
        )
        step_rejected += int((best >= math.log(1 / step_test.alpha)).sum())
        worst = max(worst, float(best.max()) / math.log(1 / step_test.alpha))
    assert pooled_rejected > 40, "pooling across steps should show the confounding"
    assert step_rejected <= 4
    assert worst < 1.0


def _first_reject(
    test: ProportionTest, share: float, stable_rate: float, seed: int, *, smooth: bool
) -> int:
    """Candidate requests (all failing) seen when the test first rejects, checking after
    every request of either arm, the stable arm failing at ``stable_rate``. ``smooth``:
    the arms interleave evenly (a weighted round robin); otherwise each request picks the
    candidate at random with probability ``share`` (hash routing)."""
    rng = np.random.default_rng(seed)
    cand, stab = BernoulliCounts(), BernoulliCounts()
    for i in range(100_000):
        to_candidate = (
            math.floor((i + 1) * share) > math.floor(i * share) if smooth else rng.random() < share
        )
        if to_candidate:
            cand = cand.update(True)
        else:
            stab = stab.update(bool(rng.random() < stable_rate))
        if test.evaluate(cand, stab).verdict == "reject":
            return cand.trials
    raise AssertionError("never rejected")


@pytest.mark.parametrize("share", [0.05, 0.5])
@pytest.mark.parametrize("stable_rate", [0.0, 0.01])
def test_candidate_failing_every_request_rejected_within_ten(
    share: float, stable_rate: float
) -> None:
    test = ProportionTest()  # the default: half the 1% budget
    needed = [_first_reject(test, share, stable_rate, seed, smooth=True) for seed in range(100)]
    assert max(needed) <= 10, sorted(needed)[-5:]


@pytest.mark.parametrize("share", [0.05, 0.5])
def test_candidate_failing_every_request_under_random_routing(share: float) -> None:
    # With random routing the stable arm may lag: the test cannot call the candidate worse
    # before the stable arm has been seen (10 failures against 3 stable successes is p 0.0035
    # even for Fisher's exact test). Measured over 300 seeds at a 1% stable error rate:
    # 5%: median 3, max 4; 50%: median 6, 95th percentile 10, max 17.
    test = ProportionTest()
    needed = np.array([_first_reject(test, share, 0.01, seed, smooth=False) for seed in range(200)])
    assert np.median(needed) <= 6
    assert np.quantile(needed, 0.95) <= 10


@pytest.mark.parametrize(
    ("share", "stable_errors", "needed"),
    [(0.05, 0, 3), (0.05, 1, 3), (0.05, 2, 4), (0.5, 0, 6), (0.5, 1, 9), (0.5, 2, 10)],
)
def test_failing_candidate_needs_few_requests_even_after_stable_errors(
    share: float, stable_errors: int, needed: int
) -> None:
    # Deterministic interleaving: the stable arm's errors come first (the worst case).
    test = ProportionTest()
    per_candidate = round((1 - share) / share)
    for k in range(1, 11):
        stable_n = per_candidate * k
        verdict = test.evaluate(
            BernoulliCounts(k, k), BernoulliCounts(stable_n, min(stable_errors, stable_n))
        ).verdict
        if verdict == "reject":
            assert k == needed
            return
    raise AssertionError("not rejected within 10 candidate requests")


def test_accuracy_worse_candidate_rejected_near_the_expected_truths() -> None:
    # Accuracy 0.80 against 0.90 at a 50% split; truths checked one by one.
    test = ProportionTest(name="accuracy")
    rng = np.random.default_rng(3)
    runs, length = 200, 6000
    is_candidate = rng.random((runs, length)) < 0.5
    wrong = rng.random((runs, length)) < np.where(is_candidate, 0.2, 0.1)
    path = test.log_e_path(is_candidate, wrong)
    hit = path >= math.log(1 / test.alpha)
    assert hit.any(axis=1).all(), "an accuracy-worse candidate was never rejected"
    truths = hit.argmax(axis=1) + 1  # both arms' truths at the first rejection
    candidate_truths = np.cumsum(is_candidate, axis=1)[np.arange(runs), truths - 1]
    median = float(np.median(candidate_truths))
    expected = proportion_samples_needed(test, candidate_rate=0.2, stable_rate=0.1, share=0.5)
    assert expected is not None
    # The expected-path estimate is what the deadline is set from: within 25% of the median.
    assert abs(median - expected) <= 0.25 * expected, (median, expected)
    # Measured (seed 3): median 549 candidate truths (about 1,100 in all), estimate 611.
    assert 400 <= median <= 700


def test_accuracy_by_the_mean_test_needs_about_half_the_truths() -> None:
    # The same 0.80 vs 0.90 candidate judged as a mean of 0/1 "wrong" values: the normal
    # mixture pays less for monitoring than the exact test (measured, seed 3: median 290
    # candidate truths against 549), at the price of asymptotic validity, checked below.
    test = MeanTest(name="accuracy", effect_sd=0.25)
    rng = np.random.default_rng(3)
    runs, length = 200, 3000
    is_candidate = rng.random((runs, length)) < 0.5
    wrong = rng.random((runs, length)) < np.where(is_candidate, 0.2, 0.1)
    hit = test.log_e_path(is_candidate, wrong.astype(np.float64)) >= math.log(1 / test.alpha)
    assert hit.any(axis=1).all()
    candidate_truths = np.cumsum(is_candidate, axis=1)[np.arange(runs), hit.argmax(axis=1)]
    assert 200 <= float(np.median(candidate_truths)) <= 380
    # A/A on 0/1 values at 10% and 2% wrong, checked after every truth.
    aa_test = MeanTest(alpha=DEFAULT_FALSE_ROLLBACK_RATE)
    rejected = 0
    for rate in (0.1, 0.02):
        for _ in range(0, 400, 20):
            is_candidate = rng.random((20, 2000)) < 0.5
            wrong = rng.random((20, 2000)) < rate
            path = aa_test.log_e_path(is_candidate, wrong.astype(np.float64))
            rejected += int((path.max(axis=1) >= math.log(1 / aa_test.alpha)).sum())
    assert rejected <= 8, f"{rejected}/800 A/A runs rejected"
    counts = BernoulliCounts.from_accuracy(50, 40)
    ones = np.r_[np.ones(10), np.zeros(40)]
    moments = MeanMoments.from_counts(counts)
    assert (moments.mean, moments.var) == pytest.approx((ones.mean(), ones.var(ddof=1)))


def test_latency_exceedance_of_a_slow_candidate_is_rejected() -> None:
    # Threshold fixed at the stable arm's p99 (8 ms bucket bound) before the step; the
    # candidate puts 5% of requests above it instead of 1%, at a 5% share.
    bounds = (1.0, 2.0, 4.0, 8.0, 16.0)
    rng = np.random.default_rng(12)
    test = ProportionTest(name="latency")
    cand = [0] * 6
    stab = [0] * 6
    for _ in range(40_000):
        to_candidate = rng.random() < 0.05
        slow = rng.random() < (0.05 if to_candidate else 0.01)
        bucket = 4 + int(rng.random() < 0.5) if slow else int(rng.integers(0, 4))
        (cand if to_candidate else stab)[bucket] += 1
        if sum(cand) % 10 == 0 and to_candidate:
            result = test.evaluate(exceedances(cand, bounds, 8.0), exceedances(stab, bounds, 8.0))
            if result.verdict == "reject":
                break
    assert result.verdict == "reject"
    assert result.candidate_samples < 1500


def test_pooled_counts_give_the_same_answer() -> None:
    rng = np.random.default_rng(5)
    test = ProportionTest()
    replicas = [
        (
            BernoulliCounts(int(n), int(rng.integers(0, n + 1))),
            BernoulliCounts(int(m), int(rng.integers(0, m // 10 + 1))),
        )
        for n, m in rng.integers(1, 300, size=(4, 2))
    ]
    cand = sum((c for c, _ in replicas), BernoulliCounts())
    stab = sum((s for _, s in replicas), BernoulliCounts())
    one = test.evaluate(cand, stab)
    # One stream seeing the same requests in another order: the same statistic.
    stream_c, stream_s = BernoulliCounts(), BernoulliCounts()
    for _ in range(cand.trials - cand.events):
        stream_c = stream_c.update(False)
    for _ in range(cand.events):
        stream_c = stream_c.update(True)
    for _ in range(stab.events):
        stream_s = stream_s.update(True)
    for _ in range(stab.trials - stab.events):
        stream_s = stream_s.update(False)
    assert test.evaluate(stream_c, stream_s) == one


def test_mean_moments_merge_like_one_stream() -> None:
    rng = np.random.default_rng(6)
    values = rng.exponential(size=1000)
    parts = np.split(values, [100, 450, 451, 800])
    merged = MeanMoments()
    for part in parts:
        m = MeanMoments()
        for v in part:
            m = m.update(float(v))
        merged = merged + m
    assert merged.n == 1000
    assert merged.mean == pytest.approx(values.mean(), rel=1e-12)
    assert merged.var == pytest.approx(values.var(ddof=1), rel=1e-10)


def test_path_matches_evaluate_at_every_prefix() -> None:
    rng = np.random.default_rng(8)
    is_candidate = rng.random(400) < 0.3
    is_error = rng.random(400) < np.where(is_candidate, 0.08, 0.03)
    test = ProportionTest()
    path = test.log_e_path(is_candidate, is_error)
    cand, stab = BernoulliCounts(), BernoulliCounts()
    for i, (c, e) in enumerate(zip(is_candidate, is_error, strict=True)):
        if c:
            cand = cand.update(bool(e))
        else:
            stab = stab.update(bool(e))
        log_e = test.log_e_values(cand.events, cand.trials, stab.events, stab.trials)[0]
        assert path[i] == pytest.approx(log_e, rel=1e-9, abs=1e-9)

    values = rng.exponential(size=400)
    mean_test = MeanTest()
    mean_path = mean_test.log_e_path(is_candidate, values)
    cm, sm = MeanMoments(), MeanMoments()
    for i, (c, v) in enumerate(zip(is_candidate, values, strict=True)):
        if c:
            cm = cm.update(float(v))
        else:
            sm = sm.update(float(v))
        assert mean_path[i] == pytest.approx(mean_test.log_e_values(cm, sm)[0], abs=1e-9)


@pytest.mark.parametrize(("nc", "ns"), [(5, 5), (10, 190), (30, 30), (20, 60)])
def test_fixed_sample_type_one_error_is_below_alpha_exactly(nc: int, ns: int) -> None:
    # Enumerate every outcome of (nc, ns) trials: the probability of a rejection at that
    # sample size (scipy's binomial pmf) under the worst null p_c = p_s stays below alpha.
    test = ProportionTest(alpha=0.05)
    reject = np.zeros((nc + 1, ns + 1), dtype=bool)
    for xc in range(nc + 1):
        for xs in range(ns + 1):
            log_e = test.log_e_values(xc, nc, xs, ns)[0]
            reject[xc, xs] = log_e >= math.log(1 / test.alpha)
    assert reject.any(), "no outcome rejects: the check below would be empty"
    for p in np.linspace(0.01, 0.99, 50):
        prob = sps.binom.pmf(np.arange(nc + 1), nc, p)[:, None] * sps.binom.pmf(
            np.arange(ns + 1), ns, p
        )
        assert float(prob[reject].sum()) <= test.alpha


def test_mean_test_aa_under_continuous_monitoring() -> None:
    # Skewed (absolute-error-like) values, identical arms, checked after every value; 400
    # runs per split (the plug-in variance makes this the asymptotic test, so it is the
    # small-sample end that matters: 500 candidate values at 50%, 200 at 5%).
    test = MeanTest(alpha=DEFAULT_FALSE_ROLLBACK_RATE)
    rng = np.random.default_rng(9)
    rejected = 0
    for share, length in ((0.5, 1000), (0.05, 4000)):
        for _ in range(0, 400, 20):
            is_candidate = rng.random((20, length)) < share
            values = rng.exponential(size=(20, length))
            path = test.log_e_path(is_candidate, values)
            rejected += int((path.max(axis=1) >= math.log(1 / test.alpha)).sum())
    assert rejected <= 8, f"{rejected}/800 A/A runs rejected"


def test_mean_test_is_more_conservative_than_the_fixed_sample_z_test() -> None:
    # At any fixed sample size, the always-valid p-value is at least the one-sided z-test's
    # (scipy), which is what paying for continuous monitoring means.
    rng = np.random.default_rng(10)
    test = MeanTest()
    for _ in range(200):
        nc, ns = (int(x) for x in rng.integers(10, 500, size=2))
        a = rng.exponential(1.1, size=nc)
        b = rng.exponential(1.0, size=ns)
        cand = MeanMoments(nc, float(a.mean()), float(((a - a.mean()) ** 2).sum()))
        stab = MeanMoments(ns, float(b.mean()), float(((b - b.mean()) ** 2).sum()))
        z = (a.mean() - b.mean()) / math.sqrt(a.var(ddof=1) / nc + b.var(ddof=1) / ns)
        assert test.evaluate(cand, stab).p_value >= sps.norm.sf(z) * (1 - 1e-9)


def test_mean_test_rejects_a_worse_candidate() -> None:
    # MAE 20% worse (exponential errors: sd = mean), 50% split.
    test = MeanTest()
    rng = np.random.default_rng(11)
    is_candidate = rng.random((100, 6000)) < 0.5
    values = rng.exponential(np.where(is_candidate, 1.2, 1.0))
    hit = test.log_e_path(is_candidate, values) >= math.log(1 / test.alpha)
    assert hit.any(axis=1).all()
    candidate_values = np.cumsum(is_candidate, axis=1)[np.arange(100), hit.argmax(axis=1)]
    expected = mean_samples_needed(test, effect_sd=0.2 / 1.1, share=0.5)
    assert expected is not None
    assert abs(float(np.median(candidate_values)) - expected) <= 0.3 * expected


def test_accept_when_not_worse_and_samples_needed() -> None:
    test = ProportionTest()
    n = proportion_samples_needed(test, candidate_rate=0.0, stable_rate=0.0, share=0.05)
    assert n is not None
    ns = round(n * 19)
    assert test.evaluate(BernoulliCounts(n, 0), BernoulliCounts(ns, 0)).verdict == "accept"
    assert test.evaluate(BernoulliCounts(n - 1, 0), BernoulliCounts(ns, 0)).verdict == ("continue")
    # The price of exactness at every sample size: a candidate at 2% against a 1% stable
    # arm needs about 4,300 candidate requests at a 5% step (a fixed-sample z-test at the
    # same level, 50% power: about 1,300); a 5% candidate about 350.
    worse = proportion_samples_needed(test, candidate_rate=0.02, stable_rate=0.01, share=0.05)
    assert worse is not None
    assert 3000 < worse < 6000
    much_worse = proportion_samples_needed(test, candidate_rate=0.05, stable_rate=0.01, share=0.05)
    assert much_worse is not None
    assert 200 < much_worse < 500
    deadline = step_deadline_s(worse, requests_per_s=100.0, share=0.05)
    assert deadline == pytest.approx(3.0 * worse / 5.0)
    assert step_deadline_s(None, requests_per_s=100.0, share=0.05) is None


def test_no_data_and_one_arm_only_continue() -> None:
    test = ProportionTest()
    result = test.evaluate(BernoulliCounts(), BernoulliCounts())
    assert (result.verdict, result.p_value, result.estimate) == ("continue", 1.0, None)
    assert test.evaluate(BernoulliCounts(50, 50), BernoulliCounts()).verdict == "continue"
    assert MeanTest().evaluate(MeanMoments(5, 1.0, 1.0), MeanMoments(5, 0.0, 1.0)).verdict == (
        "continue"
    )


def test_exceedances_counts_requests_over_the_threshold() -> None:
    bounds = (1.0, 2.0, 4.0, 8.0)
    counts = (5, 10, 20, 3, 2)  # the last is the overflow bucket (> 8 ms)
    assert exceedances(counts, bounds, 4.0) == BernoulliCounts(40, 5)
    assert exceedances(counts, bounds, 5.0) == BernoulliCounts(40, 5)  # rounded down to 4
    assert exceedances(counts, bounds, 0.5) == BernoulliCounts(40, 40)
    with pytest.raises(ValueError, match="overflow"):
        exceedances(counts[:-1], bounds, 4.0)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="alpha"):
        ProportionTest(alpha=0.0)
    with pytest.raises(ValueError, match="margin"):
        ProportionTest(margin=0.0)
    with pytest.raises(ValueError, match="events"):
        BernoulliCounts(3, 4)
    with pytest.raises(ValueError, match="min_samples"):
        MeanTest(min_samples=1)
    with pytest.raises(ValueError, match="tests"):
        split_alpha(0.01, 0)
    assert split_alpha(0.01, 2) == 0.005
