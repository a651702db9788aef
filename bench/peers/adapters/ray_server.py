"""Ray Serve adapter (ray[serve] 2.60.0): one deployment per model at ``/<model>``, plain
JSON ``{"instances": [[...]]}`` in, ``{"predictions": [[...]]}`` out; the HTTP proxy on
127.0.0.1 (Ray's own GCS/raylet ports stay on the node address: Ray offers no loopback-only
mode for them).

Batching: ``@serve.batch(max_batch_size=64, batch_wait_timeout_s=0)`` (work-conserving like
the gateway's default) with ``max_ongoing_requests=128`` so that 64 requests can reach the
replica at once (Ray's default of 5 would cap every batch at 5). Access logs off. One
replica, one Ray node with 2 CPUs; the process blocks until killed.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import numpy as np

# Not installed in the project venv that runs mypy: only in bench/.peers/ray.
import ray  # type: ignore[import-not-found]
from ray import serve

from bench.peers.adapters._common import LOOPBACK, OnnxModel, parse_args

# Per-request access logs off (the gateway writes none by default).
_QUIET = {"enable_access_log": False, "log_level": "WARNING"}


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=128,
    ray_actor_options={"num_cpus": 0},
    logging_config=_QUIET,
)
class OnnxDeployment:
    def __init__(self, path: str) -> None:
        self.model = OnnxModel(path)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)  # type: ignore[untyped-decorator]
    async def infer(self, batches: list[np.ndarray[Any, Any]]) -> list[list[Any]]:
        sizes = [len(b) for b in batches]
        y = self.model(np.concatenate(batches).astype(np.float32, copy=False))
        out, start = [], 0
        for size in sizes:
            out.append(y[start : start + size].tolist())
            start += size
        return out

    async def __call__(self, request: Any) -> dict[str, Any]:
        body = await request.json()
        rows = await self.infer(np.asarray(body["instances"], dtype=np.float32))
        return {"predictions": rows}


# serve.deployment turned the class into a Deployment (untyped here: ray is not in the venv
# that runs mypy), whose bind() builds the application.
_DEPLOYMENT: Any = OnnxDeployment


def main() -> None:
    args = parse_args(__doc__ or "")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        _node_ip_address=LOOPBACK,
    )
    serve.start(http_options={"host": LOOPBACK, "port": args.http_port}, logging_config=_QUIET)
    for name, path in args.models.items():
        serve.run(_DEPLOYMENT.bind(path), name=name, route_prefix=f"/{name}")
    print("ray-serve-ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
