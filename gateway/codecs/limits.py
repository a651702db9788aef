"""limits.py: what a client may declare in one request, checked before anything is allocated.

In: declared shapes, element counts, data sizes, JSON bodies and timeout headers. Out: the
checked values, or ``InvalidInputError`` (the declaration is wrong: a negative or absurd
dimension, data that does not match its shape, nesting too deep, a timeout that is not a
number) or ``PayloadTooLargeError`` (the declaration is consistent but over a configured
limit). Element counts are Python ints, so no product can overflow before it is compared.

``CodecLimits`` holds the bounds with their defaults; the codecs take one as an argument and
a front end passes the one built from its settings. It knows no protocol library.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Final

import msgspec
import numpy as np

from gateway.errors import GatewayError, InvalidInputError, PayloadTooLargeError

__all__ = [
    "CodecLimits",
    "DEFAULT_LIMITS",
    "BYTES_PREFIX",
    "ElementBudget",
    "check_shape",
    "show_shape",
    "check_json_depth",
    "json_depth",
    "parse_timeout_ms",
    "timeout_from_parameter_us",
    "MAX_TIMEOUT_S",
    "MAX_NAME_BYTES",
    "check_count",
    "check_model_name",
    "client_error",
]

logger = logging.getLogger(__name__)

BYTES_PREFIX: Final = 4  # every BYTES element carries a uint32 length on the wire
# Bytes a decoded BYTES element costs beyond its data: the object-array slot (8) and the
# bytes object header (33, CPython 3.11+ on 64-bit), rounded up.
_BYTES_ELEMENT_OVERHEAD: Final = 48
MAX_NAME_BYTES: Final = 255  # a model name becomes a directory name (NAME_MAX on Linux)
MAX_TIMEOUT_S: Final = 86_400.0  # a day: longer is a mistake or a probe, not a deadline


class CodecLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Bounds on one inference request, applied by both codecs before allocating."""

    max_inputs: int = 1024
    """Inputs per request at most; real models have a handful, and each costs a decode."""
    max_outputs: int = 1024
    """Requested outputs per request at most (same reason as max_inputs)."""
    max_rank: int = 32
    """Dimensions per tensor at most: numpy 1.x's limit, more than any served model uses."""
    max_elements: int = 1 << 27
    """Elements over all inputs of one request at most (128 Mi): twice what a 64 MiB body of
    INT8 can hold, so only absurd declarations hit it."""
    max_decoded_bytes: int = 512 << 20
    """Memory (bytes) the decoded inputs of one request may take at most: numeric data at its
    itemsize, BYTES at 48 bytes per element plus its data. 512 MiB bounds the 8x growth of a
    64 MiB body of one-byte BYTES elements."""
    max_json_depth: int = 64
    """Nesting of a free-form JSON body (repository index, load) at most: msgspec itself
    has no limit and ends in RecursionError near 1,000. Inference bodies are not scanned
    (about 1 ns per byte on every request); their schema, scalar-only parameters and
    numpy's 64 dimensions bound them, and a RecursionError there is a 400 too."""

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            if getattr(self, name) < 1:
                raise ValueError(f"codec limit {name} must be >= 1")


DEFAULT_LIMITS: Final = CodecLimits()


def check_shape(name: str, shape: Sequence[int], limits: CodecLimits) -> int:
    """The element count of ``shape`` for input ``name``; ``InvalidInputError`` when a
    dimension is negative, the rank is over ``max_rank``, or the product of the non-zero
    dimensions (what numpy must be able to index, even for an empty tensor) is over
    ``max_elements``. Runs in Python ints: ``[2**62, 2**62]`` cannot overflow."""
    if len(shape) > limits.max_rank:
        raise InvalidInputError(
            f"input '{name}': shape has {len(shape)} dimensions, at most {limits.max_rank} "
            "are allowed"
        )
    count = 1
    extent = 1
    for dim in shape:
        if dim < 0:
            raise InvalidInputError(f"input '{name}': shape {list(shape)} has a negative dimension")
        count *= dim
        if dim:
            extent *= dim
            if extent > limits.max_elements:
                raise InvalidInputError(
                    f"input '{name}': shape {show_shape(shape)} declares more than "
                    f"{limits.max_elements} elements, the limit per request"
                )
    return count


