"""Side-by-side benchmark of the gateway against serving peers: ``python -m bench.peers``.

Subpackage layout: ``install`` (per-peer venvs), ``servers`` (start, measure and stop a
server and its whole process tree), ``adapters/`` (one small server script per peer, run
with that peer's venv interpreter), ``__main__`` (the command). See bench/README.md.
"""
