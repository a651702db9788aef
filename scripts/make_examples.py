"""make_examples.py: build the bundled example model repository under gateway/examples/models/.

Writes two models in the gateway's repository layout (``<model>/<version>/model.onnx`` plus a
per-model ``config.toml``):

* ``breast_cancer``: version 1 (the "stable" one) is a scikit-learn logistic regression and
  version 2 (the "candidate") a one-hidden-layer MLP, both trained on scikit-learn's bundled
  breast-cancer data set, with the standardization baked into the graph. Next to them go
  ``reference.npy`` (the full feature matrix, float32 [569, 30], a reference sample for drift
  profiles) and ``feature_names.json``.
* ``mixed_types``: a small arithmetic model whose inputs and outputs cover several V2
  datatypes (FP32, FP64, INT64, INT32, BOOL, UINT8, FP16, BYTES).

Nothing is downloaded, every seed is fixed and the graphs carry no timestamps, so a rerun
writes byte-identical files. After writing, every model is loaded back into onnxruntime and
checked against scikit-learn or a numpy computation of the same formula.

Usage: python scripts/make_examples.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeAlias

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

LOG = logging.getLogger("make_examples")

F64: TypeAlias = "npt.NDArray[np.float64]"
F32: TypeAlias = "npt.NDArray[np.float32]"
I64: TypeAlias = "npt.NDArray[np.int64]"

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "gateway" / "examples" / "models"
PRODUCER = "gateway-examples"
PRODUCER_VERSION = "1"
IR_VERSION = 8  # what onnxruntime 1.32 loads; opset 17 needs IR >= 8
ONNX_OPSET = helper.make_opsetid("", 17)
ML_OPSET = helper.make_opsetid("ai.onnx.ml", 3)  # only imported by graphs that use it
BATCH = "batch"
SEED = 0
N_FEATURES = 30
MAX_ITER = 1000  # LogisticRegression converges in ~20 iterations, the MLP in ~340

BREAST_CANCER_CONFIG = """\
# Per-model settings for every version of this model (see README, "Model settings").
max_batch_size = 64
max_queue_delay_us = 0
"""
MIXED_TYPES_CONFIG = """\
# Per-model settings for every version of this model (see README, "Model settings").
max_batch_size = 32
"""
CATEGORIES = ("red", "green", "blue")  # LabelEncoder keys; ids are their positions, default -1


class Classifier(Protocol):
    """The part of a fitted scikit-learn classifier the checks use."""

    def predict_proba(self, x: F64) -> F64: ...


@dataclass(frozen=True)
class Dataset:
    """The breast-cancer split: float64 copies of float32 features, so sklearn and onnx agree."""

    x_all: F32
    x_train: F64
    x_test: F64
    y_train: I64
    y_test: I64
    feature_names: list[str]


def load_dataset() -> Dataset:
    """Load scikit-learn's bundled breast-cancer data and split it 75/25 with a fixed seed."""
    bunch = load_breast_cancer()
    x_all = np.asarray(bunch.data, dtype=np.float32)
    y_all = np.asarray(bunch.target, dtype=np.int64)
    # Train on exactly the values a float32 client can send, so the checks compare like with like.
    x64 = x_all.astype(np.float64)
    x_train, x_test, y_train, y_test = train_test_split(
        x64, y_all, test_size=0.25, random_state=SEED
    )
    return Dataset(
        x_all=x_all,
        x_train=np.asarray(x_train, dtype=np.float64),
        x_test=np.asarray(x_test, dtype=np.float64),
        y_train=np.asarray(y_train, dtype=np.int64),
        y_test=np.asarray(y_test, dtype=np.int64),
        feature_names=[str(name) for name in bunch.feature_names],
    )


def f32(name: str, values: npt.ArrayLike) -> TensorProto:
    """A float32 initializer."""
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def i64(name: str, values: Sequence[int]) -> TensorProto:
    """An int64 initializer (axes, shapes)."""
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def batched(name: str, elem_type: int, *dims: int) -> onnx.ValueInfoProto:
    """A value info whose first dimension is the symbolic batch dimension."""
    return helper.make_tensor_value_info(name, elem_type, [BATCH, *dims])


