"""build.py: builds a model's reference profile from a reference sample (``gateway profile
build``): runs the sample through the model with onnxruntime to profile its outputs too,
and saves the profile beside the model.

A model's profile lives at ``<repo>/<model>/profile.npz`` and serves every version, so
canary and stable windows share one binning and can be compared; outputs are profiled from
the stable version. ``<repo>/<model>/<version>/profile.npz`` overrides it for one version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from gateway.drift.profile import (
    Profile,
    build_profile,
    load_profile,
    load_sample,
    save_profile,
)

__all__ = [
    "PROFILE_FILE",
    "FEATURE_NAMES_FILE",
    "profile_for_model",
    "find_profile",
    "load_checked",
    "monitored_input",
]

PROFILE_FILE: Final = "profile.npz"
FEATURE_NAMES_FILE: Final = "feature_names.json"
_CHUNK_ROWS: Final = 4096


def monitored_input(session: ort.InferenceSession) -> tuple[str, int, str]:
    """(name, feature count, numpy dtype name) of the input that drift watches: the first
    numeric input of the graph, its non-batch dimensions flattened."""
    types = {
        "tensor(float)": "float32",
        "tensor(double)": "float64",
        "tensor(float16)": "float16",
        "tensor(int64)": "int64",
        "tensor(int32)": "int32",
    }
    for arg in session.get_inputs():
        dtype = types.get(arg.type)
        if dtype is None:
            continue
        dims = [d if isinstance(d, int) else 1 for d in (arg.shape or [])[1:]]
        return arg.name, int(np.prod(dims)) if dims else 1, dtype
    raise ValueError("the model has no numeric input to monitor")


def _run(
    session: ort.InferenceSession, name: str, sample: npt.NDArray[Any]
) -> dict[str, npt.NDArray[Any]]:
    outputs = [o.name for o in session.get_outputs()]
    parts: dict[str, list[npt.NDArray[Any]]] = {o: [] for o in outputs}
    for start in range(0, len(sample), _CHUNK_ROWS):
        chunk = sample[start : start + _CHUNK_ROWS]
        for out, value in zip(outputs, session.run(None, {name: chunk}), strict=True):
            parts[out].append(np.asarray(value))
    return {o: np.concatenate(v) for o, v in parts.items() if v and v[0].dtype.kind in "fiub"}


def profile_for_model(model_path: Path, data_path: Path, output: Path, bins: int = 20) -> Profile:
    """Profile ``model_path``'s monitored input from the sample at ``data_path`` (.npy,
    .npz or .csv) and its outputs on that sample; save to ``output``. Feature names come
    from a ``feature_names.json`` beside the model folder; a CSV's columns are matched to
    them by header (any order; missing or unknown columns are an error)."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name, features, dtype = monitored_input(session)
    sample, names = load_sample(data_path)
    names_file = model_path.parent.parent / FEATURE_NAMES_FILE
    expected = list(json.loads(names_file.read_text())) if names_file.is_file() else None
    if names is not None and expected is not None:
        sample = _by_header(sample, names, expected, data_path)
        names = expected
    elif names is None:
        names = expected
    if sample.ndim != 2 or sample.shape[1] != features:
        raise ValueError(
            f"the sample has shape {list(sample.shape)}; model input '{name}' needs "
            f"[rows, {features}]"
        )
    outputs = _run(session, name, sample.astype(dtype))
    profile = build_profile(sample, names, bins=bins, outputs=outputs)
    save_profile(profile, output)
    return profile


def _by_header(
    sample: npt.NDArray[Any], header: list[str], expected: list[str], data_path: Path
) -> npt.NDArray[Any]:
    """The sample's columns reordered to the model's feature order, matched by header
    name; a missing, unknown or repeated column is an error naming it."""
    if len(set(header)) != len(header):
        twice = sorted({h for h in header if header.count(h) > 1})
        raise ValueError(f"{data_path}: column(s) {', '.join(twice)} appear more than once")
    missing = [n for n in expected if n not in header]
    extra = [h for h in header if h not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unknown {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        raise ValueError(
            f"{data_path}: the CSV header does not match the model's features ({'; '.join(parts)})"
        )
    return np.ascontiguousarray(sample[:, [header.index(n) for n in expected]])


def find_profile(model_dir: Path, version: str) -> Path | None:
    """The profile file for one version: its own, else the model's, else None."""
    for path in (model_dir / version / PROFILE_FILE, model_dir / PROFILE_FILE):
        if path.is_file():
            return path
    return None


def load_checked(path: Path, session: ort.InferenceSession) -> tuple[Profile, str]:
    """Load a profile and check it fits the model's monitored input; returns the profile
    and the input name. Raises ``ValueError`` with the reason when it does not fit."""
    name, features, dtype = monitored_input(session)
    profile = load_profile(path)
    profile.check_compatible(features, dtype)
    return profile, name
