"""Benchmark models, generated (never committed) with onnx.helper and fixed seeds.

mlp_small (32 -> 64 -> 2), mlp_large (256 -> 1024 -> 1024 -> 16) and compute_heavy
(512 -> 4096 -> 4096 -> 64, where one row costs about a millisecond and batching decides
throughput). Input INPUT0, output OUTPUT0, batch dimension first.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Final

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["MODELS", "mlp", "failing", "write_model"]

MODELS: Final[dict[str, list[int]]] = {
    "mlp_small": [32, 64, 2],
    "mlp_large": [256, 1024, 1024, 16],
    "compute_heavy": [512, 4096, 4096, 64],
}


def mlp(path: Path, sizes: list[int], seed: int = 0, name: str = "mlp") -> None:
    """A ReLU MLP with random weights: INPUT0 [batch, sizes[0]] -> OUTPUT0 [batch, sizes[-1]]."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "INPUT0"
    last = len(sizes) - 2
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        bias = (rng.standard_normal(b) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        gemm = "OUTPUT0" if i == last else f"g{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [gemm]))
        if i != last:
            nodes.append(helper.make_node("Relu", [gemm], [f"h{i}"]))
            prev = f"h{i}"
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", sizes[-1]])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="gateway-bench"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def failing(path: Path, outputs: int = 2) -> None:
    """INPUT0 [batch, 32] -> OUTPUT0 [batch, outputs], but the runtime always raises (a
    Reshape to rows of 5 cannot hold 32 values): a candidate that fails every request."""
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["INPUT0", "shape"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["OUTPUT0"]),
        ],
        "failing",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", outputs])],
        [
            numpy_helper.from_array(np.ones((5, outputs), np.float32), "w"),
            numpy_helper.from_array(np.array([-1, 5], np.int64), "shape"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="gateway-bench"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def write_model(root: Path, name: str, config: str = "") -> Path:
    """Write MODELS[name] as <root>/<name>/1/model.onnx (once) with a config.toml."""
    path = root / name / "1" / "model.onnx"
    if not path.exists():
        mlp(path, MODELS[name], seed=len(name), name=name)
    (root / name / "config.toml").write_text(config)
    return path