def show_shape(shape: Sequence[int]) -> str:
    """A shape for a message, cut at 200 characters (a hostile shape can be long)."""
    text = str(list(shape))
    return text if len(text) <= 200 else text[:200] + "...]"


def check_count(what: str, count: int, limit: int) -> None:
    """``InvalidInputError`` when a request carries more than ``limit`` of ``what``."""
    if count > limit:
        raise InvalidInputError(f"the request has {count} {what}; at most {limit} are allowed")


def check_model_name(name: str) -> None:
    """``InvalidInputError`` for a model name no repository can hold: over 255 bytes of
    UTF-8, or with a NUL or path separator in it."""
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_NAME_BYTES:
        raise InvalidInputError(
            f"model name of {len(encoded)} bytes; at most {MAX_NAME_BYTES} are allowed"
        )
    if "\x00" in name or "/" in name or "\\" in name:
        raise InvalidInputError(f"model name {_quote(name)} has a NUL or a path separator")


def client_error(exc: Exception, what: str) -> GatewayError:
    """The codec boundary: what a decoder raises for an exception no check anticipated.

    A ``GatewayError`` is returned as it is; ``RecursionError`` says the body nests too
    deeply, ``MemoryError`` that it is too large (``PayloadTooLargeError``); anything else
    becomes ``InvalidInputError`` with its type and a short message, and its traceback goes
    to the debug log (a client can provoke it at will, so not louder). Use as
    ``except Exception as exc: raise client_error(exc, what) from None`` around a decode
    (a plain ``try`` costs nothing on the request path, unlike a context manager).
    """
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, RecursionError):
        return InvalidInputError(f"{what} nests too deeply")
    if isinstance(exc, MemoryError):
        return PayloadTooLargeError(f"{what} is too large to decode")
    logger.debug("could not decode %s", what, exc_info=exc)
    detail = str(exc)
    if len(detail) > 200:
        detail = detail[:200] + "..."
    return InvalidInputError(f"invalid {what}: {type(exc).__name__}: {ascii(detail)[1:-1]}")


class ElementBudget:
    """What the inputs of one request decoded so far have used of ``limits``.

    ``charge`` is called once per input with its element count and decoded size, after the
    data present has been checked against the shape, and raises ``PayloadTooLargeError``
    when the request as a whole goes over ``max_elements`` or ``max_decoded_bytes``.
    """

    __slots__ = ("_bytes", "_elements", "limits")

    def __init__(self, limits: CodecLimits) -> None:
        self.limits = limits
        self._elements = 0
        self._bytes = 0

    def charge(self, name: str, count: int, itemsize: int, data_bytes: int = 0) -> None:
        """Add an input of ``count`` elements of ``itemsize`` bytes (0 for BYTES, whose
        ``data_bytes`` are its element data)."""
        limits = self.limits
        self._elements += count
        if itemsize:
            self._bytes += count * itemsize
        else:
            self._bytes += count * _BYTES_ELEMENT_OVERHEAD + data_bytes
        if self._elements > limits.max_elements:
            raise PayloadTooLargeError(
                f"input '{name}': the request's inputs hold {self._elements} elements, more "
                f"than the limit of {limits.max_elements}"
            )
        if self._bytes > limits.max_decoded_bytes:
            raise PayloadTooLargeError(
                f"input '{name}': the request's inputs need about {self._bytes} bytes decoded, "
                f"more than the limit of {limits.max_decoded_bytes}"
            )


# -- JSON nesting -----------------------------------------------------------------------------


def json_depth(body: bytes | memoryview) -> int:
    """The deepest nesting of arrays and objects in a JSON text (0 for a scalar).

    Brackets inside strings do not count. Malformed text gets some number; the decoder
    reports the malformation. Linear and in C or numpy, with no Python loop per byte:
    escaped backslashes and quotes are dropped (``bytes.replace``), then everything but
    quotes and brackets (``bytes.translate``); the parity of the quotes before a bracket
    says whether it is inside a string, and a chunked cumsum gives the depth.
    """
    data = bytes(body)
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = data.translate(None, _NOT_STRUCTURE)
    if len(structure) <= _SMALL:
        return _small_depth(structure)
    kept = np.frombuffer(structure, dtype=np.uint8)
    deepest = 0
    depth = 0
    quotes = 0
    # Chunked so the running sums take a bounded few MB whatever the body's size.
    for start in range(0, len(kept), _CHUNK):
        chunk = kept[start : start + _CHUNK]
        is_quote = chunk == _QUOTE
        in_string = np.cumsum(is_quote, dtype=np.int32)
        in_string += quotes
        in_string &= 1
        steps = _STEP[chunk]
        steps[in_string.astype(np.bool_)] = 0
        levels = np.cumsum(steps, dtype=np.int32)
        levels += depth
        deepest = max(deepest, int(levels.max()))
        depth = int(levels[-1])
        quotes += int(np.count_nonzero(is_quote))
    return deepest


