"""The `agentmesh` command line; `python -m agentmesh` with no command starts a hub.

Exit codes: 0 success; 1 the hub refused the request or the task did not complete;
2 bad usage; 3 the hub could not be reached or refused the token; 130 interrupted
(Ctrl+C); 141 the reader of stdout went away (`agentmesh tasks | head -1`), silently.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import re
import signal
import ssl
import sys
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import orjson
import trio

from . import protocol as p
from ._groups import unwrap_single
from ._version import __version__
from .client import Backoff, Client, connect
from .config import HubConfig
from .errors import AgentMeshError, HubUnavailable, TaskError, Unauthorized
from .hub import Hub
from .lifecycle import STATES
from .sqlite_store import SQLiteStore
from .store import MemoryStore, Store, StoreError

__all__ = ["config_from_args", "main"]

log = logging.getLogger("agentmesh")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports a Ctrl+C
EXIT_PIPE = 128 + signal.SIGPIPE  # 141, as a shell reports a tool killed by SIGPIPE
DEFAULT_URL = "ws://127.0.0.1:8765"


def default_data_dir() -> Path:
    """Where a standalone hub keeps its store unless told: `$XDG_DATA_HOME/agentmesh`,
    else `~/.local/share/agentmesh`."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "agentmesh"


def _env(name: str, default: str = "") -> str:
    return os.environ.get(f"AGENTMESH_{name}", default)


