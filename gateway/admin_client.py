"""admin_client.py: the ``gateway admin ...`` command line, a thin client of the admin API.

In: argv, the environment (``GATEWAY_ADMIN_URL``, ``GATEWAY_ADMIN_TOKEN``) and an optional
``--token-file``. Out: the server's JSON (``--json``) or a short table on stdout, the server's
error message on stderr, and an exit status: 0 on success, 1 on an HTTP or connection error
(or a failed audit verification), 2 on bad usage. The token is never a flag, so it stays out of
shell history and process listings. Standard library only; imports nothing from the server.
"""

from __future__ import annotations

import argparse
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway admin",
        description=f"Rollout control through the admin API. The token comes from ${TOKEN_ENV} "
        "or --token-file.",
    )
    parser.add_argument("--url", help=f"admin API base URL (${URL_ENV}, default {DEFAULT_URL})")
    parser.add_argument("--token-file", help="read the bearer token from this file")
    parser.add_argument("--cacert", help="PEM CA bundle to verify an https admin URL")
    parser.add_argument("--cert", help="PEM client certificate (admin listener with mTLS)")
    parser.add_argument("--key", help="PEM key of --cert (if not inside it)")
    parser.add_argument("--json", action="store_true", help="print the server's JSON as is")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text)

    p = command("status", "show all rollouts, or one model's rollout")
    p.add_argument("model", nargs="?")
    command("models", "list models, versions, readiness and weights")
    command("routes", "show the route weights set through the control plane")
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
    p.add_argument("--reason", default="")
    p = command("audit", "show the audit trail, newest first")
    p.add_argument("--model")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--since", type=float, help="unix seconds")
    command("verify-audit", "check the audit trail's hash chain")
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


def _show(command: str, result: Any, out: TextIO) -> None:
    if command == "status":
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
    elif command == "verify-audit":
        verdict = "OK" if result["ok"] else f"BROKEN at seq {result['first_bad_seq']}"
        out.write(f"{verdict}: {result['reason']} ({result['checked']} entries checked; ")
        out.write(f"head seq {result['head_seq']} hash {result['head_hash']})\n")
    else:
        out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")


def _request(args: argparse.Namespace) -> tuple[str, str, object | None]:
    """(method, path under /admin/v1, body) for the parsed command."""
    quote = urllib.parse.quote
    c = args.command
    if c == "status":
        return "GET", f"/rollouts/{quote(args.model, safe='')}" if args.model else "/rollouts", None
    if c in ("models", "routes"):
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
