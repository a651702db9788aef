"""One small server script per peer, each serving the same ONNX files with onnxruntime.

Each runs with its peer's own interpreter (bench/.peers/<peer>/bin/python -m
bench.peers.adapters.<peer>_server, from the repository root) and imports only the peer's
libraries, numpy, onnxruntime and ``_common``; never the gateway. Peer imports carry
``# type: ignore[import-not-found]`` because the project venv that runs mypy lacks them.
"""