class _BadInput(Exception):
    """Bad usage, found after parsing: the message is printed, the exit code is 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentmesh",
        description="A hub for agent networks, and tools to work it.",
        epilog="Exit codes: 0 ok, 1 refused or task failed, 2 bad usage, 3 hub unreachable, "
        "130 interrupted, 141 stdout closed.",
    )
    parser.add_argument("--version", action="version", version=f"agentmesh {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    start = commands.add_parser("start", help="start a hub (the default command)")
    _start_options(start)

    status = commands.add_parser("status", help="the hub's summary")
    agents = commands.add_parser("agents", help="registered agents")
    agents.add_argument(
        "capability", nargs="?", default="", help="keyword to search by (best matches first)"
    )
    agents.add_argument("--online", action="store_true", help="only the agents online now")
    agents.add_argument(
        "--tag", action="append", default=[], metavar="TAG", help="only agents with this tag"
    )
    tasks = commands.add_parser("tasks", help="tasks the hub knows, newest first")
    tasks.add_argument("--state", choices=list(STATES), help="only tasks in this state")
    tasks.add_argument("--requester", metavar="AGENT_ID", help="only tasks this agent asked for")
    tasks.add_argument("--assignee", metavar="AGENT_ID", help="only tasks given to this agent")
    for listing in (agents, tasks):
        listing.add_argument("--limit", type=int, default=100, help="at most this many (max 1000)")
        listing.add_argument(
            "--cursor", help="go on from an earlier listing (it prints the cursor on stderr)"
        )
    delegate = commands.add_parser("delegate", help="delegate a task and print its result")
    delegate.add_argument("capability", help="capability to ask for")
    delegate.add_argument("params", nargs="?", default="{}", help="params as a JSON object")
    delegate.add_argument("--to", metavar="AGENT_ID", help="a specific agent")
    delegate.add_argument(
        "--priority",
        type=int,
        default=0,
        help="-100 to 100: when every capable agent is busy, higher waits less",
    )
    delegate.add_argument(
        "--ttl",
        type=float,
        help="seconds the task may take (the hub's default_ttl unless given); delegate "
        "waits until the task ends",
    )
    task = commands.add_parser("task", help="one task in full")
    task.add_argument("task_id", metavar="TASK_ID")
    cancel = commands.add_parser("cancel", help="cancel a task")
    cancel.add_argument("task_id", metavar="TASK_ID")
    cancel.add_argument("--reason", help="why; the assignee is told, and it is the outcome's error")
    broadcast = commands.add_parser("broadcast", help="send a message to every agent")
    broadcast.add_argument("message")
    broadcast.add_argument("--data", default="null", help="JSON data to attach")
    watch = commands.add_parser(
        "watch", help="live events: agents joining and leaving, tasks changing state, progress"
    )
    watch.add_argument(
        "--kinds",
        metavar="KIND[,KIND...]",
        help=f"only these kinds of event (of {', '.join(p.EVENT_KINDS)})",
    )
    for sub in (status, agents, tasks, task, cancel, delegate, broadcast, watch):
        sub.add_argument(
            "--hub",
            default=_env("HUB", DEFAULT_URL),
            help=f"hub URL [AGENTMESH_HUB, default {DEFAULT_URL}]",
        )
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        sub.add_argument(
            "--token", default=_env("TOKEN") or None, help="bearer token [AGENTMESH_TOKEN]"
        )
        sub.add_argument(
            "--ca",
            default=_env("CA") or None,
            help="CA certificate (PEM) to trust for wss:// [AGENTMESH_CA]",
        )
        sub.add_argument(
            "--timeout",
            type=float,
            default=10.0,
            help="seconds to wait for the hub (delegate then waits for the task itself)",
        )

    bridge = commands.add_parser(
        "bridge", help="serve the network as MCP tools over stdio", add_help=False
    )
    bridge.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _start_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default=_env("HOST", "127.0.0.1"),
        help="interface to bind [AGENTMESH_HOST, default 127.0.0.1]",
    )
    parser.add_argument(
        "--port",
        metavar="PORT",
        help="port to listen on, 0 to 65535; 0 picks a free one [AGENTMESH_PORT, default 8765]",
    )
    parser.add_argument(
        "--http-port",
        metavar="PORT",
        help="serve the dashboard (/), /metrics, /healthz and /readyz over HTTP on this port, "
        "on the same host; off unless given [AGENTMESH_HTTP_PORT]",
    )
    parser.add_argument(
        "--tls-cert",
        default=_env("TLS_CERT") or None,
        help="certificate (PEM) to serve wss:// [AGENTMESH_TLS_CERT]",
    )
    parser.add_argument(
        "--tls-key", default=_env("TLS_KEY") or None, help="private key (PEM) [AGENTMESH_TLS_KEY]"
    )
    parser.add_argument(
        "--token-file",
        help="accept the tokens in this file too, one per line [AGENTMESH_TOKEN_FILE]",
    )
    storage = parser.add_mutually_exclusive_group()
    storage.add_argument(
        "--data-dir",
        default=_env("DATA_DIR") or None,
        metavar="DIR",
        help="keep agents and tasks in DIR/agentmesh.db (SQLite) across restarts "
        f"[AGENTMESH_DATA_DIR, default {default_data_dir()}]",
    )
    storage.add_argument(
        "--memory",
        action="store_true",
        default=_env("MEMORY") not in ("", "0"),
        help="keep nothing on disk: a restart forgets every agent and task [AGENTMESH_MEMORY=1]",
    )
    parser.add_argument(
        "--sync",
        default=_env("SYNC", "normal"),
        choices=["normal", "full"],
        help="normal: a commit survives a killed hub; full: a power cut too, at an fsync "
        "per commit [AGENTMESH_SYNC, default normal]",
    )
    parser.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="[AGENTMESH_LOG_LEVEL, default info]",
    )
    settings = parser.add_argument_group(
        "hub settings",
        "Every HubConfig field. A flag wins over its variable, a variable over the default;"
        " tokens from flags, variable and --token-file add up.",
    )
    for setting in _SETTINGS:
        settings.add_argument(
            setting.flag,
            dest=setting.name,
            metavar=setting.metavar,
            action="append" if setting.many else "store",
            help=setting.help.replace("%", "%%"),
        )


@attrs.frozen
class _Setting:
    """A `HubConfig` field as a `start` flag and an `AGENTMESH_*` variable. A collection
    (tokens) takes one item per flag, repeated, or a comma-separated variable."""

    field: attrs.Attribute[Any]
    read: Callable[[str], Any]  # one value, or one item of a collection, from text
    kind: str  # what `read` expects, as `--help` names it: INT, FLOAT|none...
    many: bool

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def flag(self) -> str:
        flag = "--" + self.name.replace("_", "-")
        return flag.removesuffix("s") if self.many else flag

    @property
    def env(self) -> str:
        return f"AGENTMESH_{self.name.upper()}"

    @property
    def metavar(self) -> str:
        return self.name.removesuffix("s").upper() if self.many else self.kind

    @property
    def help(self) -> str:
        default = self.field.default
        shown = "none" if default is None or default == frozenset() else str(default)
        text = self.field.metadata.get("help", "")
        if self.many:
            return f"{text}; repeat for several [{self.env}, comma-separated, default {shown}]"
        return f"{text} [{self.env}, default {shown}]"

    def given(self, args: argparse.Namespace, environ: Mapping[str, str]) -> list[tuple[str, str]]:
        """The texts given for this setting, each with the flag or variable it came from."""
        from_flag, from_env = getattr(args, self.name), environ.get(self.env)
        if self.many:  # the variable's items and the flags' add up
            items = [(self.env, item.strip()) for item in (from_env or "").split(",")]
            return [item for item in items if item[1]] + [(self.flag, v) for v in from_flag or ()]
        if from_flag is not None:
            return [(self.flag, from_flag)]
        return [] if from_env is None else [(self.env, from_env)]

    def parse(self, source: str, text: str) -> Any:
        try:
            return self.read(text)
        except ValueError:
            raise _BadInput(f"{source}: invalid {self.kind} value {text!r}") from None


def _reader(kind: Any) -> tuple[Callable[[str], Any], str]:
    """How to read a value of this type from text, and its name in `--help`."""
    if kind in (int, float, str):
        return kind, kind.__name__.upper()
    options = typing.get_args(kind)
    if len(options) == 2 and type(None) in options:  # X | None: "none" or empty is None
        read, metavar = _reader(next(o for o in options if o is not type(None)))

        def optional(text: str) -> Any:
            return None if text.strip().lower() in ("", "none") else read(text)

        return optional, f"{metavar}|none"
    raise TypeError(f"agentmesh.cli cannot read a {kind} setting from the command line")


def _hub_settings() -> tuple[_Setting, ...]:
    """Every `HubConfig` field as a setting: a new field gets its flag by itself."""
    kinds = typing.get_type_hints(HubConfig)
    settings = []
    for field in attrs.fields(HubConfig):
        kind, many = kinds[field.name], False
        if typing.get_origin(kind) is frozenset:
            (kind,), many = typing.get_args(kind), True
        settings.append(_Setting(field, *_reader(kind), many=many))
    return tuple(settings)


_SETTINGS = _hub_settings()


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> HubConfig:
    """The `HubConfig` of `start`: each setting from its flag, else its `AGENTMESH_*`
    variable, else its default. Raises `_BadInput` naming the flag or variable at fault."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in _SETTINGS:
        given = setting.given(args, environ)
        if given:
            read = [setting.parse(source, text) for source, text in given]
            values[setting.name] = frozenset(read) if setting.many else read[0]
            sources[setting.name] = ", ".join(dict.fromkeys(source for source, _ in given))
    token_file = args.token_file or environ.get("AGENTMESH_TOKEN_FILE")
    if token_file:
        try:
            with open(token_file) as lines:
                tokens = {line.strip() for line in lines if line.strip()}
        except OSError as exc:
            raise _BadInput(f"cannot read the token file: {exc}") from None
        values["tokens"] = values.get("tokens", frozenset()) | tokens
    try:
        return HubConfig(**values)
    except (TypeError, ValueError) as exc:
        # Validators name the fields they check: point at where those came from.
        blamed = [s for name, s in sources.items() if re.search(rf"\b{name}\b", str(exc))]
        raise _BadInput(f"{exc} (from {', '.join(blamed or sources.values())})") from None


