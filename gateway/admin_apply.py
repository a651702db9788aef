"""admin_apply.py: rollouts and routes kept in a file (``gateway admin diff|apply -f FILE``).

In: a TOML spec of desired route weights and rollouts, and the admin API (through
``admin_client.AdminClient``). Out: the changes that would make the gateway match the spec,
printed one per line (or as JSON), and with ``apply`` those changes made through the same
API calls an operator would use, so the audit trail records each one. Applying a spec twice
changes nothing the second time: a rollout that already ran with the same versions and
policy (whatever its outcome) is left alone, and route weights that already match (as
shares) are not set again. Standard library only.

Spec::

    [routes.fraud]                      # weights for a model with no rollout
    weights = { "3" = 100 }

    [rollouts.breast_cancer]
    stable = "1"
    candidate = "2"
    reason = "retrained on November data"
    [rollouts.breast_cancer.policy]     # any RolloutPolicy field; left out: the default
    steps = [5, 25, 50, 100]
    step_duration_s = 300
    [rollouts.breast_cancer.policy.thresholds]
    max_input_drift_psi = 0.25

Exit status: 0 when nothing differs (diff) or everything was applied (apply), 1 when diff
found changes or a change conflicts with an active rollout, 2 for an invalid spec.
"""

from __future__ import annotations

import json
import math
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TextIO

__all__ = ["SpecError", "Change", "plan", "run_spec", "load_spec", "check_spec", "outcome"]

ACTIVE: Final = frozenset({"canary", "paused", "awaiting_approval"})
_ROLLOUT_KEYS: Final = frozenset({"stable", "candidate", "policy", "reason"})


class SpecError(Exception):
    """The spec file is unreadable or invalid; the message names the entry."""


class Caller(Protocol):
    def call(self, method: str, path: str, body: object | None = None) -> Any: ...


@dataclass(frozen=True, slots=True)
class Change:
    model: str
    kind: str  # "route" or "rollout"
    action: str  # "unchanged", "set", "start" or "conflict"
    detail: str
    request: tuple[str, str, object] | None = field(default=None, compare=False)


def load_spec(path: str | Path) -> dict[str, Any]:
    try:
        spec = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path} is not valid TOML: {exc}") from None
    check_spec(spec, f"{path}: ")
    return spec


def check_spec(spec: Any, where: str = "") -> None:
    """Raise ``SpecError`` (prefixed with ``where``) unless ``spec`` is a valid spec."""
    if not isinstance(spec, dict):
        raise SpecError(f"{where}a spec is a table with routes and rollouts")
    unknown = set(spec) - {"routes", "rollouts"}
    if unknown:
        raise SpecError(f"{where}unknown section(s) {', '.join(sorted(unknown))}")
    for section in ("routes", "rollouts"):
        if not isinstance(spec.get(section, {}), dict):
            raise SpecError(f"{where}{section} must be a table keyed by model")
    for model, route in spec.get("routes", {}).items():
        weights = route.get("weights") if isinstance(route, dict) else None
        if not isinstance(weights, dict) or set(route) - {"weights", "reason"}:
            raise SpecError(f"{where}routes.{model} takes weights = {{version = weight}}")
        for version, weight in weights.items():
            if not isinstance(weight, int | float) or weight < 0 or not math.isfinite(weight):
                raise SpecError(f"{where}routes.{model}.weights.{version} must be >= 0")
        if not sum(weights.values()) > 0:
            raise SpecError(f"{where}routes.{model}.weights must not all be 0")
    for model, rollout in spec.get("rollouts", {}).items():
        if not isinstance(rollout, dict):
            raise SpecError(f"{where}rollouts.{model} must be a table")
        if set(rollout) - _ROLLOUT_KEYS:
            extra = ", ".join(sorted(set(rollout) - _ROLLOUT_KEYS))
            raise SpecError(f"{where}rollouts.{model}: unknown key(s) {extra}")
        for key in ("stable", "candidate"):
            if not isinstance(rollout.get(key), str | int):
                raise SpecError(f'{where}rollouts.{model}.{key} must name a version ("1")')
        if not isinstance(rollout.get("policy", {}), dict):
            raise SpecError(f"{where}rollouts.{model}.policy must be a table")
        if model in spec.get("routes", {}):
            raise SpecError(f"{where}{model} is in routes and rollouts; the rollout sets weights")


def _shares(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values()) or 1.0
    return {v: round(w / total, 9) for v, w in weights.items() if w > 0}


def _shown(weights: dict[str, float]) -> str:
    return " ".join(f"{v}={w:g}" for v, w in sorted(weights.items())) or "-"