def finish_model(graph: onnx.GraphProto, doc: str, *, ml: bool = False) -> onnx.ModelProto:
    """Wrap a graph with fixed metadata (no timestamps) and validate it."""
    model = helper.make_model(
        graph,
        opset_imports=[ONNX_OPSET, ML_OPSET] if ml else [ONNX_OPSET],
        ir_version=IR_VERSION,
        producer_name=PRODUCER,
        producer_version=PRODUCER_VERSION,
        doc_string=doc,
    )
    model.model_version = 1
    onnx.checker.check_model(model, full_check=True)
    return model


def classifier_graph(
    name: str,
    mean: F64,
    scale: F64,
    layers: Sequence[tuple[F64, F64]],
) -> onnx.GraphProto:
    """Standardize, apply ``layers`` (ReLU between them), then a 2-class softmax head.

    The last layer produces the single logit ``z`` of a binary sklearn classifier (its
    probability of class 1 is sigmoid(z)). The head widens it to the two logits ``[0, z]``:
    softmax([0, z]) == [1 - sigmoid(z), sigmoid(z)], exactly ``predict_proba``.
    """
    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centered"], name="center"),
        helper.make_node("Div", ["centered", "scale"], ["h0"], name="standardize"),
    ]
    inits = [f32("mean", mean), f32("scale", scale)]
    for i, (weight, bias) in enumerate(layers):
        last = i == len(layers) - 1
        if last:
            if weight.shape[1] != 1 or bias.shape != (1,):
                raise ValueError(f"last layer must have one output, got {weight.shape}")
            weight = np.concatenate([np.zeros_like(weight), weight], axis=1)
            bias = np.concatenate([np.zeros_like(bias), bias])
        out = "logits" if last else f"pre{i + 1}"
        inits += [f32(f"W{i}", weight), f32(f"b{i}", bias)]
        nodes += [
            helper.make_node("MatMul", [f"h{i}", f"W{i}"], [f"mm{i}"], name=f"matmul{i}"),
            helper.make_node("Add", [f"mm{i}", f"b{i}"], [out], name=f"bias{i}"),
        ]
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"h{i + 1}"], name=f"relu{i + 1}"))
    nodes += [
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], name="argmax", axis=1, keepdims=0),
    ]
    return helper.make_graph(
        nodes,
        name,
        [batched("features", TensorProto.FLOAT, N_FEATURES)],
        [batched("probabilities", TensorProto.FLOAT, 2), batched("label", TensorProto.INT64)],
        initializer=inits,
    )


def logistic_model(data: Dataset, scaler: StandardScaler) -> tuple[onnx.ModelProto, Classifier]:
    """Version 1: logistic regression on the standardized features."""
    clf = LogisticRegression(random_state=SEED, max_iter=MAX_ITER)
    clf.fit(scaler.transform(data.x_train), data.y_train)
    weight = np.asarray(clf.coef_, dtype=np.float64).T  # [30, 1]
    bias = np.asarray(clf.intercept_, dtype=np.float64)  # [1]
    graph = classifier_graph(
        "breast_cancer_logistic",
        np.asarray(scaler.mean_, dtype=np.float64),
        np.asarray(scaler.scale_, dtype=np.float64),
        [(weight, bias)],
    )
    doc = "Breast-cancer logistic regression (stable): standardize, linear, softmax."
    return finish_model(graph, doc), clf


def mlp_model(data: Dataset, scaler: StandardScaler) -> tuple[onnx.ModelProto, Classifier]:
    """Version 2: a 16-unit ReLU MLP on the same standardized features."""
    clf = MLPClassifier(
        hidden_layer_sizes=(16,), activation="relu", random_state=SEED, max_iter=MAX_ITER
    )
    clf.fit(scaler.transform(data.x_train), data.y_train)
    if clf.out_activation_ != "logistic":
        raise RuntimeError(f"expected a logistic output unit, got {clf.out_activation_}")
    layers = [
        (np.asarray(w, dtype=np.float64), np.asarray(b, dtype=np.float64))
        for w, b in zip(clf.coefs_, clf.intercepts_, strict=True)
    ]
    graph = classifier_graph(
        "breast_cancer_mlp",
        np.asarray(scaler.mean_, dtype=np.float64),
        np.asarray(scaler.scale_, dtype=np.float64),
        layers,
    )
    doc = "Breast-cancer MLP, 16 ReLU units (candidate): standardize, MLP, softmax."
    return finish_model(graph, doc), clf