def main(argv: Sequence[str] | None = None) -> None:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (
        args_list[0].startswith("-") and args_list[0] not in ("-h", "--help", "--version")
    ):
        args_list.insert(0, "start")
    if args_list[0] == "bridge":
        from .bridge import bridge_main

        bridge_main(args_list[1:])
        return
    args = _parser().parse_args(args_list)
    try:
        code = _start(args) if args.command == "start" else trio.run(_inspect, args)
        sys.stdout.flush()  # here, where a closed pipe can still be caught
    except BrokenPipeError:
        # Whoever read stdout has what it wanted (`| head -1`): stop quietly, as a Unix
        # tool killed by SIGPIPE does. Point stdout at /dev/null so that the flush at
        # exit does not fail again (the recipe of Python's `signal` docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_PIPE
    except KeyboardInterrupt:  # a second Ctrl+C, while the first was being handled
        _fail("interrupted")
        code = EXIT_INTERRUPTED
    raise SystemExit(code)


def _port(
    given: str | None,
    flag: str = "--port",
    default: str | None = "8765",
    environ: Mapping[str, str] = os.environ,
) -> int | None:
    """A port of `start`: from its flag, else its variable, else `default` (None: off)."""
    variable = "AGENTMESH_" + flag.removeprefix("--").replace("-", "_").upper()
    source, text = (flag, given) if given is not None else (variable, environ.get(variable))
    text = text or default
    if text is None:
        return None
    try:
        port = int(text)
    except ValueError:
        raise _BadInput(f"{source}: invalid port {text!r} (0 to 65535)") from None
    if not 0 <= port <= 65535:
        raise _BadInput(f"{source}: port {port} is out of range (0 to 65535)")
    return port


