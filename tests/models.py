"""Test models built with onnx.helper at session start (small, deterministic)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.models import failing, mlp
from gateway.config import EXAMPLE_REPOSITORY

# V2 datatype -> ONNX element type, for the identity model over every datatype.
ONNX_TYPES: dict[str, int] = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _save(graph: onnx.GraphProto, path: Path, ml: bool = False) -> None:
    opsets = [helper.make_opsetid("", 17)]
    if ml:
        opsets.append(helper.make_opsetid("ai.onnx.ml", 3))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="gateway-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def identity_all(path: Path) -> None:
    """One Identity per V2 datatype: inputs in_<DT> [batch, 3] -> out_<DT>."""
    nodes, inputs, outputs = [], [], []
    for name, elem in ONNX_TYPES.items():
        inputs.append(helper.make_tensor_value_info(f"in_{name}", elem, ["batch", 3]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", elem, ["batch", 3]))
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    _save(helper.make_graph(nodes, "identity_all", inputs, outputs), path)


def chain(path: Path, width: int = 512, depth: int = 256) -> None:
    """INPUT0 [batch, width] through ``depth`` MatMul+Tanh layers sharing one weight:
    milliseconds of compute per row from a 1 MB file."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes = []
    prev = "INPUT0"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"m{i}"]))
        out = "OUTPUT0" if i == depth - 1 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(w, "w")],
    )
    _save(graph, path)


def fixed_shape(path: Path) -> None:
    """No batch dimension: x [2, 3] -> y = x + 1."""
    one = numpy_helper.from_array(np.ones((2, 3), np.float32), "one")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "fixed_shape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [one],
    )
    _save(graph, path)


def lookup(path: Path) -> None:
    """idx [batch, 1] INT64 -> table[idx]; an index >= 4 makes the runtime raise."""
    table = numpy_helper.from_array(np.array([10.0, 20.0, 30.0, 40.0], np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["value"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch", 1])],
        [table],
    )
    _save(graph, path)


def build_repository(root: Path) -> Path:
    """The bundled examples plus the test models, in a fresh folder."""
    shutil.copytree(EXAMPLE_REPOSITORY, root, dirs_exist_ok=True)
    identity_all(root / "identity_all" / "1" / "model.onnx")
    mlp(root / "mlp_small" / "1" / "model.onnx", [32, 64, 2], name="mlp_small")
    (root / "mlp_small" / "config.toml").write_text("max_batch_size = 64\n")
    fixed_shape(root / "fixed_shape" / "1" / "model.onnx")
    lookup(root / "lookup" / "1" / "model.onnx")
    (root / "lookup" / "config.toml").write_text("max_batch_size = 64\n")
    # A heavier model that always runs in the pool: deadlines and queue limits need a
    # model call that takes milliseconds.
    chain(root / "slow" / "1" / "model.onnx")
    (root / "slow" / "config.toml").write_text(
        'max_batch_size = 8\nexecution = "pool"\nmax_queue_size = 4\n'
    )
    # Milliseconds per call at batch 64, run in the pool: batching under concurrency.
    mlp(root / "heavy" / "1" / "model.onnx", [256, 1024, 1024, 16], seed=2, name="heavy")
    (root / "heavy" / "config.toml").write_text('max_batch_size = 64\nexecution = "pool"\n')
    # Versions for routing and shadow tests (same signature, INPUT0 [-1,32] -> [-1,3]):
    # 1 and 2 identical, 3 different weights, 4 always fails, 5 slow.
    mlp(root / "pair" / "1" / "model.onnx", [32, 16, 3], seed=0, name="pair")
    mlp(root / "pair" / "2" / "model.onnx", [32, 16, 3], seed=0, name="pair")
    mlp(root / "pair" / "3" / "model.onnx", [32, 16, 3], seed=9, name="pair")
    failing(root / "pair" / "4" / "model.onnx", outputs=3)
    mlp(root / "pair" / "5" / "model.onnx", [32, *[1024] * 24, 3], seed=3, name="pair")
    (root / "pair" / "config.toml").write_text('default_version = "1"\n')
    broken = root / "broken" / "1" / "model.onnx"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"this is not an onnx model")
    return root
