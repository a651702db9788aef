"""Per-peer virtual environments under bench/.peers/<peer>/ with pinned versions.

Each peer gets its own venv (their dependency pins clash with each other and with the
gateway's: PyTriton and tritonclient want numpy < 2, MLServer wants uvloop < 0.22, KServe
and MLServer ship conflicting ``inference.*`` protobuf symbols). An install is cached: a
marker file records the exact requirement list, and a venv whose marker matches is reused.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

__all__ = ["PEERS", "PEER_DIR", "REQUIREMENTS", "ensure", "ensure_all", "is_installed", "python"]

logger = logging.getLogger(__name__)

ROOT: Final = Path(__file__).resolve().parents[2]
PEER_DIR: Final = ROOT / "bench" / ".peers"

# The same onnxruntime build as the gateway's venv wherever the peer's pins allow it, so the
# model call costs the same everywhere (PEERS.md: per-request overhead dominates anyway).
_ORT: Final = "onnxruntime==1.32.0"

REQUIREMENTS: Final[dict[str, list[str]]] = {
    # A real tritonserver 2.51 inside the wheel; its Python stub links libpython3.11.
    "pytriton": ["nvidia-pytriton==0.7.0", _ORT],
    "kserve": ["kserve==0.21.0", _ORT],
    # uvloop 0.22+ kills MLServer 1.7's inference workers at start (PEERS.md).
    "mlserver": ["mlserver==1.7.1", "uvloop<0.22", _ORT],
    "ray": ["ray[serve]==2.60.0", _ORT],
    "bentoml": ["bentoml==1.4.40", _ORT],
}
PEERS: Final = tuple(REQUIREMENTS)


def venv(peer: str) -> Path:
    return PEER_DIR / peer


def python(peer: str) -> Path:
    """The peer venv's interpreter (a symlink to the same base Python as the gateway's)."""
    return venv(peer) / "bin" / "python"


def _marker(peer: str) -> Path:
    return venv(peer) / ".bench-installed"


def _wanted(peer: str) -> str:
    return "\n".join(REQUIREMENTS[peer]) + "\n"


def is_installed(peer: str) -> bool:
    marker = _marker(peer)
    return marker.exists() and marker.read_text() == _wanted(peer)


def ensure(peer: str) -> Path:
    """Create bench/.peers/<peer> and install its pinned requirements unless cached.

    Blocks for the pip run (a minute or more; PyTriton's wheel is large). Raises
    ``RuntimeError`` with pip's last output when the install fails. Returns the interpreter.
    """
    if is_installed(peer):
        return python(peer)
    target = venv(peer)
    target.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    log = target.parent / f"{peer}.install.log"
    with log.open("w") as out:
        steps = [
            [base, "-m", "venv", "--clear", str(target)],
            [str(python(peer)), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
            [str(python(peer)), "-m", "pip", "install", *REQUIREMENTS[peer]],
        ]
        for step in steps:
            done = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, check=False)
            if done.returncode != 0:
                raise RuntimeError(
                    f"installing {peer} failed ({done.returncode}); see {log}:\n"
                    + log.read_text()[-2000:]
                )
    _marker(peer).write_text(_wanted(peer))
    return python(peer)


def ensure_all(peers: list[str], parallel: int = 3) -> dict[str, str]:
    """Install the missing peers, ``parallel`` pip runs at a time (downloads dominate).

    Returns {peer: error message} for the peers that failed; the others are ready.
    """
    missing = [p for p in peers if not is_installed(p)]
    failures: dict[str, str] = {}
    if not missing:
        return failures
    logger.info("installing peers: %s", ", ".join(missing))

    def one(peer: str) -> None:
        try:
            ensure(peer)
            logger.info("installed %s", peer)
        except RuntimeError as exc:
            failures[peer] = str(exc)
            logger.error("%s", exc)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, missing))
    return failures


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = ensure_all(sys.argv[1:] or list(PEERS))
    sys.exit(1 if failed else 0)
