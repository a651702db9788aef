"""The status table covers every error kind, once."""

from __future__ import annotations

import grpc

from gateway import errors
from gateway.errors import ErrorKind, GatewayError
from gateway.status import STATUS, grpc_code, http_status


def test_every_error_kind_has_a_status() -> None:
    assert set(STATUS) == set(ErrorKind)


def test_every_error_class_maps() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, GatewayError):
            assert 400 <= http_status(cls.kind) < 600
            assert isinstance(grpc_code(cls.kind), grpc.StatusCode)


def test_key_mappings() -> None:
    assert STATUS[ErrorKind.INVALID_INPUT] == (400, grpc.StatusCode.INVALID_ARGUMENT)
    assert STATUS[ErrorKind.OVERLOADED] == (503, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert STATUS[ErrorKind.DEADLINE] == (504, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert STATUS[ErrorKind.NOT_FOUND] == (404, grpc.StatusCode.NOT_FOUND)
