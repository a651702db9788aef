"""cli.py: command line -> Settings -> app.run(). Nothing else.

``gateway serve`` serves a model repository (the bundled examples by default).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from gateway import __version__
from gateway.config import ConfigError, load_settings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Serve ONNX models over KServe V2 HTTP and gRPC.",
        epilog="Every setting can also come from the environment: GATEWAY_<FIELD>, nested "
        "fields joined by a double underscore (GATEWAY_HTTP__PORT=9000).",
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
    check = sub.add_parser(
        "check-config",
        help="validate a settings file without serving",
        description="Load and validate a settings file (and GATEWAY_* overrides); exit 0 "
        "when valid, 2 with the reason otherwise.",
    )
    check.add_argument("file", metavar="FILE")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
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
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from gateway.app import run  # deferred: onnxruntime and grpc load only to serve

    run(settings)
    return 0
