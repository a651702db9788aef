"""BentoML adapter: runs ``bentoml serve`` on the service in ``bentoml_service`` with the
ONNX paths passed through the environment, HTTP on 127.0.0.1. BentoML's worker calls
setsid, so the harness stops it by the PIDs it recorded, not only by process group.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.peers.adapters._common import LOOPBACK, parse_args


def main() -> None:
    args = parse_args(__doc__ or "")
    os.environ["BENCH_MODELS"] = ",".join(f"{k}={v}" for k, v in args.models.items())
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    bentoml = str(Path(sys.executable).parent / "bentoml")
    os.execv(
        bentoml,
        [
            bentoml,
            "serve",
            "bench.peers.adapters.bentoml_service:OnnxService",
            "--host",
            LOOPBACK,
            "--port",
            str(args.http_port),
            "--working-dir",
            os.getcwd(),
        ],
    )


if __name__ == "__main__":
    main()