def _same_policy(wanted: dict[str, Any], current: dict[str, Any]) -> bool:
    """Every field the spec names equals the running policy's (others keep defaults)."""
    for key, value in wanted.items():
        have = current.get(key)
        if isinstance(value, dict):
            if not isinstance(have, dict) or not _same_policy(value, have):
                return False
        elif isinstance(value, list | tuple):
            if not isinstance(have, list | tuple) or [float(x) for x in value] != [
                float(x) for x in have
            ]:
                return False
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if not isinstance(have, int | float) or float(have) != float(value):
                return False
        elif have != value:
            return False
    return True


def plan(client: Caller, spec: dict[str, Any], reason: str = "") -> list[Change]:
    """The changes that make the gateway match ``spec`` (nothing is changed here)."""
    quote = urllib.parse.quote
    rollouts = {s["model"]: s for s in client.call("GET", "/rollouts")["rollouts"]}
    routes = client.call("GET", "/routes")["routes"]
    changes: list[Change] = []
    for model, entry in sorted(spec.get("routes", {}).items()):
        wanted = {str(v): float(w) for v, w in entry["weights"].items()}
        route = routes.get(model) or {}
        have = {str(v["version"]): float(v["weight"]) for v in route.get("variants", [])}
        active = rollouts.get(model, {}).get("status") in ACTIVE
        if _shares(have) == _shares(wanted):
            changes.append(Change(model, "route", "unchanged", _shown(have)))
        elif active:
            detail = f"a rollout is {rollouts[model]['status']}; it owns the weights"
            changes.append(Change(model, "route", "conflict", detail))
        else:
            body = {"weights": wanted, "reason": entry.get("reason", reason) or "applied spec"}
            request = ("PUT", f"/routes/{quote(model, safe='')}/weights", body)
            detail = f"{_shown(have)} -> {_shown(wanted)}"
            changes.append(Change(model, "route", "set", detail, request))
    for model, entry in sorted(spec.get("rollouts", {}).items()):
        stable, candidate = str(entry["stable"]), str(entry["candidate"])
        policy = dict(entry.get("policy", {}))
        state = rollouts.get(model)
        what = f"{stable} -> {candidate}"
        if (
            state is not None
            and (state["stable_version"], state["candidate_version"]) == (stable, candidate)
            and _same_policy(policy, state.get("policy", {}))
        ):
            detail = f"{what}, {state['status']} at {state['candidate_weight']:g}%"
            changes.append(Change(model, "rollout", "unchanged", detail))
        elif state is not None and state["status"] in ACTIVE:
            running = f"{state['stable_version']} -> {state['candidate_version']}"
            detail = f"rollout {running} is {state['status']} and differs; roll it back first"
            changes.append(Change(model, "rollout", "conflict", detail))
        else:
            body = {
                "model": model,
                "stable": stable,
                "candidate": candidate,
                "policy": policy,
                "reason": entry.get("reason", reason) or "applied spec",
            }
            steps = ",".join(f"{s:g}" for s in policy.get("steps", [])) or "default"
            changes.append(
                Change(
                    model, "rollout", "start", f"{what}, steps {steps}", ("POST", "/rollouts", body)
                )
            )
    return changes


def outcome(client: Caller, spec: dict[str, Any], apply: bool, reason: str = "") -> dict[str, Any]:
    """Plan ``spec`` and, with ``apply`` and no conflict, make the changes. Returns
    ``{"changes": [{model, kind, action, detail}], "applied": bool}``."""
    changes = plan(client, spec, reason)
    conflicts = any(c.action == "conflict" for c in changes)
    applied = bool(apply and not conflicts)
    if applied:
        for change in changes:
            if change.request is not None:
                client.call(*change.request)
    rows = [
        {"model": c.model, "kind": c.kind, "action": c.action, "detail": c.detail} for c in changes
    ]
    return {"changes": rows, "applied": applied}


def run_spec(
    client: Caller, path: str, apply: bool, reason: str, as_json: bool, out: TextIO
) -> int:
    """``diff`` (apply=False) or ``apply`` of the spec at ``path``; the exit status."""
    result = outcome(client, load_spec(path), apply, reason)
    rows = result["changes"]
    applied = result["applied"]
    conflicts = [r for r in rows if r["action"] == "conflict"]
    pending = [r for r in rows if r["action"] in ("set", "start")]
    if as_json:
        out.write(json.dumps(result, sort_keys=True) + "\n")
    else:
        marks = {"unchanged": "=", "set": "~", "start": "+", "conflict": "!"}
        for r in rows:
            out.write(f"{marks[r['action']]} {r['kind']} {r['model']}: {r['detail']}\n")
        if apply:
            verdict = "applied" if applied else "nothing applied (conflicts)"
            out.write(f"{verdict}: {len(pending) if applied else 0} change(s)\n")
        else:
            out.write(f"{len(pending)} change(s), {len(conflicts)} conflict(s)\n")
    if conflicts:
        return 1
    return 1 if (pending and not apply) else 0
