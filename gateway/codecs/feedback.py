"""codecs/feedback.py: feedback bodies on both protocols -> ``FeedbackItem`` lists, and the
join's ``FeedbackResult`` back out.

REST: ``{"items": [{"id": ..., "truth": ...}]}`` or a bare list of items (JSON). gRPC:
``gateway.feedback.v1.FeedbackRequest`` (labels or values per item). Bad bodies raise
``InvalidInputError`` with msgspec's path or the item's index. It knows nothing of the
prediction memory or of how truth is matched to a prediction.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from gateway._proto import feedback_pb2
from gateway.errors import InvalidInputError
from gateway.types import FeedbackItem, FeedbackResult

__all__ = ["decode_feedback_json", "decode_feedback_message", "encode_feedback_message"]


class _FeedbackBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    items: list[FeedbackItem]


_json_decoder: Final = msgspec.json.Decoder(_FeedbackBody | list[FeedbackItem])


def decode_feedback_json(body: bytes) -> list[FeedbackItem]:
    """The items of a REST feedback body (an object with ``items``, or a bare list)."""
    try:
        payload = _json_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidInputError(f"invalid feedback: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidInputError(f"malformed JSON in feedback: {exc}") from None
    return payload if isinstance(payload, list) else payload.items


def decode_feedback_message(request: feedback_pb2.FeedbackRequest) -> list[FeedbackItem]:
    """The items of a gRPC ``FeedbackRequest``: each gives labels or values, not both; one
    truth becomes a scalar, several a list (one per row)."""
    if not request.model_name:
        raise InvalidInputError("model_name is required")
    items = []
    for i, item in enumerate(request.items):
        if not item.id:
            raise InvalidInputError(f"items[{i}]: id is required")
        if item.labels and item.values:
            raise InvalidInputError(f"items[{i}]: give labels or values, not both")
        truth: Any = list(item.labels) if item.labels else list(item.values)
        if not truth:
            raise InvalidInputError(f"items[{i}]: no truth given")
        items.append(FeedbackItem(item.id, truth[0] if len(truth) == 1 else truth))
    return items


def encode_feedback_message(result: FeedbackResult) -> feedback_pb2.FeedbackResponse:
    """The gRPC answer to a feedback call."""
    return feedback_pb2.FeedbackResponse(
        matched=result.matched,
        unknown=result.unknown_ids,
        expired=result.expired_ids,
        duplicate=result.duplicate,
        invalid=result.invalid,
        errors=list(result.errors),
    )
