"""admin_client.py: the ``gateway admin ...`` command line, a thin client of the admin API.

In: argv, the environment (``GATEWAY_ADMIN_URL``, ``GATEWAY_ADMIN_TOKEN``; never read as
server settings) and an optional ``--token-file``. Common options go before or after the
command. Out: the server's JSON (``--json``), a short table, or one line per write command
on stdout (``status --watch`` repeats the table; ``diff``/``apply`` print one line per
change, see ``admin_apply``), the server's error message on stderr, and an exit status: 0
on success, 1 on an HTTP or connection error (or a failed audit verification, or changes
pending for ``diff``), 2 on bad usage. The token is never a flag, so it stays out of shell
history and process listings. Standard library only; imports nothing from the server.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, Final, TextIO

__all__ = ["DEFAULT_URL", "URL_ENV", "TOKEN_ENV", "AdminClientError", "AdminClient", "main"]

DEFAULT_URL: Final = "http://127.0.0.1:8002"
URL_ENV: Final = "GATEWAY_ADMIN_URL"
TOKEN_ENV: Final = "GATEWAY_ADMIN_TOKEN"
PREFIX: Final = "/admin/v1"
TIMEOUT_S: Final = 30.0  # a verify-audit over a long trail is the slowest call


class AdminClientError(Exception):
    """An admin call failed: ``status`` is the HTTP status (0 when nothing answered)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminClient:
    """Calls the admin API with a bearer token. Raises ``AdminClientError``."""

    def __init__(
        self,
        url: str,
        token: str,
        timeout_s: float = TIMEOUT_S,
        *,
        cacert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AdminClientError(0, f"admin URL must be http(s)://host[:port], not {url!r}")
        self.base = url.rstrip("/")
        self.is_local = _is_loopback(parts.hostname)
        self.is_plaintext_remote = parts.scheme == "http" and not self.is_local
        self._token = token
        self._timeout_s = timeout_s
        # A local admin port must not be reached through an HTTP proxy that would see the token.
        handlers: list[urllib.request.BaseHandler] = (
            [urllib.request.ProxyHandler({})] if self.is_local else []
        )
        if parts.scheme == "https":
            # --cacert: trust this CA (a private one); --cert/--key: a client certificate
            # for an admin listener that requires one (mTLS).
            try:
                context = ssl.create_default_context(cafile=cacert)
                if cert:
                    context.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                raise AdminClientError(0, f"cannot load TLS files: {exc}") from None
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    def call(self, method: str, path: str, body: object | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + PREFIX + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self._token}",
                "Accept": "application/json",
                "Content-Type": "application/json",
            },
        )
        try:
            with self._opener.open(request, timeout=self._timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                message = str(json.loads(raw)["error"])
            except (ValueError, KeyError, TypeError):
                message = raw.decode(errors="replace")[:200] or exc.reason
            raise AdminClientError(exc.code, message) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminClientError(0, f"cannot reach {self.base}: {reason}") from None
        return json.loads(raw) if raw else None


def _weights(pairs: Sequence[str]) -> dict[str, float]:
    weights: dict[str, float] = {}
    for pair in pairs:
        version, sep, value = pair.partition("=")
        try:
            if not sep or not version:
                raise ValueError(pair)
            weights[version] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected VERSION=WEIGHT, got {pair!r}") from None
    return weights


def _steps(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"steps must be numbers like 5,25,50,100: {text!r}"
        ) from None


def since(text: str, now: float | None = None) -> float:
    """Unix seconds from a human ``--since``: an age (``90s``, ``10m``, ``2h``, ``7d``), an
    ISO 8601 time (``2026-12-03T04:00:00Z``; no zone means UTC) or unix seconds."""
    now = time.time() if now is None else now
    text = text.strip()
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    if text[-1:].lower() in units:
        try:
            return now - float(text[:-1]) * units[text[-1].lower()]
        except ValueError:
            pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since takes an age (10m, 2h, 1d), an ISO time or unix seconds, not {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


# Policy thresholds settable from ``start`` (flag -> field of policy.thresholds). Any other
# field goes through --threshold NAME=VALUE, so new thresholds need no new flag.
THRESHOLD_FLAGS: Final = (
    ("--max-error-rate", "max_error_rate", "candidate error rate (0..1)"),
    ("--max-error-rate-delta", "max_error_rate_delta", "candidate minus stable error rate"),
    ("--max-p99-ratio", "max_p99_latency_ratio", "candidate p99 / stable p99"),
    ("--max-input-drift-psi", "max_input_drift_psi", "worst input PSI vs the reference"),
    ("--max-input-drift-ks", "max_input_drift_ks", "worst input KS vs the reference"),
    ("--max-prediction-drift-psi", "max_prediction_drift_psi", "output PSI vs stable"),
    ("--max-shadow-disagreement", "max_shadow_disagreement", "shadow disagreement (0..1)"),
    ("--worse-pvalue", "candidate_worse_pvalue", "roll back when outcomes are worse at p <="),
)


_UNSET: Final = object()


def _threshold_value(text: str) -> float | bool | None:
    low = text.strip().lower()
    if low in ("none", "off", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"threshold values are numbers, true, false or none, not {text!r}"
        ) from None


def _threshold_pair(text: str) -> tuple[str, float | bool | None]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), _threshold_value(value)


def _common(parser: argparse.ArgumentParser, top: bool) -> None:
    """The options every command takes, before or after the command name."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--url", default=default, help=f"admin API base URL (${URL_ENV}, default {DEFAULT_URL})"
    )
    parser.add_argument("--token-file", default=default, help="read the bearer token from a file")
    parser.add_argument(
        "--cacert", default=default, help="PEM CA bundle to verify an https admin URL"
    )
    parser.add_argument(
        "--cert", default=default, help="PEM client certificate (admin listener with mTLS)"
    )
    parser.add_argument("--key", default=default, help="PEM key of --cert (if not inside it)")
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="print the server's JSON (write commands print one summary line without it)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway admin",
        description=f"Rollout control through the admin API. The token comes from ${TOKEN_ENV} "
        "or --token-file. `gateway admin token --help`: tokens on the server's machine.",
    )
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p, top=False)
        return p

    p = command("status", "show all rollouts, or one model's rollout")
    p.add_argument("model", nargs="?")
    p.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until interrupted",
    )
    p.add_argument("--count", type=int, help="with --watch: stop after this many refreshes")
    command("models", "list models, versions, readiness and weights")
    command("routes", "show the route weights set through the control plane")
    command("fleet", "list the replicas sharing the control plane and which one leads")
    for name, help_text, needs_reason in (
        ("rollback", "send all traffic back to the stable version now", True),
        ("promote", "send all traffic to the candidate now", True),
        ("approve", "approve a rollout waiting at the approval gate", False),
        ("pause", "hold a canary's weights and stop evaluating it", False),
        ("resume", "resume a paused canary at its current step", False),
    ):
        p = command(name, help_text)
        p.add_argument("model")
        p.add_argument("--reason", required=needs_reason, default="")
    p = command("weights", "set a model's route weights by hand")
    p.add_argument("model")
    p.add_argument("pairs", nargs="+", metavar="V=W", help="version=weight, e.g. 1=90 2=10")
    p.add_argument("--reason", required=True)
    p = command("start", "start a canary rollout")
    p.add_argument("model")
    p.add_argument("--stable", required=True)
    p.add_argument("--candidate", required=True)
    p.add_argument("--steps", type=_steps, help="candidate weights in percent, e.g. 5,25,50,100")
    p.add_argument("--step-seconds", type=float, help="minimum seconds per step")
    p.add_argument("--step-requests", type=int, help="or this many candidate requests")
    p.add_argument("--approval", action="store_true", help="wait for approval before 100%%")
    p.add_argument("--min-samples", type=int, help="candidate samples before any verdict")
    p.add_argument(
        "--consecutive-failures", type=int, help="failing evaluations in a row before rollback"
    )
    p.add_argument("--evaluation-interval", type=float, help="seconds between evaluations")
    for flag, field, help_text in THRESHOLD_FLAGS:
        p.add_argument(
            flag,
            dest=f"t_{field}",
            type=_threshold_value,
            default=_UNSET,
            metavar="VALUE",
            help=f"{help_text}; none turns the check off",
        )
    p.add_argument(
        "--promote-requires-not-worse",
        action="store_true",
        help="promote only once an outcome comparison exists and is not worse",
    )
    p.add_argument(
        "--threshold",
        action="append",
        type=_threshold_pair,
        default=[],
        metavar="NAME=VALUE",
        help="any policy threshold by its field name (repeatable)",
    )
    p.add_argument("--reason", default="")
    p = command("audit", "show the audit trail, newest first")
    p.add_argument("--model")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--since", type=since, help="10m, 2h, 1d, an ISO time or unix seconds")
    command("verify-audit", "check the audit trail's hash chain")
    for name, help_text in (
        ("diff", "show what applying a rollout/route spec file would change"),
        ("apply", "make routes and rollouts match a spec file (idempotent)"),
    ):
        p = command(name, help_text)
        p.add_argument("-f", "--file", required=True, metavar="FILE", help="TOML spec file")
        p.add_argument("--reason", default="", help="recorded in the audit trail")
    return parser


def _when(ts: object) -> str:
    if not isinstance(ts, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


def _table(rows: list[list[str]], out: TextIO) -> None:
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


def _rollout_rows(states: list[dict[str, Any]]) -> list[list[str]]:
    rows = [["MODEL", "STATUS", "STABLE", "CANDIDATE", "WEIGHT", "STEP", "FAILS", "LAST"]]
    for s in states:
        last = s.get("last_evaluation") or {}
        steps = s.get("policy", {}).get("steps", [])
        rows.append(
            [
                str(s["model"]),
                str(s["status"]),
                str(s["stable_version"]),
                str(s["candidate_version"]),
                f"{s['candidate_weight']:g}%",
                f"{min(s['step_index'] + 1, len(steps))}/{len(steps)}",
                str(s["consecutive_failures"]),
                str(last.get("reason", s.get("reason", "")))[:80],
            ]
        )
    return rows


WRITE_COMMANDS: Final = frozenset(
    {"start", "rollback", "promote", "approve", "pause", "resume", "weights"}
)


def _summary(command: str, result: Any) -> str:
    """One line saying what a write command left behind."""
    if command == "weights":
        variants = result.get("variants", []) if isinstance(result, dict) else []
        split = " ".join(f"{v['version']}={v['weight']:g}" for v in variants)
        return f"{result.get('model', '?')}: weights {split or '-'}"
    s = result
    steps = s.get("policy", {}).get("steps", [])
    step = f"step {min(s['step_index'] + 1, len(steps))}/{len(steps)}"
    return (
        f"{s['model']}: {s['status']}, stable {s['stable_version']}, candidate "
        f"{s['candidate_version']} at {s['candidate_weight']:g}% ({step})"
    )


def _show(command: str, result: Any, out: TextIO) -> None:
    if command in WRITE_COMMANDS:
        out.write(_summary(command, result) + "\n")
    elif command == "status":
        states = result["rollouts"] if isinstance(result, dict) and "rollouts" in result else None
        _table(_rollout_rows(states if states is not None else [result]), out)
    elif command == "audit":
        rows = [["SEQ", "TIME", "ACTOR", "ACTION", "MODEL", "REASON"]]
        for e in result["entries"]:
            rows.append(
                [
                    str(e["seq"]),
                    _when(e["ts"]),
                    str(e["actor"]),
                    str(e["action"]),
                    str(e["model"]),
                    str(e["reason"])[:80],
                ]
            )
        _table(rows, out)
    elif command == "models":
        rows = [["MODEL", "VERSIONS", "WEIGHTS", "ROLLOUT"]]
        for m in result["models"]:
            versions = " ".join(
                f"{v['version']}({'ready' if v['ready'] else v['state'].lower()})"
                for v in m["versions"]
            )
            weights = m.get("weights") or {}
            shown = " ".join(f"{k}={v:g}" for k, v in weights.items()) or "-"
            rows.append([str(m["name"]), versions, shown, str(m.get("rollout") or "-")])
        _table(rows, out)
    elif command == "fleet":
        if not result.get("shared"):
            out.write("not shared: this gateway is one process with its own store\n")
            return
        rows = [["REPLICA", "ADDRESS", "ALIVE", "HEARTBEAT", "LEADER", "LAG"]]
        for r in result["replicas"]:
            lag = "-" if r["lag_s"] is None else f"{r['lag_s']:.3f}s"
            alive = "yes" if r["alive"] else "no"
            who = str(r["id"]) + (" (this)" if r["is_self"] else "")
            leader = "leader" if r["is_leader"] else ""
            rows.append(
                [who, str(r["address"]), alive, f"{r['heartbeat_age_s']:.1f}s ago", leader, lag]
            )
        _table(rows, out)
    elif command == "verify-audit":
        verdict = "OK" if result["ok"] else f"BROKEN at seq {result['first_bad_seq']}"
        out.write(f"{verdict}: {result['reason']} ({result['checked']} entries checked; ")
        out.write(f"head seq {result['head_seq']} hash {result['head_hash']})\n")
    else:
        out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")


def _watch(client: AdminClient, args: argparse.Namespace, path: str, out: TextIO) -> int:
    """``status --watch``: the table again every ``args.watch`` seconds (JSON lines with
    --json), until interrupted or ``--count`` refreshes."""
    shown = 0
    try:
        while args.count is None or shown < args.count:
            if shown:
                time.sleep(max(args.watch, 0.1))
            result = client.call("GET", path)
            if args.json:
                out.write(json.dumps(result, sort_keys=True) + "\n")
            else:
                out.write(f"-- {_when(time.time())}\n")
                _show("status", result, out)
            out.flush()
            shown += 1
    except KeyboardInterrupt:
        pass
    return 0


def _request(args: argparse.Namespace) -> tuple[str, str, object | None]:
    """(method, path under /admin/v1, body) for the parsed command."""
    quote = urllib.parse.quote
    c = args.command
    if c == "status":
        return "GET", f"/rollouts/{quote(args.model, safe='')}" if args.model else "/rollouts", None
    if c in ("models", "routes", "fleet"):
        return "GET", f"/{c}", None
    if c in ("rollback", "promote", "approve", "pause", "resume"):
        return "POST", f"/rollouts/{quote(args.model, safe='')}/{c}", {"reason": args.reason}
    if c == "weights":
        body = {"weights": _weights(args.pairs), "reason": args.reason}
        return "PUT", f"/routes/{quote(args.model, safe='')}/weights", body
    if c == "start":
        policy: dict[str, object] = {"require_approval": args.approval}
        if args.steps is not None:
            policy["steps"] = args.steps
        if args.step_seconds is not None:
            policy["step_duration_s"] = args.step_seconds
        if args.step_requests is not None:
            policy["step_requests"] = args.step_requests
        for option, field in (
            ("min_samples", "min_samples"),
            ("consecutive_failures", "consecutive_failures"),
            ("evaluation_interval", "evaluation_interval_s"),
        ):
            if getattr(args, option) is not None:
                policy[field] = getattr(args, option)
        thresholds: dict[str, object] = {}
        for _, field, _ in THRESHOLD_FLAGS:
            if getattr(args, f"t_{field}") is not _UNSET:
                thresholds[field] = getattr(args, f"t_{field}")
        if args.promote_requires_not_worse:
            thresholds["promote_requires_not_worse"] = True
        thresholds.update(dict(args.threshold))
        if thresholds:
            policy["thresholds"] = thresholds
        body = {
            "model": args.model,
            "stable": args.stable,
            "candidate": args.candidate,
            "policy": policy,
            "reason": args.reason,
        }
        return "POST", "/rollouts", body
    if c == "audit":
        query = {"limit": str(args.limit)}
        if args.model:
            query["model"] = args.model
        if args.since is not None:
            query["since"] = str(args.since)
        return "GET", "/audit?" + urllib.parse.urlencode(query), None
    if c in ("apply", "diff"):
        return "GET", "/rollouts", None  # run_spec makes its own calls
    return "GET", "/audit/verify", None  # verify-audit


def main(
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run one admin command; returns the exit status (see the module docstring)."""
    env = os.environ if env is None else env
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        method, path, body = _request(args)
    except SystemExit as exc:  # argparse already wrote the usage message
        return int(exc.code or 0)
    except argparse.ArgumentTypeError as exc:
        err.write(f"gateway admin: {exc}\n")
        return 2
    token = env.get(TOKEN_ENV, "")
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            err.write(f"gateway admin: cannot read token file: {exc.strerror}\n")
            return 2
    if not token:
        err.write(f"gateway admin: set {TOKEN_ENV} or pass --token-file\n")
        return 2
    url = args.url or env.get(URL_ENV) or DEFAULT_URL
    try:
        client = AdminClient(url, token, cacert=args.cacert, cert=args.cert, key=args.key)
        if client.is_plaintext_remote:
            err.write(f"gateway admin: warning: sending the token in clear text to {url}\n")
        if args.command in ("apply", "diff"):
            from gateway.admin_apply import SpecError, run_spec

            try:
                return run_spec(
                    client, args.file, args.command == "apply", args.reason, args.json, out
                )
            except SpecError as exc:
                err.write(f"gateway admin: {exc}\n")
                return 2
        if args.command == "status" and args.watch is not None:
            return _watch(client, args, path, out)
        result = client.call(method, path, body)
    except AdminClientError as exc:
        status = f"HTTP {exc.status}: " if exc.status else ""
        err.write(f"gateway admin: {status}{exc.message}\n")
        return 1
    if args.json:
        out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    else:
        _show(args.command, result, out)
    if args.command == "verify-audit" and not result.get("ok", False):
        return 1
    return 0
