"""cli.py: command line -> Settings -> app.run(). Nothing else.

``gateway serve`` serves a model repository (the bundled examples by default); ``gateway
admin token ...`` keeps the admin tokens of the data dir; other ``gateway admin`` commands go
to the admin API's client. Numba's compiled-kernel cache goes to a user cache folder
(``$NUMBA_CACHE_DIR``, else ``$XDG_CACHE_HOME/onnx-v2-gateway/numba``), set before anything
imports numba, so no cache file is ever written inside the installed package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.config import ConfigError, load_settings

__all__ = ["main", "numba_cache_dir"]

CACHE_NAME = "onnx-v2-gateway"


def numba_cache_dir(env: dict[str, str] | os._Environ[str] | None = None) -> Path:
    """Where numba keeps compiled kernels: ``$NUMBA_CACHE_DIR``, else the XDG user cache."""
    env = os.environ if env is None else env
    if env.get("NUMBA_CACHE_DIR"):
        return Path(env["NUMBA_CACHE_DIR"])
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / CACHE_NAME / "numba"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Serve ONNX models over KServe V2 HTTP and gRPC.",
        epilog="Every setting can also come from the environment: GATEWAY_<FIELD>, nested "
        "fields joined by a double underscore (GATEWAY_HTTP__PORT=9000); arrays and tables "
        "as TOML or JSON. GATEWAY_ADMIN_TOKEN and GATEWAY_ADMIN_URL belong to `gateway "
        "admin` and are never settings.",
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve a model repository",
        description="Serve a model repository over HTTP and gRPC until SIGTERM.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML settings file")
    serve.add_argument(
        "--model-repository",
        metavar="DIR",
        help="folder of <model>/<version>/model.onnx (default: the bundled examples)",
    )
    serve.add_argument("--host", help="address for both listeners (default 0.0.0.0)")
    serve.add_argument("--http-port", type=int, help="HTTP port (default 8000; 0 = any)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 8001; 0 = any)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="serving processes sharing the ports and one control plane (default 1)",
    )
    profile = sub.add_parser(
        "profile",
        help="reference profiles for drift monitoring",
        description="Build a model's reference profile from a reference sample.",
    )
    profile_sub = profile.add_subparsers(dest="profile_command", metavar="ACTION", required=True)
    build = profile_sub.add_parser(
        "build",
        help="build and save a profile",
        description="Run the sample through the model, profile its inputs and outputs "
        "(quantile bins, ties removed) and save <repo>/<model>/profile.npz (all versions "
        "share it, so canary and stable compare on one binning).",
    )
    build.add_argument("--model", required=True, help="model name in the repository")
    build.add_argument(
        "--version",
        default="",
        help="version whose outputs are profiled (default: the lowest, usually the stable one)",
    )
    build.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help=".npy, .npz or .csv reference sample (50k rows or more is best)",
    )
    build.add_argument(
        "--model-repository",
        metavar="DIR",
        help="repository folder (default: the bundled examples)",
    )
    build.add_argument(
        "--output",
        metavar="FILE",
        help="where to save (default: <repo>/<model>/profile.npz when --model-repository is "
        "given, else ./<model>.profile.npz, never inside the installed package)",
    )
    build.add_argument("--bins", type=int, default=20, help="bins per numeric feature")
    sub.add_parser(
        "admin",
        help="operate rollouts and routes through the admin API (gateway admin --help)",
        add_help=False,
    )
    check = sub.add_parser(
        "check-config",
        help="validate a settings file without serving",
        description="Load and validate a settings file (and GATEWAY_* overrides); exit 0 "
        "when valid, 2 with the reason otherwise.",
    )
    check.add_argument("file", metavar="FILE")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "numba" not in sys.modules:
        os.environ["NUMBA_CACHE_DIR"] = str(numba_cache_dir())
    if argv[:2] == ["admin", "token"]:
        return _token_main(argv[2:])
    if argv[:1] == ["admin"]:
        from gateway.admin_client import main as admin_main

        return admin_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "profile":
        return _profile_build(args)
    if args.command == "check-config":
        try:
            settings = load_settings(args.file)
        except ConfigError as exc:
            print(f"gateway: {exc.message}", file=sys.stderr)
            return 2
        print(f"{args.file}: valid (model repository {settings.repository_path()})")
        return 0
    overrides: dict[str, Any] = {}
    if args.model_repository:
        overrides["model_repository"] = args.model_repository
    if args.host:
        overrides["http.host"] = args.host
        overrides["grpc.host"] = args.host
    if args.http_port is not None:
        overrides["http.port"] = args.http_port
    if args.grpc_port is not None:
        overrides["grpc.port"] = args.grpc_port
    if args.log_level:
        overrides["log_level"] = args.log_level
    try:
        settings = load_settings(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"gateway: {exc.message}", file=sys.stderr)
        return 2
    from gateway.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format == "json")
    if args.workers != 1:
        from gateway.workers import serve_workers

        try:
            return serve_workers(settings, args.workers)
        except ConfigError as exc:
            print(f"gateway: {exc.message}", file=sys.stderr)
            return 2
    from gateway.app import run  # deferred: onnxruntime and grpc load only to serve

    try:
        run(settings)
    except ConfigError as exc:  # found at start: an unwritable data folder, bad TLS files
        print(f"gateway: {exc.message}", file=sys.stderr)
        return 2
    return 0


def _profile_build(args: argparse.Namespace) -> int:
    from gateway.config import EXAMPLE_REPOSITORY
    from gateway.drift.build import PROFILE_FILE, profile_for_model

    root = Path(args.model_repository) if args.model_repository else EXAMPLE_REPOSITORY
    model_dir = root / args.model
    versions = sorted(
        (d.name for d in model_dir.glob("*") if d.is_dir() and d.name.isdigit()), key=int
    )
    if not versions:
        print(f"gateway: no versions of model '{args.model}' under {root}", file=sys.stderr)
        return 2
    version = args.version or versions[0]
    if args.output:
        output = Path(args.output)
    elif args.model_repository:
        output = model_dir / PROFILE_FILE
    else:  # the bundled examples live in the installed package: never write there
        output = Path(f"{args.model}.profile.npz")
    try:
        profile = profile_for_model(
            model_dir / version / "model.onnx", Path(args.data), output, bins=args.bins
        )
    except (OSError, ValueError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    print(
        f"{output}: profile {profile.hash} from {profile.rows} rows, "
        f"{len(profile.inputs.names)} input features, outputs "
        f"{', '.join(profile.outputs) or 'none'} (of version {version})"
    )
    return 0


def _token_main(argv: list[str]) -> int:
    """``gateway admin token create|list|revoke``: the token file of the data dir."""
    parser = argparse.ArgumentParser(
        prog="gateway admin token",
        description="Admin tokens kept hashed in <data_dir>/admin_tokens.json (mode 0600) on "
        "the server's machine; the server picks up changes without a restart.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="settings file naming data_dir")
    common.add_argument("--data-dir", metavar="DIR", help="data dir (default: from settings)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = sub.add_parser("create", parents=[common], help="create a token; prints it once")
    create.add_argument("--name", required=True, help="who holds it (shown in the audit)")
    create.add_argument("--role", choices=("viewer", "operator"), default="operator")
    sub.add_parser("list", parents=[common], help="list tokens (names and roles, no secrets)")
    revoke = sub.add_parser("revoke", parents=[common], help="revoke a token by name")
    revoke.add_argument("name")
    args = parser.parse_args(argv)
    from gateway.admin_tokens import TOKEN_FILE, TokenFile, TokenFileError

    if args.data_dir:
        data_dir = Path(args.data_dir)
    else:
        try:
            data_dir = Path(load_settings(args.config).data_dir)
        except ConfigError as exc:
            print(f"gateway: {exc.message}", file=sys.stderr)
            return 2
    tokens = TokenFile(data_dir / TOKEN_FILE)
    try:
        if args.action == "create":
            secret = tokens.create(args.name, args.role)
            if args.json:
                print(json.dumps({"name": args.name, "role": args.role, "token": secret}))
            else:
                print(secret)
                print(
                    f"{args.role} token {args.name!r} stored hashed in {tokens.path}; it is "
                    "shown only now (export GATEWAY_ADMIN_TOKEN=<it> for gateway admin)",
                    file=sys.stderr,
                )
        elif args.action == "list":
            stored = tokens.load()
            if args.json:
                print(
                    json.dumps(
                        [{"name": t.name, "role": t.role, "created": t.created} for t in stored]
                    )
                )
            else:
                for t in stored:
                    created = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t.created))
                    print(f"{t.name}\t{t.role}\t{created}")
        else:
            tokens.revoke(args.name)
            print(json.dumps({"revoked": args.name}) if args.json else f"revoked {args.name}")
    except TokenFileError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    return 0
