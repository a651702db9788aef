"""Reference profiles: bins, categories, outputs, hashing, storage and compatibility checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from gateway.drift import kernels
from gateway.drift.profile import (
    Profile,
    build_profile,
    load_profile,
    load_sample,
    save_profile,
)


@pytest.fixture(scope="module")
def sample() -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(21)
    data = rng.standard_normal((5000, 4)).astype(np.float32)
    data[:, 1] = rng.integers(0, 3, 5000)  # ties: three distinct values
    data[:, 2] = rng.choice([1.0, 5.0, 7.0], 5000)  # a categorical code column
    data[::100, 3] = np.nan
    return data


@pytest.fixture(scope="module")
def profile(sample: npt.NDArray[np.float32]) -> Profile:
    labels = (sample[:, 0] > 0).astype(np.int64)
    scores = np.stack([sample[:, 0], -sample[:, 0]], axis=1)
    return build_profile(
        sample,
        ["a", "b", "c", "d"],
        bins=20,
        categorical={2: None},
        outputs={"label": labels, "scores": scores},
    )


def test_numeric_bins_follow_drift_md(profile: Profile, sample: npt.NDArray[np.float32]) -> None:
    num = profile.inputs.numeric
    assert num is not None
    assert num.cols.tolist() == [0, 1, 3]
    finite = sample[:, 0]
    assert num.lo[0] == finite.min()
    assert num.hi[0] == np.nextafter(finite.max(), np.float32(np.inf))
    assert np.all(np.diff(num.edges[0]) > 0)  # 19 distinct quantiles for a continuous feature
    assert num.ref_counts[0].sum() == 5000
    # Ties: values {0, 1, 2} give edges {1, 2}, padded with hi; padding bins stay empty.
    assert num.edges[1, :2].tolist() == [1.0, 2.0]
    assert np.all(num.edges[1, 2:] == num.hi[1])
    assert np.count_nonzero(num.ref_counts[1]) == 3
    assert num.mids[1, :3].tolist() == [0.0, 1.0, 2.0]
    assert num.nan_rate[2] == pytest.approx(0.01)
    assert num.ref_counts[2].sum() == 4950
    assert num.packed.shape == (3, 32 + 2)
    # The reference itself counts into exactly its reference bins.
    counts = np.zeros((3, num.width), np.int64)
    kernels.count_numeric(sample, num.packed, counts, cols=num.cols)
    np.testing.assert_array_equal(counts[:, 1:21], num.ref_counts)


def test_categorical_inputs_and_outputs(profile: Profile) -> None:
    cat = profile.inputs.categorical
    assert cat is not None
    assert cat.cols.tolist() == [2]
    assert cat.values[0].tolist() == [1.0, 5.0, 7.0]
    assert cat.ref_counts.sum() == 5000
    label = profile.outputs["label"]
    assert label.names == ("label",)
    assert label.categorical is not None
    assert label.numeric is None
    assert label.categorical.values[0].tolist() == [0.0, 1.0]
    scores = profile.outputs["scores"]
    assert scores.names == ("scores[0]", "scores[1]")
    assert scores.numeric is not None
    assert scores.categorical is None
    assert profile.numeric_depths() == {5}
    assert profile.categorical_depths() == {2}


def test_save_load_round_trip_keeps_hash_and_arrays(profile: Profile, tmp_path: Path) -> None:
    path = tmp_path / "profile.npz"
    save_profile(profile, path)
    loaded = load_profile(path)
    assert loaded.hash == profile.hash
    assert loaded.rows == profile.rows
    assert loaded.inputs.names == profile.inputs.names
    assert list(loaded.outputs) == ["label", "scores"]
    assert loaded.inputs.numeric is not None
    assert profile.inputs.numeric is not None
    np.testing.assert_array_equal(loaded.inputs.numeric.packed, profile.inputs.numeric.packed)
    np.testing.assert_array_equal(loaded.inputs.numeric.mids, profile.inputs.numeric.mids)
    with np.load(path, allow_pickle=False) as npz:  # readable without pickle
        assert "in.num.edges" in npz.files


def test_hash_is_stable_and_tracks_the_bins(sample: npt.NDArray[np.float32]) -> None:
    first = build_profile(sample, bins=10)
    assert build_profile(sample.copy(), bins=10).hash == first.hash
    assert len(first.hash) == 16
    assert build_profile(sample, bins=12).hash != first.hash
    shifted = sample.copy()
    shifted[:, 0] += 1.0
    assert build_profile(shifted, bins=10).hash != first.hash


def test_tampered_file_is_refused(profile: Profile, tmp_path: Path) -> None:
    path = tmp_path / "profile.npz"
    save_profile(profile, path)
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["in.num.edges"] = arrays["in.num.edges"] + np.float32(0.5)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="does not match stored"):
        load_profile(path)
    np.savez(path, something=np.zeros(3))
    with pytest.raises(ValueError, match="not a drift profile"):
        load_profile(path)


def test_check_compatible_names_the_mismatch(profile: Profile) -> None:
    profile.check_compatible(4, "float32")
    with pytest.raises(ValueError, match="describes 4 input features, but the model input has 5"):
        profile.check_compatible(5, "float32")
    with pytest.raises(ValueError, match="built from float32 data, but the model input is int64"):
        profile.check_compatible(4, "int64")
    with pytest.raises(ValueError, match="not a numpy dtype name"):
        profile.check_compatible(4, "FP99")


def test_build_rejects_bad_input(sample: npt.NDArray[np.float32]) -> None:
    with pytest.raises(ValueError, match="no finite reference values"):
        build_profile(np.full((10, 1), np.nan, np.float32))
    with pytest.raises(ValueError, match="names were given"):
        build_profile(sample, ["a"])
    with pytest.raises(ValueError, match="bins must be"):
        build_profile(sample, bins=1)
    with pytest.raises(ValueError, match="outside"):
        build_profile(sample, categorical={9: None})
    with pytest.raises(ValueError, match="rows"):
        build_profile(sample, outputs={"y": np.zeros(3)})


def test_load_sample_formats(tmp_path: Path) -> None:
    data = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.save(tmp_path / "s.npy", data)
    np.savez(tmp_path / "s.npz", first=data, second=data[:, :2])
    (tmp_path / "h.csv").write_text("a,b,c\n0,1,2\n3,,5\n")
    (tmp_path / "n.csv").write_text("0,1,2\n3,4,5\n")
    x, names = load_sample(tmp_path / "s.npy")
    assert x.dtype == np.float32
    assert x.shape == (4, 3)
    assert names is None
    assert load_sample(tmp_path / "s.npz")[0].shape == (4, 3)
    assert load_sample(tmp_path / "s.npz", "second")[0].shape == (4, 2)
    x, names = load_sample(tmp_path / "h.csv")
    assert names == ["a", "b", "c"]
    assert np.isnan(x[1, 1])
    assert x[1, 2] == 5.0
    x, names = load_sample(tmp_path / "n.csv")
    assert names is None
    assert x.shape == (2, 3)
    with pytest.raises(ValueError, match="no array"):
        load_sample(tmp_path / "s.npz", "third")
    with pytest.raises(ValueError, match="unsupported"):
        load_sample(tmp_path / "s.txt")