def mixed_types_model() -> onnx.ModelProto:
    """A model whose score depends on every input, each of a different datatype.

    score = sum(measurements) * scale + count + code + (number of true flags) + sum(pixels)
            + sum(half) + category_id, all computed in float64 (every input is cast to double
            before its row sum, so uint8 and float16 sums cannot overflow or round).
    """
    dbl = TensorProto.DOUBLE

    def cast(src: str, dst: str, to: int) -> onnx.NodeProto:
        return helper.make_node("Cast", [src], [dst], name=f"cast_{src}", to=to)

    def row_sum(src: str, dst: str) -> onnx.NodeProto:
        return helper.make_node("ReduceSum", [src, "axis1"], [dst], name=f"sum_{src}", keepdims=1)

    nodes = [
        cast("measurements", "measurements_f64", dbl),
        row_sum("measurements_f64", "measurements_sum"),
        helper.make_node("Mul", ["measurements_sum", "scale"], ["scaled"], name="mul_scale"),
        cast("count", "count_f64", dbl),
        cast("code", "code_f64", dbl),
        cast("flags", "flags_i64", TensorProto.INT64),
        row_sum("flags_i64", "flags_count"),
        cast("flags_count", "flags_count_f64", dbl),
        # ReduceMax still takes its axes as an attribute in opset 17 (ReduceSum as an input).
        helper.make_node(
            "ReduceMax", ["flags_i64"], ["flags_max"], name="any_flags", axes=[1], keepdims=1
        ),
        cast("flags_max", "flags_any", TensorProto.BOOL),
        cast("pixels", "pixels_f64", dbl),
        row_sum("pixels_f64", "pixels_sum"),
        cast("half", "half_f64", dbl),
        row_sum("half_f64", "half_sum"),
        helper.make_node(
            "LabelEncoder",
            ["category"],
            ["category_id"],
            name="encode_category",
            domain="ai.onnx.ml",
            keys_strings=list(CATEGORIES),
            values_int64s=list(range(len(CATEGORIES))),
            default_int64=-1,
        ),
        cast("category_id", "category_id_f64", dbl),
        helper.make_node("Identity", ["category"], ["category_echo"], name="echo_category"),
    ]
    terms = [
        "scaled",
        "count_f64",
        "code_f64",
        "flags_count_f64",
        "pixels_sum",
        "half_sum",
        "category_id_f64",
    ]
    acc = terms[0]
    for i, term in enumerate(terms[1:], start=1):
        out = "score" if i == len(terms) - 1 else f"partial{i}"
        nodes.append(helper.make_node("Add", [acc, term], [out], name=f"add{i}"))
        acc = out
    graph = helper.make_graph(
        nodes,
        "mixed_types",
        [
            batched("measurements", TensorProto.FLOAT, 4),
            batched("scale", TensorProto.DOUBLE, 1),
            batched("count", TensorProto.INT64, 1),
            batched("code", TensorProto.INT32, 1),
            batched("flags", TensorProto.BOOL, 2),
            batched("pixels", TensorProto.UINT8, 4),
            batched("half", TensorProto.FLOAT16, 2),
            batched("category", TensorProto.STRING, 1),
        ],
        [
            batched("score", TensorProto.DOUBLE, 1),
            batched("category_id", TensorProto.INT64, 1),
            batched("category_echo", TensorProto.STRING, 1),
            batched("flags_any", TensorProto.BOOL, 1),
        ],
        initializer=[i64("axis1", [1])],
    )
    doc = "Datatype coverage: FP32, FP64, INT64, INT32, BOOL, UINT8, FP16 and BYTES inputs."
    return finish_model(graph, doc, ml=True)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="\n")


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, feeds: dict[str, npt.NDArray[np.generic]]) -> list[object]:
    outputs: list[object] = sess.run(None, feeds)
    return outputs


