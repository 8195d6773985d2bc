"""The `agentmesh` command line. `python -m agentmesh` with no command starts a hub."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from functools import partial

import trio

from ._version import __version__
from .config import HubConfig
from .hub import Hub

__all__ = ["main"]

log = logging.getLogger("agentmesh")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"AGENTMESH_{name}", default)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentmesh", description="A hub for agent networks, and tools to work it."
    )
    parser.add_argument("--version", action="version", version=f"agentmesh {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    start = commands.add_parser("start", help="start a hub (the default command)")
    _start_options(start)
    return parser


def _start_options(parser: argparse.ArgumentParser) -> None:
    defaults = HubConfig()
    parser.add_argument(
        "--host", default=_env("HOST", "127.0.0.1"), help="interface to bind [AGENTMESH_HOST]"
    )
    parser.add_argument(
        "--port", type=int, default=int(_env("PORT", "8765")), help="port [AGENTMESH_PORT]"
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=float(_env("HEARTBEAT_INTERVAL", str(defaults.heartbeat_interval))),
        help="seconds between client heartbeats [AGENTMESH_HEARTBEAT_INTERVAL]",
    )
    parser.add_argument(
        "--default-ttl",
        type=float,
        default=float(_env("DEFAULT_TTL", str(defaults.default_ttl))),
        help="task time to live when a delegate gives none [AGENTMESH_DEFAULT_TTL]",
    )
    parser.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="[AGENTMESH_LOG_LEVEL]",
    )


async def _run_hub(hub: Hub, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then close every connection with 1001."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(hub.serve, host, port))
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "start")
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = HubConfig(heartbeat_interval=args.heartbeat_interval, default_ttl=args.default_ttl)
    try:
        trio.run(_run_hub, Hub(config), args.host, args.port)
    except OSError as exc:
        print(
            f"agentmesh: cannot serve on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr
        )
        raise SystemExit(1) from None
    log.info("hub stopped")
