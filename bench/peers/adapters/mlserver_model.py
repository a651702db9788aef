"""MLServer runtime (mlserver 1.7.1) that serves one ONNX file; loaded by MLServer from
model-settings.json (``implementation``), with the ONNX path in ``parameters.uri``.

Adaptive batching is configured in model-settings.json by the adapter
(``mlserver_server``), not here: ``predict`` simply gets the merged batch.
"""

from __future__ import annotations

# Not installed in the project venv that runs mypy: only in bench/.peers/mlserver.
from mlserver import MLModel  # type: ignore[import-not-found]
from mlserver.codecs import NumpyCodec  # type: ignore[import-not-found]
from mlserver.types import InferenceRequest, InferenceResponse  # type: ignore[import-not-found]

from bench.peers.adapters._common import OnnxModel


class OnnxRuntimeModel(MLModel):  # type: ignore[misc]  # mlserver is untyped here
    async def load(self) -> bool:
        self._model = OnnxModel(str(self.settings.parameters.uri))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        y = self._model(x)
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(self._model.output_name, y)],
        )