def check_classifier(
    path: Path, scaler: StandardScaler, clf: Classifier, data: Dataset
) -> tuple[float, float]:
    """Compare the ONNX model with scaler + predict_proba; return (test accuracy, max error)."""
    sess = session(path)
    x_test = data.x_test.astype(np.float32)
    worst = 0.0
    label = np.zeros(0, dtype=np.int64)
    for rows in (x_test[:1], x_test[:5], x_test):
        probs, label = (np.asarray(o) for o in run(sess, {"features": rows}))
        expected = np.asarray(
            clf.predict_proba(scaler.transform(rows.astype(np.float64))), dtype=np.float64
        )
        if probs.dtype != np.float32 or probs.shape != (len(rows), 2):
            raise AssertionError(f"{path}: probabilities {probs.dtype} {probs.shape}")
        if label.dtype != np.int64 or label.shape != (len(rows),):
            raise AssertionError(f"{path}: label {label.dtype} {label.shape}")
        err = float(np.max(np.abs(probs - expected)))
        worst = max(worst, err)
        if err > 1e-5:
            raise AssertionError(f"{path}: max |onnx - predict_proba| = {err:.3g} > 1e-5")
        if not np.array_equal(label, np.argmax(expected, axis=1)):
            raise AssertionError(f"{path}: labels differ from sklearn")
    return float(np.mean(label == data.y_test)), worst  # label: the full test set, run last


def mixed_inputs(batch: int, rng: np.random.Generator) -> dict[str, npt.NDArray[np.generic]]:
    # Strings go in as an object array of str. Findings with onnxruntime 1.32 (Python API):
    # * an object array of ``bytes`` is NOT rejected: each element is silently converted with
    #   str(), so b"red" arrives as the 6-character text "b'red'" (LabelEncoder gives -1, the
    #   Identity echo returns "b'red'"). Bytes must be decoded (UTF-8) before feeding, so
    #   BYTES values that are not valid UTF-8 cannot reach a STRING input intact.
    # * a fixed-width numpy ``S`` array of ASCII decodes correctly, but multi-byte UTF-8 values
    #   are garbled and an embedded NUL truncates the value; non-UTF-8 bytes raise
    #   UnicodeDecodeError. A numpy ``U`` array works like an object array of str.
    # * STRING outputs always come back as numpy object arrays holding ``str``.
    categories = np.array(["red", "green", "blue", "purple", ""], dtype=object)
    return {
        "measurements": rng.normal(size=(batch, 4)).astype(np.float32),
        "scale": rng.normal(size=(batch, 1)).astype(np.float64),
        "count": rng.integers(-1000, 1000, size=(batch, 1), dtype=np.int64),
        "code": rng.integers(-1000, 1000, size=(batch, 1), dtype=np.int32),
        "flags": rng.random(size=(batch, 2)) < 0.5,
        "pixels": rng.integers(0, 256, size=(batch, 4), dtype=np.uint8),
        "half": rng.normal(scale=10.0, size=(batch, 2)).astype(np.float16),
        "category": rng.choice(categories, size=(batch, 1)),
    }


