"""MLServer adapter (mlserver 1.7.1): writes settings.json and one model-settings.json per
model into a temporary folder, then runs ``mlserver start`` there (V2 REST JSON and gRPC,
host 127.0.0.1; metrics on its own loopback port, as by default).

Batching: MLServer's adaptive batching, max_batch_size 64, max_batch_time 1 ms (MLServer
turns batching off at 0, so 1 ms is the smallest comparable wait). parallel_workers stays at
MLServer's default (1 inference worker process beside the server process).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from bench.peers.adapters._common import LOOPBACK, parse_args


def main() -> None:
    args = parse_args(__doc__ or "")
    folder = Path(tempfile.mkdtemp(prefix="bench-mlserver-"))
    settings = {
        "host": LOOPBACK,
        "http_port": args.http_port,
        "grpc_port": args.grpc_port,
        "metrics_port": args.metrics_port,
        "debug": False,  # also turns the per-request access log off (as in the gateway)
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    for name, path in args.models.items():
        model_dir = folder / name
        model_dir.mkdir()
        model_settings = {
            "name": name,
            "implementation": "bench.peers.adapters.mlserver_model.OnnxRuntimeModel",
            "parameters": {"uri": path},
            "max_batch_size": args.max_batch_size,
            "max_batch_time": max(args.max_delay_us, 1000) / 1e6,
        }
        (model_dir / "model-settings.json").write_text(json.dumps(model_settings))
    mlserver = str(Path(sys.executable).parent / "mlserver")
    os.execv(mlserver, [mlserver, "start", str(folder)])


if __name__ == "__main__":
    main()