def _hub_url(url: str) -> str:
    """`url` if it is a hub URL the client can dial, else `_BadInput` saying why."""
    why = "it must look like ws://host:port or wss://host:port"
    try:
        parts = urlsplit(url)
        if parts.scheme in ("ws", "wss") and parts.hostname:
            parts.port  # noqa: B018 (reading it checks it: a number, 0 to 65535)
            return url
    except ValueError as exc:  # unbalanced brackets, a port that is not a number...
        why = str(exc).lower()
    raise _BadInput(f"bad hub URL {url!r} (--hub or AGENTMESH_HUB): {why}")


# --- start ------------------------------------------------------------------------------


def _start(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    ssl_context = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            _fail("--tls-cert and --tls-key go together")
            return EXIT_USAGE
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
    try:
        port = _port(args.port) or 0
        http_port = _port(args.http_port, "--http-port", None)
        config = config_from_args(args)
    except _BadInput as exc:
        _fail(str(exc))
        return EXIT_USAGE
    if args.memory:
        store: Store = MemoryStore()
    else:
        data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
        store = SQLiteStore.in_dir(data_dir, synchronous=args.sync)
    cluster_errors: tuple[type[Exception], ...] = ()
    if config.cluster is not None:
        from ._cluster import ClusterError

        cluster_errors = (ClusterError,)
    try:
        with unwrap_single():
            trio.run(
                partial(_serve_until_signalled, http_port=http_port),
                Hub(config, store=store),
                args.host,
                port,
                ssl_context,
            )
    except StoreError as exc:
        _fail(str(exc))
        return EXIT_FAILED
    except cluster_errors as exc:
        _fail(str(exc))
        return EXIT_FAILED
    except OSError as exc:
        _fail(f"cannot serve on {args.host}:{port}: {exc.strerror or exc}")
        return EXIT_FAILED
    log.info("hub stopped")
    return EXIT_OK


async def _serve_until_signalled(
    hub: Hub,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    *,
    http_port: int | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then close every connection with 1001. With
    `http_port`, the monitoring endpoints too (docs/observability.md)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            # Reading a store back makes millions of objects that all live on: collecting
            # while it runs only walks them again and again.
            gc.disable()
            try:
                await nursery.start(partial(hub.serve, host, port, ssl_context=ssl_context))
            finally:
                gc.enable()
            if http_port is not None:
                bound = await nursery.start(hub.serve_monitor, host, http_port)
                shown = f"[{host}]" if ":" in host else host
                log.info("monitoring on http://%s:%d/ (dashboard, /metrics)", shown, bound)
            # What is alive now (modules, classes, the hub itself, what the store held)
            # lives as long as the process: keep it out of every later garbage collection.
            # Full collections then scan only what came since, which took the longest GC
            # pause under load from about 38 ms to 13 ms (bench/README.md).
            gc.collect()
            gc.freeze()
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


# --- commands that talk to a hub ------------------------------------------------------


async def _inspect(args: argparse.Namespace) -> int:
    """Run one command against the hub until it is done or Ctrl+C (then the client still
    leaves the hub cleanly: a delegation it was waiting for is cancelled)."""
    try:
        _hub_url(args.hub)
    except _BadInput as exc:
        _fail(str(exc))
        return EXIT_USAGE
    code = EXIT_INTERRUPTED
    with unwrap_single(), trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                nonlocal code
                code = await _command(args)
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    if code == EXIT_INTERRUPTED:
        _fail("interrupted")
    return code


async def _command(args: argparse.Namespace) -> int:
    """Looking (status, agents, tasks, task) never registers; delegate, broadcast and
    cancel register as a hidden agent, so nothing else sees them.

    `--timeout` bounds reaching the hub and each answer; `delegate` lifts it once the hub
    has taken the task (`_delegate`)."""
    looking = args.command in ("status", "agents", "tasks", "task", "watch")
    reaching = trio.CancelScope(deadline=trio.current_time() + args.timeout)
    try:
        with reaching:
            async with connect(
                args.hub,
                name="agentmesh-cli",
                register=not looking,
                hidden=True,
                backoff=Backoff(max_attempts=1),
                connect_timeout=args.timeout,
                token=args.token,
                ssl_context=ssl.create_default_context(cafile=args.ca) if args.ca else None,
            ) as client:
                code: int = await _COMMANDS[args.command](client, args, reaching)
                return code
        raise trio.TooSlowError  # only the deadline ends the block without a return
    except (HubUnavailable, Unauthorized) as exc:
        _fail(str(exc))
        return EXIT_UNREACHABLE
    except trio.TooSlowError:
        _fail(f"no answer from the hub at {args.hub} within {args.timeout:g}s")
        return EXIT_FAILED
    except TaskError as exc:
        _fail(f"task {exc.task_id} {exc.code}: {exc}")
        return EXIT_FAILED
    except AgentMeshError as exc:
        _fail(f"{exc.code or 'error'}: {exc}{_forbidden_hint(exc, args)}")
        return EXIT_FAILED
    except _BadInput as exc:
        _fail(str(exc))
        return EXIT_USAGE


def _forbidden_hint(exc: AgentMeshError, args: argparse.Namespace) -> str:
    """What `task` or `cancel` needs when the hub says the task is not the CLI's: each run
    is a new connection, never a task's requester or assignee, so an admin token."""
    if exc.code != "forbidden" or args.command not in ("task", "cancel"):
        return ""
    what = "read" if args.command == "task" else "cancel"
    if args.token:
        return f"; the token given is not an admin token, and only an admin may {what} it"
    return (
        f"; only an admin may {what} it: pass an admin token with --token or "
        "AGENTMESH_TOKEN (a hub takes them from --admin-token)"
    )


async def _status(client: Client, args: argparse.Namespace, _: trio.CancelScope) -> int:
    summary = await client.status()
    assert isinstance(summary, p.HubSummary)
    if args.json:
        _print_json(p.converter.unstructure(summary))
        return EXIT_OK
    rows = [
        ("hub", args.hub),
        ("version", f"{summary.version} (protocol {summary.protocol})"),
        ("uptime", f"{summary.uptime:.0f}s"),
        ("agents", f"{summary.agents} ({summary.online} online)"),
        ("tasks", ", ".join(f"{k} {v}" for k, v in summary.tasks.items())),
        ("frames", f"{summary.counters['frames_in']} in, {summary.counters['frames_out']} out"),
    ]
    _print_table(rows, header=None)
    return EXIT_OK


async def _agents(client: Client, args: argparse.Namespace, _: trio.CancelScope) -> int:
    page = await client.discover_page(
        args.capability, online=args.online, tags=args.tag, limit=args.limit, cursor=args.cursor
    )
    agents = page.agents
    _more(page.next_cursor)
    if args.json:
        _print_json([p.converter.unstructure(a) for a in agents])
        return EXIT_OK
    rows = [
        (
            a.agent_id,
            a.name,
            "yes" if a.online else "resuming",
            ", ".join(c.name for c in a.capabilities) or "-",
            *((_match_text(a.match),) if args.capability.strip() else ()),
        )
        for a in agents
    ]
    header = ("AGENT ID", "NAME", "ONLINE", "CAPABILITIES")
    _print_table(rows, header=(*header, "MATCH") if args.capability.strip() else header)
    return EXIT_OK


def _match_text(match: p.Match | None) -> str:
    """Why a search found an agent: `exact code-review`, `name code-review-x`, `text`."""
    if match is None:
        return "-"
    return match.reason if match.capability is None else f"{match.reason} {match.capability}"


async def _tasks(client: Client, args: argparse.Namespace, _: trio.CancelScope) -> int:
    page = await client.list_tasks_page(
        args.state,
        args.limit,
        cursor=args.cursor,
        requester=args.requester,
        assignee=args.assignee,
    )
    tasks = page.tasks
    _more(page.next_cursor)
    if args.json:
        _print_json([p.converter.unstructure(t) for t in tasks])
        return EXIT_OK
    now = time.time()
    rows = [
        (
            t.task_id,
            t.state,
            t.capability,
            t.requester,
            t.assignee,
            _duration(now - t.created_at),
            _took(t, now),
            _outcome_text(t),
        )
        for t in tasks
    ]
    _print_table(
        rows,
        header=(
            "TASK ID",
            "STATE",
            "CAPABILITY",
            "REQUESTER",
            "ASSIGNEE",
            "AGE",
            "TOOK",
            "OUTCOME",
        ),
    )
    return EXIT_OK


async def _task(client: Client, args: argparse.Namespace, _: trio.CancelScope) -> int:
    info = await client.status(args.task_id)
    assert isinstance(info, p.TaskInfo)
    if args.json:
        _print_json(p.converter.unstructure(info))
        return EXIT_OK
    for line in _task_lines(info, time.time()):
        print(line)
    return EXIT_OK


def _task_lines(task: p.TaskInfo, now: float) -> list[str]:
    """A task in full, a field a line; `data` as indented JSON below its label."""
    running = task.state in ("pending", "in_progress")
    rows = [
        ("task", task.task_id),
        ("state", task.state),
        ("capability", task.capability),
        ("requester", task.requester),
        ("assignee", task.assignee or _unassigned(task, running)),
        ("created", f"{_utc(task.created_at)} ({_duration(now - task.created_at)} ago)"),
        ("updated", _utc(task.updated_at)),
        ("took", ("running for " if running else "") + _took(task, now)),
        ("ttl", _duration(task.ttl)),
        ("success", "-" if task.success is None else "yes" if task.success else "no"),
        ("error", task.error or "-"),
    ]
    if task.truncated:
        rows.append(("truncated", "yes: the hub left the data out"))
    data = orjson.dumps(task.data, option=orjson.OPT_INDENT_2).decode().splitlines()
    rows.append(("data", data[0]))
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{label.ljust(width)}{value}" for label, value in rows]
    return lines + [" " * width + line for line in data[1:]]


def _unassigned(task: p.TaskInfo, running: bool) -> str:
    """What a task with no assignee is doing: waiting in the hub's queue, or not any more."""
    if not running:
        return "none: it ended while waiting in the hub's queue"
    if task.queue_position is None:  # an older hub, or a version 1 connection
        return "none yet: waiting in the hub's queue"
    return f"none yet: waiting in the hub's queue, {_ordinal(task.queue_position)}"


def _ordinal(position: int) -> str:
    """A place in the hub's queue, as people say it: `next in line`, `2nd in line`."""
    if position == 1:
        return "next in line"
    suffix = (
        "th" if 10 <= position % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(position % 10, "th")
    )
    return f"{position}{suffix} in line"


def _utc(timestamp: float) -> str:
    """A hub timestamp as a readable UTC time, to the millisecond."""
    moment = time.gmtime(timestamp)
    return time.strftime("%Y-%m-%d %H:%M:%S", moment) + f".{int(timestamp % 1 * 1000):03d} UTC"


async def _cancel(client: Client, args: argparse.Namespace, _: trio.CancelScope) -> int:
    await client.cancel(args.task_id, args.reason)
    if args.json:
        _print_json({"task_id": args.task_id, "state": "cancelled"})
    else:
        print(f"{args.task_id} cancelled")
    return EXIT_OK


async def _delegate(client: Client, args: argparse.Namespace, reaching: trio.CancelScope) -> int:
    params = _json_arg(args.params, "params")
    if not isinstance(params, dict):
        raise _BadInput('params must be a JSON object, for example \'{"text": "hi"}\'')
    # `--timeout` is for reaching the hub: the task has its own TTL, the hub's default
    # unless --ttl says. A deadline around `submit` would become the TTL, so the delegate
    # reply is bounded by a timer that cancels instead.
    reaching.deadline = math.inf
    handle = await _without_deadline(
        args.timeout,
        partial(
            client.submit,
            args.capability,
            params,
            to=args.to,
            ttl=args.ttl,
            priority=args.priority,
        ),
    )
    # The hub ends the task at its TTL at the latest; with --ttl known, give up if its
    # outcome is not here --timeout after that.
    bound = math.inf if args.ttl is None else args.ttl + args.timeout
    try:
        with trio.move_on_after(bound) as waiting:
            if sys.stderr.isatty():
                data = await _wait_showing_progress(handle)
            else:
                data = await handle.wait()
    finally:
        if not handle.done:  # Ctrl+C, or the outcome never came: the task is not wanted
            with trio.CancelScope(shield=True), trio.move_on_after(args.timeout):
                try:
                    await handle.cancel("the requester stopped waiting")
                except AgentMeshError:
                    pass  # it ended meanwhile
    if waiting.cancelled_caught:
        _fail(f"task {handle.task_id}: no outcome from the hub within {bound:g}s")
        return EXIT_FAILED
    if args.json or not isinstance(data, str):
        _print_json(data)
    else:
        print(data)
    return EXIT_OK


async def _without_deadline(seconds: float, fn: Callable[[], Any]) -> Any:
    """`await fn()`, cancelled after `seconds` (then `trio.TooSlowError`) by a timer, not
    a deadline: `fn` sees none."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def timer() -> None:
                await trio.sleep(seconds)
                scope.cancel()

            nursery.start_soon(timer)
            result = await fn()
            nursery.cancel_scope.cancel()
            return result
    raise trio.TooSlowError


async def _wait_showing_progress(handle: Any) -> Any:
    """`handle.wait()`, drawing the agent's progress reports as a bar on stderr (a
    terminal), the line cleared when the task ends."""
    drawn = False
    async with trio.open_nursery() as nursery:

        async def draw() -> None:
            nonlocal drawn
            async for update in handle.progress():
                sys.stderr.write("\r\x1b[2K" + _bar(update.progress, update.message))
                sys.stderr.flush()
                drawn = True

        nursery.start_soon(draw)
        try:
            return await handle.wait()
        finally:
            nursery.cancel_scope.cancel()
            if drawn:
                sys.stderr.write("\r\x1b[2K")
                sys.stderr.flush()


def _bar(progress: float | None, message: str | None, width: int = 30) -> str:
    """A progress line: `[#########.........]  50% message`; without a fraction the bar
    is left blank and the percentage is `--`."""
    if progress is None:
        shown, filled = " --%", 0
    else:
        fraction = min(max(progress, 0.0), 1.0)
        filled = int(fraction * width)
        shown = f"{int(fraction * 100):3d}%"
    line = f"[{'#' * filled}{'.' * (width - filled)}] {shown}"
    return f"{line} {message}" if message else line


async def _broadcast(client: Client, args: argparse.Namespace, _: trio.CancelScope) -> int:
    recipients = await client.broadcast(args.message, _json_arg(args.data, "--data"))
    if args.json:
        _print_json({"recipients": recipients})
    else:
        print(f"sent to {recipients} agent{'s' if recipients != 1 else ''}")
    return EXIT_OK


async def _watch(client: Client, args: argparse.Namespace, reaching: trio.CancelScope) -> int:
    """Print each event as it comes, until Ctrl+C; across a drop of the hub connection
    (a restart), reconnect and go on."""
    kinds = [k.strip() for k in (args.kinds or "").split(",") if k.strip()]
    unknown = [k for k in kinds if k not in p.EVENT_KINDS]
    if unknown:
        raise _BadInput(
            f"--kinds: unknown kind(s) {', '.join(unknown)}; there are: " + ", ".join(p.EVENT_KINDS)
        )
    names = {a.agent_id: a.name for a in await client.discover(limit=1000)}
    async with client.watch(kinds) as events:
        reaching.deadline = math.inf  # reached: from now on, wait for events forever
        client.backoff = Backoff()  # and ride out a restart of the hub
        print(f"agentmesh: watching {args.hub} (Ctrl+C to stop)", file=sys.stderr, flush=True)
        async for event in events:
            if args.json:  # a JSON line each: the event's fields that are set
                fields = p.converter.unstructure(event)
                shown = {k: v for k, v in fields.items() if v is not None}
                if not shown["missed"]:
                    del shown["missed"]
                print(orjson.dumps(shown).decode(), flush=True)
            else:
                print(_event_line(event, names), flush=True)
    return EXIT_OK


def _event_line(event: p.Event, names: dict[str, str]) -> str:
    """One event as a line: its UTC time to the millisecond, then what happened, agents
    by name (as far as known) and ID."""

    def who(agent_id: str) -> str:
        name = names.get(agent_id)
        return f"{name} ({agent_id})" if name else agent_id

    if event.agent is not None:
        agent = event.agent
        if event.kind == "agent_left":
            names.pop(agent.agent_id, None)  # a long watch keeps no one who left
        else:
            names[agent.agent_id] = agent.name
        offers = ", ".join(c.name for c in agent.capabilities) or "no capabilities"
        whom = f"{agent.name} ({agent.agent_id})"
        text = {
            "agent_registered": f"+ agent {whom} registered: {offers}",
            "agent_online": f"^ agent {whom} resumed",
            "agent_offline": f"~ agent {whom} disconnected; may resume",
            "agent_left": f"- agent {whom} left: {event.reason}",
        }.get(event.kind, f"{event.kind} {whom}")
    elif event.task is not None:
        task = event.task
        text = f"task {task.task_id} {task.capability} {task.state}"
        if task.state == "pending":
            text += f": {who(task.requester)} -> {who(task.assignee)}"
        elif event.duration is not None:
            text += f" in {_duration(event.duration)}"
            if task.error and task.error.strip():
                text += f": {_first_line(task.error)}"
    elif event.progress is not None:
        update = event.progress
        text = f"progress {update.task_id} {_bar(update.progress, update.message, width=10)}"
    elif event.broadcast is not None:
        note = event.broadcast
        text = (
            f"broadcast from {who(note.sender)} to {note.recipients}: {_first_line(note.message)}"
        )
    else:
        text = event.kind
    stamp = _utc(event.time).split()[1]  # the time of day, UTC
    missed = f"({event.missed} events missed: reading too slowly) " if event.missed else ""
    return f"{stamp} {missed}{text}"


def _first_line(text: str, width: int = 200) -> str:
    """The first non-blank line of `text`, cut to `width` characters."""
    line = next((line for line in text.splitlines() if line.strip()), "").strip()
    return line if len(line) <= width else line[: width - 1] + "…"


_COMMANDS: dict[str, Callable[[Client, argparse.Namespace, trio.CancelScope], Any]] = {
    "status": _status,
    "agents": _agents,
    "tasks": _tasks,
    "task": _task,
    "cancel": _cancel,
    "delegate": _delegate,
    "broadcast": _broadcast,
    "watch": _watch,
}


# --- output ---------------------------------------------------------------------------


def _more(cursor: str | None) -> None:
    """Say on stderr how to list the rest, if there is more."""
    if cursor is not None:
        print(f"agentmesh: more to list: add --cursor {cursor}", file=sys.stderr)


def _took(task: p.TaskInfo, now: float) -> str:
    """How long a finished task took; for one still open, how long so far, with `…`."""
    if task.state in ("pending", "in_progress"):
        return _duration(now - task.created_at) + "…"
    return _duration(task.updated_at - task.created_at)


def _duration(seconds: float) -> str:
    """A duration in at most two units: 350ms, 4.2s, 12s, 3m05s, 2h07m, 3d04h."""
    seconds = max(seconds, 0.0)  # clocks a little apart make a task from the future
    if seconds < 1:  # each unit rounded down, so that none shows a "1000ms" or "10.0s"
        return f"{int(seconds * 1000)}ms"
    if seconds < 10:
        return f"{int(seconds * 10) / 10:.1f}s"
    whole = int(seconds)
    for unit, size, smaller, small in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}{whole % size // small:02d}{smaller}"
    if whole >= 60:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole}s"


def _outcome_text(task: p.TaskInfo) -> str:
    if task.state in ("pending", "in_progress"):
        return ""
    text = orjson.dumps(task.data).decode() if task.success else task.error or ""
    return text if len(text) <= 40 else text[:39] + "…"


def _print_table(rows: Sequence[Sequence[str]], header: Sequence[str] | None) -> None:
    lines = ([list(header)] if header else []) + [list(map(str, row)) for row in rows]
    if not lines:
        return
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )
    if header and not rows:
        print("(none)")


def _print_json(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def _json_arg(text: str, what: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise _BadInput(f"{what} is not valid JSON: {exc}") from None


def _fail(message: str) -> None:
    print(f"agentmesh: {message}", file=sys.stderr)