def _small_depth(structure: bytes) -> int:
    """``json_depth`` on the quotes and brackets of a small body, in plain Python: below
    ``_SMALL`` bytes this beats numpy's per-call overhead (7 us against 60 us for the 130
    brackets of a 64 x 32 nested body)."""
    depth = 0
    deepest = 0
    in_string = False
    for byte in structure:
        if byte == _QUOTE:
            in_string = not in_string
        elif in_string:
            continue
        elif byte in (_OPEN_SQUARE, _OPEN_CURLY):
            depth += 1
            if depth > deepest:
                deepest = depth
        else:
            depth -= 1
    return deepest


_SMALL: Final = 4096
_OPEN_SQUARE: Final = ord("[")
_OPEN_CURLY: Final = ord("{")
_NOT_STRUCTURE: Final = bytes(b for b in range(256) if b not in b'[]{}"')
_STEP: Final = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
_QUOTE: Final = ord('"')
_CHUNK: Final = 1 << 20


def check_json_depth(body: bytes | memoryview, what: str, limits: CodecLimits) -> None:
    """``InvalidInputError`` when ``body`` nests deeper than ``max_json_depth``.

    A body with no more brackets than the limit cannot nest deeper, and most requests are
    such bodies: two ``bytes.count`` calls (well under a microsecond for a small request)
    spare them the full scan.
    """
    data = bytes(body)
    if data.count(b"[") + data.count(b"{") <= limits.max_json_depth:
        return
    depth = json_depth(data)
    if depth > limits.max_json_depth:
        raise InvalidInputError(
            f"{what} nests {depth} levels deep; at most {limits.max_json_depth} are allowed"
        )


# -- timeouts ---------------------------------------------------------------------------------

_DECIMAL: Final = re.compile(r"[0-9]{1,15}(?:\.[0-9]{0,9})?")


def parse_timeout_ms(text: str | bytes, *, max_s: float = MAX_TIMEOUT_S) -> float:
    """Seconds from a timeout header in milliseconds (``x-request-timeout-ms``).

    Accepts a plain non-negative decimal ("250", "12.5"), surrounding spaces allowed.
    Raises ``InvalidInputError`` for anything else: nan, inf, negatives, exponents,
    underscores, hex, or more than ``max_s`` seconds (a day by default).
    """
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    value = text.strip()
    if len(value) > 32 or not _DECIMAL.fullmatch(value):
        raise InvalidInputError(
            "x-request-timeout-ms must be a non-negative number of milliseconds, "
            f"got {_quote(text)}"
        )
    seconds = float(value) / 1000
    if seconds > max_s:
        raise InvalidInputError(
            f"x-request-timeout-ms {value} is over the maximum of {int(max_s * 1000)} ms"
        )
    return seconds


def timeout_from_parameter_us(value: object, *, max_s: float = MAX_TIMEOUT_S) -> float:
    """Seconds from the V2 request parameter ``timeout`` (an integer of microseconds).

    Raises ``InvalidInputError`` unless ``value`` is a non-negative int (not a bool) of at
    most ``max_s`` seconds.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInputError("parameter 'timeout' must be a non-negative integer (microseconds)")
    if value > max_s * 1_000_000:
        raise InvalidInputError(
            f"parameter 'timeout' {value} us is over the maximum of {int(max_s)} s"
        )
    seconds = value / 1_000_000
    assert math.isfinite(seconds)
    return seconds


def _quote(text: str) -> str:
    """A client's value, shortened and with control characters escaped, for a message."""
    short = text[:40] + ("..." if len(text) > 40 else "")
    return ascii(short)
