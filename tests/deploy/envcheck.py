"""envcheck.py: load a deployment file's GATEWAY_* variables through gateway.config.

Proves that the variable names exist in ``Settings`` and that their values parse, the way
the gateway reads them at start-up. Settings still being added by the scale-out work
(``PENDING``) are set aside while ``Settings`` lacks them, and reported so a test can skip
the checks that need them; any other unknown name fails.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.config import ENV_PREFIX, Settings, load_settings

# Top-level settings that the deployment files use before every build has them:
# ``store`` (``store.url``: the Redis control plane, GATEWAY_STORE__URL).
PENDING = frozenset({"store"})


def top_field(name: str) -> str:
    return name[len(ENV_PREFIX) :].lower().split("__")[0]


def load_env(env: Mapping[str, str]) -> tuple[Settings, dict[str, str]]:
    """Settings from ``env`` (non-GATEWAY_ names ignored, as the gateway does), and the
    variables set aside because their setting is pending and not in this build."""
    fields = set(Settings.__struct_fields__)
    pending = {
        key: value
        for key, value in env.items()
        if key.startswith(ENV_PREFIX) and top_field(key) in PENDING - fields
    }
    usable = {key: value for key, value in env.items() if key not in pending}
    return load_settings(None, env=usable), pending
