"""One way to call the gateway through the real Triton clients, for both protocols."""

from __future__ import annotations

from typing import Any

import numpy.typing as npt
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import np_to_triton_dtype

PROTOCOLS = ("http", "grpc")
Array = npt.NDArray[Any]


def client(protocol: str, url: str) -> Any:
    if protocol == "http":
        return httpclient.InferenceServerClient(url, concurrency=4)
    return grpcclient.InferenceServerClient(url)


def infer(
    protocol: str,
    url: str,
    model: str,
    inputs: dict[str, Array],
    *,
    version: str = "",
    outputs: list[str] | None = None,
    binary: bool = True,
    request_id: str = "",
    connection: Any = None,
    parameters: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    client_timeout: float | None = None,
) -> tuple[dict[str, Array], Any]:
    """Infer through tritonclient; return outputs by name and the raw result."""
    mod: Any = httpclient if protocol == "http" else grpcclient
    tensors = []
    for name, array in inputs.items():
        tensor = mod.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        if protocol == "http":
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    requested = None
    if outputs is not None:
        if protocol == "http":
            requested = [mod.InferRequestedOutput(n, binary_data=binary) for n in outputs]
        else:
            requested = [mod.InferRequestedOutput(n) for n in outputs]
    kwargs: dict[str, Any] = {}
    if client_timeout is not None:
        kwargs["client_timeout"] = client_timeout
    # A client this call opened is closed on every path: one left open after an expected
    # error is collected later on whatever thread runs the collector, where tritonclient's
    # finaliser fails outside its event hub and pytest reports it against another test.
    conn = connection or client(protocol, url)
    try:
        result = conn.infer(
            model,
            tensors,
            model_version=version,
            outputs=requested,
            request_id=request_id,
            parameters=parameters,
            headers=headers,
            **kwargs,
        )
        names = outputs
        if names is None:
            response = result.get_response()
            entries = response["outputs"] if protocol == "http" else response.outputs
            names = [e["name"] if protocol == "http" else e.name for e in entries]
        got = {name: result.as_numpy(name) for name in names}
    finally:
        if connection is None:
            conn.close()
    return got, result