def check_mixed_types(path: Path) -> None:
    """Check every output against a numpy computation of the same formula."""
    sess = session(path)
    rng = np.random.default_rng(SEED)
    lookup = {name: i for i, name in enumerate(CATEGORIES)}
    for batch in (1, 5, 32):
        feeds = mixed_inputs(batch, rng)
        score, category_id, echo, flags_any = (np.asarray(o) for o in run(sess, feeds))
        category = feeds["category"]
        expected_id = np.array([[lookup.get(str(c), -1)] for c in category[:, 0]], dtype=np.int64)
        expected_score = (
            feeds["measurements"].astype(np.float64).sum(axis=1, keepdims=True) * feeds["scale"]
            + feeds["count"].astype(np.float64)
            + feeds["code"].astype(np.float64)
            + feeds["flags"].sum(axis=1, keepdims=True).astype(np.float64)
            + feeds["pixels"].astype(np.float64).sum(axis=1, keepdims=True)
            + feeds["half"].astype(np.float64).sum(axis=1, keepdims=True)
            + expected_id.astype(np.float64)
        )
        if score.dtype != np.float64 or score.shape != (batch, 1):
            raise AssertionError(f"score {score.dtype} {score.shape}")
        if not np.allclose(score, expected_score):
            raise AssertionError(f"score mismatch at batch {batch}")
        if category_id.dtype != np.int64 or not np.array_equal(category_id, expected_id):
            raise AssertionError(f"category_id mismatch at batch {batch}: {category_id}")
        if echo.dtype != object or echo.shape != (batch, 1) or echo.tolist() != category.tolist():
            raise AssertionError(f"category_echo mismatch at batch {batch}: {echo!r}")
        expected_any = feeds["flags"].any(axis=1, keepdims=True)
        if flags_any.dtype != np.bool_ or not np.array_equal(flags_any, expected_any):
            raise AssertionError(f"flags_any mismatch at batch {batch}")
    # Bytes round trip: decode to str on the way in, encode the str that comes back.
    raw = np.array([[b"green"], ["caf\u00e9".encode()]], dtype=object)
    feeds = mixed_inputs(2, rng)
    feeds["category"] = np.array([[b.decode("utf-8") for b in row] for row in raw], dtype=object)
    _, category_id, echo, _ = (np.asarray(o) for o in run(sess, feeds))
    if [[s.encode("utf-8") for s in row] for row in echo.tolist()] != raw.tolist():
        raise AssertionError(f"bytes round trip failed: {echo!r}")
    if category_id.ravel().tolist() != [1, -1]:
        raise AssertionError(f"category_id for decoded bytes: {category_id.ravel().tolist()}")
    # Undecoded bytes are accepted but stringified (see mixed_inputs); pin that behaviour.
    feeds["category"] = raw
    _, category_id, echo, _ = (np.asarray(o) for o in run(sess, feeds))
    if echo[0, 0] != "b'green'" or category_id[0, 0] != -1:
        LOG.warning("onnxruntime now handles bytes string inputs differently: %r", echo)


def signature(path: Path) -> str:
    """The input/output signature as onnxruntime reports it."""
    sess = session(path)

    def fmt(args: Sequence[ort.NodeArg]) -> str:
        return ", ".join(f"{a.name}: {a.type} {a.shape}" for a in args)

    return f"inputs [{fmt(sess.get_inputs())}] -> outputs [{fmt(sess.get_outputs())}]"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model repository root")
    args = parser.parse_args(argv)
    out: Path = args.out
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data = load_dataset()
    scaler = StandardScaler().fit(data.x_train)
    bc = out / "breast_cancer"
    stable, stable_clf = logistic_model(data, scaler)
    candidate, candidate_clf = mlp_model(data, scaler)
    save_model(stable, bc / "1" / "model.onnx")
    save_model(candidate, bc / "2" / "model.onnx")
    write_text(bc / "config.toml", BREAST_CANCER_CONFIG)
    np.save(bc / "reference.npy", data.x_all, allow_pickle=False)
    write_text(bc / "feature_names.json", json.dumps(data.feature_names, indent=2) + "\n")

    mixed = out / "mixed_types"
    save_model(mixed_types_model(), mixed / "1" / "model.onnx")
    write_text(mixed / "config.toml", MIXED_TYPES_CONFIG)

    acc_stable, err_stable = check_classifier(bc / "1" / "model.onnx", scaler, stable_clf, data)
    acc_candidate, err_candidate = check_classifier(
        bc / "2" / "model.onnx", scaler, candidate_clf, data
    )
    check_mixed_types(mixed / "1" / "model.onnx")

    LOG.info("wrote %s", out)
    for name, acc, err in (
        ("breast_cancer/1 (logistic)", acc_stable, err_stable),
        ("breast_cancer/2 (mlp)     ", acc_candidate, err_candidate),
    ):
        LOG.info("%s test accuracy %.4f, max |onnx - predict_proba| %.2g", name, acc, err)
    for path in (bc / "1" / "model.onnx", bc / "2" / "model.onnx", mixed / "1" / "model.onnx"):
        LOG.info("%s: %s", path.relative_to(out), signature(path))


if __name__ == "__main__":
    main()
