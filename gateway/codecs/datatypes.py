"""datatypes.py: the one table between V2 datatype names, numpy dtypes and ONNX types.

Also owns the BYTES rules: on the wire (binary extension and gRPC raw contents) each element
is a little-endian uint32 length followed by its bytes; inside the gateway a BYTES tensor is
a numpy object array of ``bytes``.
"""

from __future__ import annotations

import decimal
import struct
from collections.abc import Mapping
from typing import Final

import numpy as np
import numpy.typing as npt

from gateway.codecs.limits import (
    BYTES_PREFIX,
    DEFAULT_LIMITS,
    ElementBudget,
    check_shape,
    show_shape,
)
from gateway.errors import InvalidInputError, UnimplementedError

__all__ = [
    "V2_TO_NUMPY",
    "NUMPY_TO_V2",
    "ONNX_TO_V2",
    "V2_TO_CONFIG",
    "numpy_dtype",
    "v2_datatype",
    "itemsize",
    "serialize_bytes",
    "deserialize_bytes",
    "tensor_from_buffer",
    "tensor_from_list",
    "tensor_to_bytes",
    "tensor_to_list",
    "check_tensor_parameters",
]

V2_TO_NUMPY: Final[dict[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

# Little-endian wire dtypes (the binary extension and raw contents are little-endian).
V2_TO_WIRE: Final[dict[str, np.dtype[np.generic]]] = {
    name: (dt.newbyteorder("<") if dt.kind in "iuf" else dt) for name, dt in V2_TO_NUMPY.items()
}

NUMPY_TO_V2: Final[dict[np.dtype[np.generic], str]] = {dt: name for name, dt in V2_TO_NUMPY.items()}

# onnxruntime's type strings ("tensor(float)") to V2 names.
ONNX_TO_V2: Final[dict[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# V2 names to the model-configuration enum names (TYPE_STRING is BYTES there).
V2_TO_CONFIG: Final[dict[str, str]] = {
    name: ("TYPE_STRING" if name == "BYTES" else "TYPE_" + name) for name in V2_TO_NUMPY
}

_LEN: Final = struct.Struct("<I")


def numpy_dtype(datatype: str) -> np.dtype[np.generic]:
    """The numpy dtype for a V2 datatype name; ``InvalidInputError`` when unknown."""
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        raise InvalidInputError(
            f"unsupported datatype '{datatype}'; expected one of {', '.join(V2_TO_NUMPY)}"
        ) from None


def v2_datatype(dtype: np.dtype[np.generic]) -> str:
    """The V2 datatype name for a numpy dtype (str and bytes arrays are BYTES)."""
    name = NUMPY_TO_V2.get(dtype)
    if name is not None:
        return name
    if dtype.kind in "USO":
        return "BYTES"
    raise InvalidInputError(f"numpy dtype {dtype} has no V2 datatype")


def itemsize(datatype: str) -> int:
    """Bytes per element on the wire; 0 for BYTES (variable length)."""
    dt = V2_TO_NUMPY[datatype]
    return 0 if dt.kind == "O" else dt.itemsize


def serialize_bytes(array: npt.NDArray[np.object_]) -> bytes:
    """Length-prefixed concatenation of a BYTES tensor's elements, in row-major order."""
    parts: list[bytes] = []
    append = parts.append
    for item in array.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode("utf-8")
        append(_LEN.pack(len(b)))
        append(b)
    return b"".join(parts)


def deserialize_bytes(buffer: bytes | memoryview, count: int, name: str) -> npt.NDArray[np.object_]:
    """Parse ``count`` length-prefixed elements that must fill ``buffer`` exactly.

    Raises ``InvalidInputError`` naming the tensor when ``count`` elements cannot fit in the
    buffer (each needs at least its 4-byte prefix; checked before the element array is
    allocated), a prefix runs past the end, or bytes are left over.
    """
    view = memoryview(buffer)
    end = len(view)
    if count > end // BYTES_PREFIX:
        raise InvalidInputError(
            f"input '{name}': {end} bytes of BYTES data hold at most {end // BYTES_PREFIX} "
            f"elements, the shape declares {count}"
        )
    out = np.empty(count, dtype=np.object_)
    pos = 0
    for i in range(count):
        if pos + 4 > end:
            raise InvalidInputError(
                f"input '{name}': BYTES data holds {i} elements, shape needs {count}"
            )
        (length,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + length > end:
            raise InvalidInputError(
                f"input '{name}': BYTES element {i} declares {length} bytes, "
                f"only {end - pos} remain"
            )
        out[i] = bytes(view[pos : pos + length])
        pos += length
    if pos != end:
        raise InvalidInputError(
            f"input '{name}': BYTES data has {end - pos} bytes beyond the {count} elements "
            "the shape declares"
        )
    return out


def tensor_from_buffer(
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    buffer: bytes | memoryview,
    budget: ElementBudget | None = None,
) -> npt.NDArray[np.generic]:
    """Decode raw little-endian tensor bytes (binary extension / gRPC raw contents).

    The shape is checked (``check_shape``) and its size against the bytes present before
    anything is allocated, then charged to ``budget`` (the request's limits; the default
    limits when None). Numeric data is a zero-copy view when the buffer is aligned.
    """
    if budget is None:
        budget = ElementBudget(DEFAULT_LIMITS)
    dtype = numpy_dtype(datatype)
    count = check_shape(name, shape, budget.limits)
    if dtype.kind == "O":
        budget.charge(name, min(count, len(buffer) // BYTES_PREFIX), 0, len(buffer))
        return deserialize_bytes(buffer, count, name).reshape(shape)
    expected = count * dtype.itemsize
    if len(buffer) != expected:
        raise InvalidInputError(
            f"input '{name}': {len(buffer)} bytes of data, but shape {show_shape(shape)} of "
            f"{datatype} needs {expected}"
        )
    budget.charge(name, count, dtype.itemsize)
    # The buffer holds exactly the shape's bytes (checked above): viewed in that shape.
    array: npt.NDArray[np.generic] = np.ndarray(shape, V2_TO_WIRE[datatype], buffer)
    if not array.flags.aligned:
        array = array.copy()
    return array


def _flat_length(values: object) -> int | None:
    """The element count of a flat list (None when nested or not a list): checked against
    the shape before numpy walks the values."""
    if isinstance(values, list | tuple) and (not values or not isinstance(values[0], list | tuple)):
        return len(values)
    return None


def tensor_from_list(
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    values: object,
    budget: ElementBudget | None = None,
) -> npt.NDArray[np.generic]:
    """Decode a JSON ``data`` list or gRPC typed contents (flat or nested by shape).

    Rejects element counts that differ from the shape, values of the wrong kind (strings
    for numbers, fractions for integers, numbers for BOOL), integers out of range and
    numbers too large for a float datatype (1e308 for FP32). The values are already in
    memory (decoded from the body), so what numpy allocates is bounded by them; the count
    is charged to ``budget`` before the conversion.
    """
    if budget is None:
        budget = ElementBudget(DEFAULT_LIMITS)
    dtype = numpy_dtype(datatype)
    count = check_shape(name, shape, budget.limits)
    flat = _flat_length(values)
    if flat is not None and flat != count:
        raise InvalidInputError(
            f"input '{name}': data has {flat} elements, shape {show_shape(shape)} needs {count}"
        )
    if dtype.kind == "O":
        budget.charge(name, count, 0)
        try:
            array = np.array(values, dtype=np.object_).reshape(-1)
        except ValueError:
            raise InvalidInputError(f"input '{name}': data is not a rectangular list") from None
        if array.size != count:
            raise InvalidInputError(
                f"input '{name}': data has {array.size} elements, shape {show_shape(shape)} "
                f"needs {count}"
            )
        out = np.empty(count, dtype=np.object_)
        for i, item in enumerate(array):
            if isinstance(item, str):
                out[i] = item.encode("utf-8")
            elif isinstance(item, bytes):
                out[i] = item
            else:
                raise InvalidInputError(
                    f"input '{name}': BYTES element {i} is {type(item).__name__}, expected a string"
                )
        return out.reshape(shape)
    budget.charge(name, count, dtype.itemsize)
    try:
        raw = np.asarray(values)
    except (ValueError, OverflowError):
        raise InvalidInputError(
            f"input '{name}': data is not a rectangular list of numbers"
        ) from None
    if raw.size != count:
        raise InvalidInputError(
            f"input '{name}': data has {raw.size} elements, shape {show_shape(shape)} needs {count}"
        )
    if count and (raw.dtype.kind == "O" or (raw.dtype.kind == "f" and dtype.kind in "iu")):
        # numpy turns [2**63, 0] into float64 (losing digits) and [2**64] into objects:
        # integers past int64 are read again, exactly, as Python ints (a rare path).
        exact = _python_ints(values)
        if exact is not None:
            raw = _from_python_ints(name, datatype, dtype, exact)
    kind = raw.dtype.kind
    if count and not _compatible(kind, dtype.kind):
        raise InvalidInputError(
            f"input '{name}': data holds {_KIND_NAMES.get(kind, raw.dtype.name)} values, "
            f"datatype {datatype} needs {_KIND_NAMES[dtype.kind]} values"
        )
    if kind in "iu" and dtype.kind in "iu" and count:
        info = np.iinfo(dtype)  # type: ignore[type-var]  # integer kinds only here
        if int(raw.min()) < info.min or int(raw.max()) > info.max:
            raise InvalidInputError(
                f"input '{name}': a value is out of range for datatype {datatype}"
            )
    if kind == "O":
        raise InvalidInputError(f"input '{name}': data mixes values of different kinds")
    if dtype.kind == "f":
        return _cast_float(name, datatype, dtype, raw).reshape(shape)
    array = raw.astype(dtype)
    return array.reshape(shape)


def _python_ints(values: object) -> list[int] | None:
    """The values, flattened, as Python ints when every one is an int (not a bool), else
    None (also when they are not rectangular)."""
    try:
        flat: list[object] = np.array(values, dtype=np.object_).reshape(-1).tolist()
    except ValueError:
        return None
    if all(type(v) is int for v in flat):
        return flat  # type: ignore[return-value]  # every element checked to be an int
    return None


def _from_python_ints(
    name: str, datatype: str, dtype: np.dtype[np.generic], values: list[int]
) -> npt.NDArray[np.generic]:
    """Exact integers as an array of ``dtype``; ``InvalidInputError`` when one is out of
    its range (an integer datatype's, or too large for a float datatype)."""
    low, high = min(values), max(values)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)  # type: ignore[type-var]  # integer kinds only here
        if low < info.min or high > info.max:
            raise InvalidInputError(
                f"input '{name}': a value is out of range for datatype {datatype}"
            )
        return np.array(values, dtype=dtype)
    limit = float(np.finfo(dtype).max)  # type: ignore[type-var]  # float kinds only here
    if high > limit or low < -limit:
        worst = high if high > -low else low
        raise InvalidInputError(
            f"input '{name}': value {decimal.Decimal(worst):.6g} is out of range for datatype "
            f"{datatype} "
            f"(at most {limit:g} in magnitude)"
        )
    return np.array([float(v) for v in values], dtype=np.float64)


def _cast_float(
    name: str, datatype: str, dtype: np.dtype[np.generic], raw: npt.NDArray[np.generic]
) -> npt.NDArray[np.generic]:
    """``raw`` as ``dtype``, refusing finite values the datatype cannot hold (1e308 for
    FP32 would become inf, then JSON null). inf and NaN, which only typed gRPC contents can
    carry, pass as they do in raw contents. The check rides on the cast (numpy's overflow
    flag), so the common case costs no extra pass over the data."""
    try:
        with np.errstate(over="raise"):
            return raw.astype(dtype)
    except FloatingPointError:
        pass
    limit = float(np.finfo(dtype).max)  # type: ignore[type-var]  # float kinds only here
    values = raw.astype(np.float64).reshape(-1)
    finite = values[np.isfinite(values)]
    worst = float(finite[np.argmax(np.abs(finite))])
    raise InvalidInputError(
        f"input '{name}': value {worst:g} is out of range for datatype {datatype} "
        f"(at most {limit:g} in magnitude)"
    )


_KIND_NAMES: Final = {
    "b": "boolean",
    "i": "integer",
    "u": "integer",
    "f": "number",
    "U": "string",
    "S": "string",
    "O": "mixed",
}


def _compatible(have: str, want: str) -> bool:
    if want == "b":
        return have == "b"
    if want in "iu":
        return have in "iu"
    if want == "f":
        return have in "iuf"
    return False


def tensor_to_bytes(array: npt.NDArray[np.generic], datatype: str) -> bytes:
    """Raw little-endian bytes of a tensor, length-prefixed elements for BYTES."""
    if datatype == "BYTES":
        return serialize_bytes(array)  # type: ignore[arg-type]  # object array of bytes/str
    wire = V2_TO_WIRE[datatype]
    if array.dtype != wire or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=wire)
    return array.tobytes()


def tensor_to_list(array: npt.NDArray[np.generic], datatype: str) -> list[object]:
    """A flat list for JSON ``data`` (BYTES elements as UTF-8 strings)."""
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [
            item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
            for item in flat
        ]
    values: list[object] = flat.tolist()
    return values


_SHM_KEYS: Final = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def check_tensor_parameters(kind: str, name: str, parameters: Mapping[str, object] | None) -> None:
    """Refuse (UNIMPLEMENTED) the tensor parameters of extensions this server does not
    offer: shared memory, and classification on outputs. ``kind`` is "input" or "output"."""
    if not parameters:
        return
    for key in _SHM_KEYS:
        if key in parameters:
            raise UnimplementedError(
                f"{kind} '{name}': shared memory is not supported by this server"
            )
    if kind == "output" and "classification" in parameters:
        raise UnimplementedError(f"output '{name}': the classification extension is not supported")
