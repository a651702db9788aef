"""drift: inline feature-drift monitoring for served models (DRIFT.md).

``kernels`` counts request values into bins (numba, request path), ``profile`` builds and stores
reference profiles, ``stats`` turns counts into statistics and verdicts, and ``monitor`` ties
them into per-model sliding windows and reports. Importing this package imports numba only
through ``kernels``; import the submodules directly.
"""

from __future__ import annotations

__all__: list[str] = []
