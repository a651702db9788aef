"""ModelRepository and ModelVersion on real ONNX models built in a temporary folder."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.models import failing, mlp
from gateway.config import RuntimeSettings
from gateway.errors import InvalidInputError, ModelExecutionError, ModelNotFoundError
from gateway.repository import ModelRepository, ModelVersion
from gateway.types import InferRequest, Tensor


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    mlp(root / "mlp" / "1" / "model.onnx", [4, 8, 3], seed=0, name="mlp")
    mlp(root / "mlp" / "2" / "model.onnx", [4, 8, 3], seed=1, name="mlp")
    (root / "mlp" / "config.toml").write_text("max_batch_size = 16\n")
    failing(root / "bad" / "1" / "model.onnx", outputs=3)
    broken = root / "bad" / "2" / "model.onnx"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not an onnx model")
    (root / "empty").mkdir()
    return root


def _load(repo: ModelRepository, name: str) -> list[ModelVersion]:
    async def main() -> list[ModelVersion]:
        return await repo.load(name)

    return asyncio.run(main())


@pytest.fixture
def repo(root: Path) -> Iterator[ModelRepository]:
    repository = ModelRepository(root, RuntimeSettings(inference_workers=1))
    repository.start()
    yield repository
    repository.stop()


def test_folders_with_versions_are_models(repo: ModelRepository) -> None:
    assert repo.model_names() == ["bad", "mlp"]
    assert [(e.name, e.version, e.state) for e in repo.index()] == [
        ("bad", "1", ""),
        ("bad", "2", ""),
        ("mlp", "1", ""),
        ("mlp", "2", ""),
    ]


def test_load_builds_every_version_and_they_answer(repo: ModelRepository) -> None:
    loaded = _load(repo, "mlp")
    assert [m.version for m in loaded] == ["1", "2"]
    first = loaded[0]
    assert first.max_batch_size == 16
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    request = InferRequest("mlp", "1", [Tensor("INPUT0", "FP32", (2, 4), x)])
    feeds, rows = first.prepare(request)
    assert rows == 2
    outputs = first.run(feeds)
    response = first.respond(request, outputs)
    assert response.model_version == "1"
    assert response.outputs[0].data.shape == (2, 3)
    second = loaded[1]
    other = second.run(second.prepare(request)[0])
    assert not np.allclose(outputs[0], other[0])  # different weights, different answers


def test_a_bad_version_is_unavailable_and_the_reason_is_kept(repo: ModelRepository) -> None:
    loaded = _load(repo, "bad")
    assert [m.version for m in loaded] == ["1"]
    states = {e.version: (e.state, e.reason) for e in repo.index() if e.name == "bad"}
    assert states["2"][0] == "UNAVAILABLE"
    assert states["2"][1]
    with pytest.raises(ModelExecutionError):
        loaded[0].run([np.zeros((1, 32), np.float32)])


def test_unknown_and_invalid_names_are_refused(repo: ModelRepository) -> None:
    with pytest.raises(ModelNotFoundError, match="not in the repository"):
        _load(repo, "empty")
    with pytest.raises(ModelNotFoundError):
        _load(repo, "nothing-here")
    for bad in ("../mlp", ".hidden", ""):
        with pytest.raises(InvalidInputError, match="invalid model name"):
            _load(repo, bad)


def test_executor_needs_start(root: Path) -> None:
    repository = ModelRepository(root, RuntimeSettings())
    with pytest.raises(RuntimeError, match="start"):
        _ = repository.executor


def test_auto_execution_keeps_a_gpu_model_in_the_pool(root: Path) -> None:
    """A model whose full batch is fast enough to run inline on the CPU runs in the pool
    (with its fill size measured) once its session is on a GPU: the rule reads the device
    the session reports, set here by hand since this machine has no GPU."""
    from gateway.config import ModelPolicy

    path = root / "mlp" / "1" / "model.onnx"
    runtime = RuntimeSettings(intra_op_threads=1)
    policy = ModelPolicy(max_batch_size=4, execution="auto", inline_max_us=1_000_000)
    on_cpu = ModelVersion("mlp", "1", path, policy, runtime)
    on_cpu.warm_up()
    assert on_cpu.is_inline
    assert on_cpu.fill_batch_size == 0
    on_gpu = ModelVersion("mlp", "1", path, policy, runtime)
    on_gpu.device = "GPU"
    on_gpu.warm_up()
    assert not on_gpu.is_inline
    assert sorted(on_gpu.rows_per_s) == [1, 2, 4]
    assert on_gpu.fill_batch_size in (1, 2, 4)


def test_warm_up_measures_the_fill_size_of_a_pool_model(root: Path) -> None:
    from gateway.config import ModelPolicy

    path = root / "mlp" / "1" / "model.onnx"
    runtime = RuntimeSettings(intra_op_threads=1)
    pooled = ModelVersion(
        "mlp", "1", path, ModelPolicy(max_batch_size=16, execution="pool"), runtime
    )
    pooled.warm_up()
    assert sorted(pooled.rows_per_s) == [1, 2, 4, 8, 16]
    best = max(pooled.rows_per_s.values())
    assert pooled.rows_per_s[pooled.fill_batch_size] >= 0.9 * best
    smaller = [n for n in pooled.rows_per_s if n < pooled.fill_batch_size]
    assert all(pooled.rows_per_s[n] < 0.9 * best for n in smaller)
    # Inline models and an explicit setting are not measured.
    inline = ModelVersion("mlp", "1", path, ModelPolicy(execution="inline"), runtime)
    inline.warm_up()
    assert (inline.fill_batch_size, inline.rows_per_s) == (0, {})
    fixed = ModelPolicy(max_batch_size=16, execution="pool", fill_batch_size=8)
    explicit = ModelVersion("mlp", "1", path, fixed, runtime)
    explicit.warm_up()
    assert (explicit.fill_batch_size, explicit.rows_per_s) == (8, {})
