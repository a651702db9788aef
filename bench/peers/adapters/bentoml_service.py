"""BentoML service (bentoml 1.4.40): one batchable API per model at ``/<model>``, plain
JSON ``{"instances": [[...]]}`` in, a JSON array out. ONNX paths come from the environment
(``BENCH_MODELS`` = ``name=path,...``) because ``bentoml serve`` imports this module itself.

Batching: BentoML's adaptive dispatcher, max_batch_size 64 (it has no max-wait knob; its
``max_latency_ms`` is a deadline, kept generous). One worker process.
"""

from __future__ import annotations

import os

# Not installed in the project venv that runs mypy: only in bench/.peers/bentoml.
import bentoml  # type: ignore[import-not-found]
import numpy as np
import numpy.typing as npt

from bench.peers.adapters._common import OnnxModel

_PATHS = dict(item.split("=", 1) for item in os.environ.get("BENCH_MODELS", "").split(",") if item)


@bentoml.service(
    workers=1,
    traffic={"timeout": 60},
    logging={"access": {"enabled": False}},  # per-request logging off, as in the gateway
)
class OnnxService:
    def __init__(self) -> None:
        self.models = {name: OnnxModel(path) for name, path in _PATHS.items()}

    @bentoml.api(route="/mlp_small", batchable=True, max_batch_size=64, max_latency_ms=10_000)  # type: ignore[untyped-decorator]
    def mlp_small(self, instances: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return self.models["mlp_small"](instances)

    @bentoml.api(route="/mlp_large", batchable=True, max_batch_size=64, max_latency_ms=10_000)  # type: ignore[untyped-decorator]
    def mlp_large(self, instances: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return self.models["mlp_large"](instances)
