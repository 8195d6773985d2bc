"""The command line, run as a user runs it: a subprocess against a real hub."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed

from agentmesh import Agent, Hub, HubConfig, TaskContext, connect
from agentmesh.cli import _bar, _duration, _parser, config_from_args
from agentmesh.errors import NoCapableAgent, TaskCancelled
from agentmesh.protocol import converter

from .conftest import WAIT, open_raw


async def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(WAIT * 2):
        return await trio.run_process(
            [sys.executable, "-m", "agentmesh", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, **(env or {})},
        )


@pytest.fixture
async def echo(hub: Hub, nursery: trio.Nursery) -> Agent:
    agent = Agent("echoer")

    @agent.capability()
    async def echo(text: str) -> str:
        return text

    @agent.capability()
    async def fail() -> None:
        raise ValueError("nope")

    started: Agent = await nursery.start(agent.serve, hub.url)
    return started


async def test_status_agents_and_tasks(hub: Hub, echo: Agent) -> None:
    url = hub.url or ""
    status = await cli("status", "--hub", url)
    assert status.returncode == 0, status.stderr
    text = status.stdout.decode()
    assert re.search(r"^agents\s+1 \(1 online\)$", text, re.M), text

    agents = await cli("agents", "--hub", url)
    lines = agents.stdout.decode().splitlines()
    assert lines[0].split() == ["AGENT", "ID", "NAME", "ONLINE", "CAPABILITIES"]
    assert lines[1].split()[1:] == ["echoer", "yes", "echo,", "fail"]

    as_json = orjson.loads((await cli("agents", "echo", "--hub", url, "--json")).stdout)
    assert [a["name"] for a in as_json] == ["echoer"]
    assert orjson.loads((await cli("agents", "translate", "--hub", url, "--json")).stdout) == []

    done = await cli("delegate", "echo", '{"text": "hi there"}', "--hub", url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == "hi there\n"
    failed = await cli("delegate", "fail", "--hub", url)
    assert failed.returncode == 1
    assert failed.stderr.decode().strip().endswith("failed: ValueError: nope")

    tasks = orjson.loads((await cli("tasks", "--hub", url, "--json")).stdout)
    assert [(t["capability"], t["state"]) for t in tasks] == [
        ("fail", "failed"),
        ("echo", "completed"),
    ]
    only_failed = await cli("tasks", "--state", "failed", "--hub", url)
    rows = only_failed.stdout.decode().splitlines()
    assert len(rows) == 2
    assert rows[1].split()[1:3] == ["failed", "fail"]

    # A page at a time: the cursor to go on is printed on stderr.
    first = await cli("tasks", "--limit", "1", "--hub", url, "--json")
    assert [t["capability"] for t in orjson.loads(first.stdout)] == ["fail"]
    hint = first.stderr.decode().strip()
    assert hint.startswith("agentmesh: more to list: add --cursor "), hint
    cursor = hint.rsplit(" ", 1)[1]
    rest = await cli("tasks", "--limit", "1", "--cursor", cursor, "--hub", url, "--json")
    assert [t["capability"] for t in orjson.loads(rest.stdout)] == ["echo"]
    cursor = rest.stderr.decode().strip().rsplit(" ", 1)[1]  # a full page has a cursor
    end = await cli("tasks", "--limit", "1", "--cursor", cursor, "--hub", url, "--json")
    assert orjson.loads(end.stdout) == []
    assert end.stderr == b""  # nothing more
    bad = await cli("tasks", "--cursor", "bogus", "--hub", url)
    assert bad.returncode == 1
    assert "cursor" in bad.stderr.decode()


async def test_inspecting_does_not_disturb_the_network(hub: Hub, echo: Agent) -> None:
    url = hub.url or ""
    async with connect(url, name="listener") as listener:
        results = await _run_together(
            ("status", "--hub", url),
            ("agents", "--hub", url),
            ("tasks", "--hub", url),
            ("broadcast", "ping", "--hub", url),
            ("broadcast", "ping", "--hub", url),
        )
        assert [r.returncode for r in results] == [0] * 5
        assert results[3].stdout.decode() == "sent to 2 agents\n"  # echoer and listener
        names = {a.name for a in await listener.discover()}
        assert names == {"echoer", "listener"}  # no CLI agent is listed
        summary = await listener.status()
        assert summary.online == 2  # type: ignore[union-attr]
        heard = [await _next_broadcast(listener) for _ in range(2)]
        assert [b.payload.message for b in heard] == ["ping", "ping"]


async def test_bad_input_and_unreachable_hub(hub: Hub, echo: Agent) -> None:
    url = hub.url or ""
    bad_json = await cli("delegate", "echo", "{nope", "--hub", url)
    assert bad_json.returncode == 2
    assert bad_json.stderr.decode().startswith("agentmesh: params is not valid JSON")
    not_object = await cli("delegate", "echo", "[1]", "--hub", url)
    assert not_object.returncode == 2
    no_agent = await cli("delegate", "translate", "--hub", url)
    assert no_agent.returncode == 1
    assert no_agent.stderr.decode() == (
        "agentmesh: no_capable_agent: no agent offers capability 'translate'\n"
    )
    usage = await cli("tasks", "--state", "sleeping", "--hub", url)
    assert usage.returncode == 2

    unreachable = await cli("status", env={"AGENTMESH_HUB": "ws://127.0.0.1:9"})
    assert unreachable.returncode == 3
    lines = unreachable.stderr.decode().splitlines()
    assert len(lines) == 1  # one clear line, no traceback
    assert lines[0].startswith("agentmesh: cannot reach the hub at ws://127.0.0.1:9")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:8765", "it must look like ws://host:port or wss://host:port"),
        ("ws://", "it must look like ws://host:port or wss://host:port"),
        ("ws://[::1", "invalid ipv6 url"),
        ("ws://127.0.0.1:99999", "port out of range 0-65535"),
        ("ws://127.0.0.1:-1", "port could not be cast to integer value as '-1'"),
    ],
)
async def test_a_bad_hub_url_is_one_line_and_exit_2(url: str, why: str) -> None:
    refused = await cli("status", "--hub", url)
    assert refused.returncode == 2
    assert refused.stderr.decode() == (
        f"agentmesh: bad hub URL {url!r} (--hub or AGENTMESH_HUB): {why}\n"
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--port", "99999"], {}, "--port: port 99999 is out of range (0 to 65535)"),
        (["--port=-1"], {}, "--port: port -1 is out of range (0 to 65535)"),
        (
            [],
            {"AGENTMESH_PORT": "65536"},
            "AGENTMESH_PORT: port 65536 is out of range (0 to 65535)",
        ),
        ([], {"AGENTMESH_PORT": "http"}, "AGENTMESH_PORT: invalid port 'http' (0 to 65535)"),
    ],
)
async def test_a_port_out_of_range_is_refused(
    args: list[str], env: dict[str, str], message: str
) -> None:
    refused = await cli("start", "--memory", *args, env=env)
    assert refused.returncode == 2
    assert refused.stderr.decode() == f"agentmesh: {message}\n"


@pytest.mark.parametrize("command", [("status",), ("tasks", "--json")])
async def test_a_closed_pipe_ends_quietly(hub: Hub, echo: Agent, command: tuple[str, ...]) -> None:
    # `agentmesh status | head -1`, with the reader gone before the CLI writes: no
    # traceback, exit 141 as a shell reports a tool killed by SIGPIPE.
    read, write = os.pipe()
    os.close(read)
    try:
        with trio.fail_after(WAIT * 2):
            done = await trio.run_process(
                [sys.executable, "-m", "agentmesh", *command, "--hub", hub.url or ""],
                stdout=write,
                capture_stderr=True,
                check=False,
            )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, b"")


async def test_ctrl_c_while_delegating_is_one_line_and_exit_130(
    hub: Hub, nursery: trio.Nursery
) -> None:
    agent = Agent("sleeper")
    started, cancelled = trio.Event(), trio.Event()

    @agent.capability()
    async def sleep() -> None:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    await nursery.start(agent.serve, hub.url)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "agentmesh", "delegate", "sleep", "--hub", hub.url or ""],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with trio.fail_after(WAIT * 2):  # a Python process starting on a loaded machine
            await started.wait()  # the CLI is waiting for the outcome
        with trio.fail_after(WAIT):
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 130
            await cancelled.wait()  # leaving, the CLI cancelled its delegation
        assert process.stderr is not None
        assert await process.stderr.receive_some() == b"agentmesh: interrupted\n"
    finally:
        await _reap(process)


async def test_an_http_server_is_not_a_hub(nursery: trio.Nursery) -> None:
    async def answer_404(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request and (chunk := await stream.receive_some()):
            request += chunk
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, answer_404, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    refused = await cli("status", "--hub", f"ws://127.0.0.1:{port}")
    assert refused.returncode == 3
    assert re.fullmatch(
        rf"agentmesh: cannot reach the hub at ws://127\.0\.0\.1:{port}: "
        r"it is not an agentmesh hub \(HTTP 404[^\n]*\)\n",
        refused.stderr.decode(),
    ), refused.stderr.decode()


async def test_inspecting_bumps_no_error_counter(hub: Hub, echo: Agent) -> None:
    url = hub.url or ""
    assert (await cli("delegate", "echo", '{"text": "hi"}', "--hub", url)).returncode == 0
    before = orjson.loads((await cli("status", "--json", "--hub", url)).stdout)
    for command in (("status",), ("agents",), ("tasks",), ("status", "--json")):
        assert (await cli(*command, "--hub", url)).returncode == 0
    after = orjson.loads((await cli("status", "--json", "--hub", url)).stdout)
    assert after["counters"]["errors"] == before["counters"]["errors"] == 0


async def test_tasks_shows_age_and_duration(hub: Hub, nursery: trio.Nursery) -> None:
    agent = Agent("worker")
    started, release = trio.Event(), trio.Event()

    @agent.capability()
    async def quick() -> str:
        return "done"

    @agent.capability()
    async def slow() -> str:
        started.set()
        await release.wait()
        return "late"

    await nursery.start(agent.serve, hub.url)
    url = hub.url or ""
    async with connect(url, name="asker") as asker:
        assert await asker.delegate("quick", {}) == "done"
        async with trio.open_nursery() as waiting:
            waiting.start_soon(asker.delegate, "slow", {})
            with trio.fail_after(WAIT):
                await started.wait()
            listed = await cli("tasks", "--hub", url)
            release.set()
    lines = listed.stdout.decode().splitlines()
    header = re.split(r"\s{2,}", lines[0])
    assert header == [
        "TASK ID",
        "STATE",
        "CAPABILITY",
        "REQUESTER",
        "ASSIGNEE",
        "AGE",
        "TOOK",
        "OUTCOME",
    ]
    duration = r"\d+ms|\d\.\ds|\d+s|\d+m\d\ds"
    rows = {row.split()[2]: row.split() for row in lines[1:]}
    assert rows["slow"][1] in ("pending", "in_progress")
    assert re.fullmatch(duration, rows["slow"][5]), rows["slow"]
    assert re.fullmatch(rf"({duration})…", rows["slow"][6]), rows["slow"]  # still running
    assert rows["quick"][1] == "completed"
    assert re.fullmatch(duration, rows["quick"][5]), rows["quick"]
    assert re.fullmatch(duration, rows["quick"][6]), rows["quick"]
    assert rows["quick"][7] == '"done"'
    assert [
        t["capability"] for t in orjson.loads((await cli("tasks", "--json", "--hub", url)).stdout)
    ] == ["slow", "quick"]


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (-2.0, "0ms"),
        (0.0004, "0ms"),
        (0.35, "350ms"),
        (0.9996, "999ms"),
        (4.26, "4.2s"),
        (9.99, "9.9s"),
        (12.7, "12s"),
        (185, "3m05s"),
        (7620, "2h07m"),
        (90061, "1d01h"),
    ],
)
def test_durations_read_at_a_glance(seconds: float, shown: str) -> None:
    assert _duration(seconds) == shown


async def test_start_serves_until_sigterm(nursery: trio.Nursery) -> None:
    # A flag wins over its variable (heartbeat 5, not 7); a variable reaches the hub too.
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "agentmesh", "start", "--port", "0", "--heartbeat-interval", "5"],
        stderr=subprocess.PIPE,
        env={**os.environ, "AGENTMESH_HEARTBEAT_INTERVAL": "7", "AGENTMESH_MAX_AGENTS": "1"},
    )
    try:
        assert process.stderr is not None
        url = await _read_url(process.stderr)
        async with open_raw(url) as client, open_raw(url) as second:
            reply = await client.register("probe")
            assert reply["payload"]["heartbeat_interval"] == 5.0
            refused = await second.request("register", {"name": "second", "capabilities": []})
            assert refused["payload"]["code"] == "limit_exceeded", refused
            process.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                await client.recv()
            assert closed.value.reason.code == 1001
        with trio.fail_after(WAIT):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()


def _flag(field: attrs.Attribute[Any]) -> str:
    """A setting's flag: its name with dashes; a collection's, singular (`--token`)."""
    flag = "--" + field.name.replace("_", "-")
    return flag.removesuffix("s") if isinstance(field.default, frozenset) else flag


def _env_var(field: attrs.Attribute[Any]) -> str:
    return "AGENTMESH_" + field.name.upper()


def _default(field: attrs.Attribute[Any]) -> str:
    return "none" if field.default in (None, frozenset()) else str(field.default)


async def test_start_help_shows_every_setting_with_its_variable_and_default() -> None:
    shown = await cli("start", "--help", env={"COLUMNS": "1000"})  # no word wrapped
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.decode().split())
    for field in attrs.fields(HubConfig):
        entry = (
            rf" {re.escape(_flag(field))} \S+ {re.escape(field.metadata['help'])}.*? "
            rf"\[{_env_var(field)}, (comma-separated, )?default {re.escape(_default(field))}\]"
        )
        assert re.search(entry, text), f"{field.name}: no {_flag(field)} entry in start --help"


def test_the_settings_table_lists_every_setting() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    for field in attrs.fields(HubConfig):
        row = (
            rf"^\| `{field.name}` \| `{re.escape(_flag(field))}`.*?\| `{_env_var(field)}`.*?"
            rf"\| {re.escape(_default(field))}[ |]"
        )
        assert re.search(row, doc, re.M), f"{field.name}: no row in docs/protocol.md#settings"


def _another_value(default: Any, name: str) -> tuple[str, Any]:
    """A value other than the default, as text and as the config should hold it."""
    if isinstance(default, frozenset):
        return name, frozenset({name})
    if name in ("cluster", "hub_name") or (name.startswith("cluster_") and default is None):
        return name.replace("_", "-"), name.replace("_", "-")
    if default is None:
        return "2.5", 2.5
    return str(default * 2), default * 2


@pytest.mark.parametrize("by_flag", [True, False], ids=["flag", "variable"])
def test_every_setting_reaches_the_config(by_flag: bool) -> None:
    argv, environ, expected = ["start"], {}, {}
    for field in attrs.fields(HubConfig):
        text, expected[field.name] = _another_value(field.default, field.name)
        if by_flag:
            argv += [_flag(field), text]
        else:
            environ[_env_var(field)] = text
    config = config_from_args(_parser().parse_args(argv), environ)
    assert {name: getattr(config, name) for name in expected} == expected


def test_a_flag_wins_over_its_variable_and_tokens_add_up(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("from-file\n\n")
    args = _parser().parse_args(
        ["start", "--retention", "400", "--rate-limit", "none", "--token", "from-flag"]
    )
    environ = {
        "AGENTMESH_RETENTION": "500",
        "AGENTMESH_RESUME_GRACE": "40",
        "AGENTMESH_RATE_LIMIT": "9",
        "AGENTMESH_TOKENS": "a, b,,",
        "AGENTMESH_TOKEN_FILE": str(token_file),
        "AGENTMESH_ADMIN_TOKENS": "root",
    }
    config = config_from_args(args, environ)
    assert (config.retention, config.resume_grace, config.rate_limit) == (400.0, 40.0, None)
    assert config.tokens == {"a", "b", "from-flag", "from-file"}
    assert config.admin_tokens == {"root"}
    assert config_from_args(_parser().parse_args(["start"]), {}) == HubConfig()
    assert config_from_args(args, {"AGENTMESH_RATE_LIMIT": ""}).rate_limit is None


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--outbox-bytes", "abc"], {}, "--outbox-bytes: invalid INT value 'abc'"),
        (["--retention", "-1"], {}, "retention must be positive, got -1.0 (from --retention)"),
        (
            ["--retention", "10"],
            {"AGENTMESH_RESUME_GRACE": "20"},
            "retention must be at least resume_grace, or a resuming requester could find its "
            "outcomes already dropped (from AGENTMESH_RESUME_GRACE, --retention)",
        ),
        (
            [],
            {"AGENTMESH_SEND_TIMEOUT": "soon"},
            "AGENTMESH_SEND_TIMEOUT: invalid FLOAT value 'soon'",
        ),
        (
            [],
            {"AGENTMESH_MAX_AGENTS": "0"},
            "max_agents must be positive, got 0 (from AGENTMESH_MAX_AGENTS)",
        ),
    ],
)
async def test_a_bad_setting_is_one_line_and_exit_2(
    args: list[str], env: dict[str, str], message: str
) -> None:
    refused = await cli("start", "--port", "0", *args, env=env)
    assert refused.returncode == 2
    assert refused.stderr.decode() == f"agentmesh: {message}\n"


async def _read_url(stream: Any) -> str:
    seen = b""
    with trio.fail_after(WAIT * 2):
        while True:
            chunk = await stream.receive_some()
            assert chunk, seen.decode()
            seen += chunk
            found = re.search(rb"serving on (ws://\S+)", seen)
            if found:
                return found.group(1).decode()


async def _run_together(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess[bytes]]:
    results: list[Any] = [None] * len(commands)

    async def run(i: int, args: tuple[str, ...]) -> None:
        results[i] = await cli(*args)

    async with trio.open_nursery() as nursery:
        for i, args in enumerate(commands):
            nursery.start_soon(run, i, args)
    return results


async def _next_broadcast(client: Any) -> Any:
    with trio.fail_after(WAIT):
        return await client.broadcasts().receive()


async def _http_get(port: int, path: str) -> tuple[int, bytes]:
    """One GET over a fresh loopback connection: the status and the body."""
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            )
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_start_serves_the_monitoring_port_when_asked() -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "agentmesh", "start", "--port", "0", "--http-port", "0", "--memory"],
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        seen = b""
        with trio.fail_after(WAIT * 2):
            while not (found := re.search(rb"monitoring on http://127\.0\.0\.1:(\d+)", seen)):
                chunk = await process.stderr.receive_some()
                assert chunk, seen.decode()
                seen += chunk
        port = int(found.group(1))
        status, ready = await _http_get(port, "/readyz")
        assert (status, orjson.loads(ready)) == (200, {"status": "ready"})
        status, metrics = await _http_get(port, "/metrics")
        assert status == 200
        assert b"agentmesh_connections 0.0" in metrics
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()


async def test_a_monitoring_port_out_of_range_is_refused() -> None:
    refused = await cli("start", "--http-port", "70000", "--memory")
    assert refused.returncode == 2
    assert refused.stderr.decode() == (
        "agentmesh: --http-port: port 70000 is out of range (0 to 65535)\n"
    )
    refused = await cli("start", "--memory", env={"AGENTMESH_HTTP_PORT": "x"})
    assert refused.returncode == 2
    assert (
        refused.stderr.decode() == "agentmesh: AGENTMESH_HTTP_PORT: invalid port 'x' (0 to 65535)\n"
    )


# --- task, cancel, and delegate's wait ---------------------------------------------------


def _one_line(done: subprocess.CompletedProcess[bytes]) -> str:
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, done.stderr.decode()
    return lines[0]


async def _slow_worker(nursery: trio.Nursery, url: str, **options: Any) -> Any:
    """An agent whose `slow` waits for `release`; `started` and `cancelled` say how far
    it got, `halfway` reports progress first."""
    agent = Agent("worker")
    events = attrs.make_class("Events", ["started", "release", "cancelled"])(
        trio.Event(), trio.Event(), trio.Event()
    )

    @agent.capability()
    async def slow(ctx: TaskContext) -> str:
        await ctx.progress(0.5, "halfway")
        events.started.set()
        try:
            await events.release.wait()
        except trio.Cancelled:
            events.cancelled.set()
            raise
        return "finished"

    @agent.capability()
    async def shape() -> dict[str, Any]:
        return {"sides": 4, "name": "square"}

    await nursery.start(partial(agent.serve, url, **options))
    return events


async def test_on_an_open_hub_task_reads_any_task_and_cancel_needs_an_admin_token(
    hub: Hub, nursery: trio.Nursery
) -> None:
    url = hub.url or ""
    events = await _slow_worker(nursery, url)
    async with connect(url, name="asker") as asker:
        handle = await asker.submit("slow", {})
        with trio.fail_after(WAIT):
            await events.started.wait()
        # Reading is an operator's right on an open hub, as `tasks` lists every task there.
        read = await cli("task", handle.task_id, "--hub", url, "--json")
        assert read.returncode == 0, read.stderr
        assert orjson.loads(read.stdout)["state"] == "in_progress"
        # Each CLI run is a new connection, never the requester: the hub says no to a
        # cancel, and the line says what would do.
        cancel = await cli("cancel", handle.task_id, "--hub", url)
        assert cancel.returncode == 1
        assert _one_line(cancel) == (
            f"agentmesh: forbidden: only the requester may cancel {handle.task_id}; only an "
            "admin may cancel it: pass an admin token with --token or AGENTMESH_TOKEN (a hub "
            "takes them from --admin-token)"
        )
        assert not handle.done
        unknown = await cli("task", "task_nope", "--hub", url)
        assert unknown.returncode == 1
        assert _one_line(unknown) == "agentmesh: unknown_task: no task 'task_nope'"
        events.release.set()
        with trio.fail_after(WAIT):
            assert await handle.wait() == "finished"


@pytest.mark.parametrize(
    "hub_config", [HubConfig(tokens=frozenset({"user"}), admin_tokens=frozenset({"root"}))]
)
async def test_an_admin_reads_and_cancels_any_task(hub: Hub, nursery: trio.Nursery) -> None:
    url = hub.url or ""
    events = await _slow_worker(nursery, url, token="user")
    async with connect(url, name="asker", token="user") as asker:
        assert await asker.delegate("shape", {}) == {"sides": 4, "name": "square"}
        (done,) = await asker.list_tasks("completed")
        shown = await cli("task", done.task_id, "--hub", url, "--token", "root")
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.decode().splitlines()
        fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in lines[:-4])
        assert fields["task"] == done.task_id
        assert fields["state"] == "completed"
        assert fields["capability"] == "shape"
        assert fields["requester"] == done.requester
        assert fields["assignee"] == done.assignee
        utc = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC"
        assert re.fullmatch(rf"{utc} \((\d+ms|\d\.\ds) ago\)", fields["created"]), fields
        assert re.fullmatch(utc, fields["updated"]), fields
        assert re.fullmatch(r"\d+ms", fields["took"]), fields
        assert (fields["ttl"], fields["success"], fields["error"]) == ("5m00s", "yes", "-")
        # The data as indented JSON under its label.
        assert [line.strip() for line in lines[-4:]] == [
            "data        {",
            '"sides": 4,',
            '"name": "square"',
            "}",
        ]
        as_json = await cli("task", done.task_id, "--json", "--hub", url, "--token", "root")
        assert orjson.loads(as_json.stdout) == {
            **orjson.loads(orjson.dumps(converter.unstructure(done))),
            "data": {"sides": 4, "name": "square"},
        }

        handle = await asker.submit("slow", {})
        with trio.fail_after(WAIT):
            await events.started.wait()
        running = await cli("task", handle.task_id, "--hub", url, "--token", "root")
        assert re.search(r"^took\s+running for \S+…$", running.stdout.decode(), re.M)
        not_admin = await cli("cancel", handle.task_id, "--hub", url, "--token", "user")
        assert not_admin.returncode == 1
        assert _one_line(not_admin) == (
            f"agentmesh: forbidden: only the requester may cancel {handle.task_id}; the "
            "token given is not an admin token, and only an admin may cancel it"
        )
        cancelled = await cli(
            "cancel", handle.task_id, "--reason", "enough", "--hub", url, "--token", "root"
        )
        assert cancelled.returncode == 0, cancelled.stderr
        assert cancelled.stdout.decode() == f"{handle.task_id} cancelled\n"
        with trio.fail_after(WAIT):
            await events.cancelled.wait()  # the agent's handler was cancelled
            with pytest.raises(TaskCancelled, match="enough"):
                await handle.wait()
        again = await cli("cancel", handle.task_id, "--hub", url, "--token", "root")
        assert again.returncode == 1
        assert _one_line(again) == (
            f"agentmesh: task_finished: task {handle.task_id} already ended: cancelled"
        )
        gone = await cli("cancel", "task_nope", "--hub", url, "--token", "root")
        assert _one_line(gone) == "agentmesh: unknown_task: no task 'task_nope'"
        ended = await cli("task", handle.task_id, "--hub", url, "--token", "root")
        assert re.search(r"^error\s+enough$", ended.stdout.decode(), re.M)
        assert re.search(r"^success\s+no$", ended.stdout.decode(), re.M)


async def test_delegate_waits_for_the_task_not_the_timeout_with_a_bar_on_a_terminal(
    hub: Hub, nursery: trio.Nursery
) -> None:
    url = hub.url or ""
    events = await _slow_worker(nursery, url)
    main, terminal = os.openpty()  # stderr a terminal, as a user's is
    command = ["delegate", "slow", "--timeout", "0.5", "--hub", url]
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "agentmesh", *command],
            stdout=subprocess.PIPE,
            stderr=terminal,
        )
    finally:
        os.close(terminal)
    seen = bytearray()
    screen = trio.lowlevel.FdStream(main)
    try:
        with trio.fail_after(WAIT * 2):  # a Python process starting on a loaded machine
            await events.started.wait()
            bar = b"[###############...............]  50% halfway"
            while bar not in seen:
                seen += await screen.receive_some()
        # --timeout was for reaching the hub: the CLI outlives it, still waiting.
        with trio.move_on_after(0.8):
            await process.wait()
        assert process.returncode is None, seen.decode()
        events.release.set()
        with trio.fail_after(WAIT):
            assert await process.wait() == 0
            assert process.stdout is not None
            out = b""
            while chunk := await process.stdout.receive_some():
                out += chunk
            while not seen.endswith(b"\r\x1b[2K"):  # the bar is wiped at the end
                seen += await screen.receive_some()
        assert out == b"finished\n"
    finally:
        process.kill()
        await process.wait()
        await screen.aclose()
        if process.stdout is not None:
            await process.stdout.aclose()


async def test_delegate_off_a_terminal_prints_no_bar_and_ends_at_the_ttl(
    hub: Hub, nursery: trio.Nursery
) -> None:
    url = hub.url or ""
    await _slow_worker(nursery, url)
    timed_out = await cli("delegate", "slow", "--ttl", "0.3", "--hub", url)
    assert timed_out.returncode == 1
    line = _one_line(timed_out)  # no bar: stderr is a pipe
    assert re.fullmatch(r"agentmesh: task task_\w+ timeout: .+", line), line


@pytest.mark.parametrize(
    ("progress", "message", "width", "line"),
    [
        (0.5, "halfway", 30, "[###############...............]  50% halfway"),
        (0.0, None, 4, "[....]   0%"),
        (1.0, "done", 4, "[####] 100% done"),
        (1.7, None, 4, "[####] 100%"),
        (-0.2, None, 4, "[....]   0%"),
        (None, "thinking", 4, "[....]  --% thinking"),
    ],
)
def test_the_progress_bar(
    progress: float | None, message: str | None, width: int, line: str
) -> None:
    assert _bar(progress, message, width=width) == line


class _Lines:
    """A subprocess's output stream, read a line at a time."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self) -> str:
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some()
            assert chunk, f"the stream ended; it had: {self.buffer!r}"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    async def until(self, pattern: str) -> list[str]:
        """The lines read up to and including the first that matches `pattern`."""
        seen = [await self.next()]
        while not re.search(pattern, seen[-1]):
            seen.append(await self.next())
        return seen


async def _watching(url: str, *args: str) -> tuple[trio.Process, _Lines, _Lines]:
    """`agentmesh watch` started, once it says it watches (on stderr)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "agentmesh", "watch", "--hub", url, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = _Lines(process.stdout), _Lines(process.stderr)
    with trio.fail_after(WAIT * 2):
        assert await err.next() == f"agentmesh: watching {url} (Ctrl+C to stop)"
    return process, out, err


async def _stop(process: trio.Process) -> int:
    """Ctrl+C for `process`; its exit code."""
    try:
        process.send_signal(signal.SIGINT)
        with trio.fail_after(WAIT):
            return await process.wait()
    finally:
        await _reap(process)


async def _reap(process: trio.Process) -> None:
    """Kill `process` if it still runs, and close its pipes."""
    process.kill()
    await process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            await stream.aclose()


WATCH_ADMIN = HubConfig(tokens=frozenset({"user"}), admin_tokens=frozenset({"root"}))


@pytest.mark.parametrize("hub_config", [WATCH_ADMIN])
async def test_watch_prints_a_line_per_event_until_ctrl_c(hub: Hub, nursery: trio.Nursery) -> None:
    url = hub.url or ""
    process, out, _ = await _watching(url, "--token", "root")
    try:
        events = await _slow_worker(nursery, url, token="user")
        with trio.fail_after(WAIT):
            joined = await out.next()
        stamp = r"\d\d:\d\d:\d\d\.\d{3}"
        assert re.fullmatch(
            rf"{stamp} \+ agent worker \(agt_\w+\) registered: slow, shape", joined
        ), joined
        async with connect(url, name="asker", token="user") as asker:
            handle = await asker.submit("slow", {})
            with trio.fail_after(WAIT):
                lines = await out.until(r"\d progress task_")
            worker = f"worker \\({handle.agent_id}\\)"
            assert re.fullmatch(
                rf"{stamp} \+ agent asker \({asker.agent_id}\) registered: no capabilities",
                lines[0],
            ), lines
            assert re.fullmatch(
                rf"{stamp} task {handle.task_id} slow pending: asker \(\w+\) -> {worker}",
                lines[1],
            ), lines
            assert len(lines) == 4, lines
            assert lines[2].endswith(f"task {handle.task_id} slow in_progress"), lines
            assert lines[3].endswith(f"progress {handle.task_id} [#####.....]  50% halfway")
            events.release.set()
            await handle.wait()
            with trio.fail_after(WAIT):
                done = await out.next()
            assert re.fullmatch(rf"{stamp} task {handle.task_id} slow completed in \d+ms", done)
            with pytest.raises(NoCapableAgent):
                await asker.delegate("nope-not-offered-anywhere", {})  # refused: no event
            await asker.broadcast("hello\nworld")
            with trio.fail_after(WAIT):
                said = await out.next()
            assert said.endswith(f"broadcast from asker ({asker.agent_id}) to 1: hello"), said
        with trio.fail_after(WAIT):
            left = await out.next()
        assert left.endswith(
            f"- agent asker ({asker.agent_id}) left: agent {asker.agent_id} deregistered"
        )
    finally:
        code = await _stop(process)
    assert code == 130


async def test_watch_json_lines_and_kinds(hub: Hub, nursery: trio.Nursery) -> None:
    url = hub.url or ""
    process, out, _ = await _watching(url, "--json", "--kinds", "task_state,agent_left")
    try:
        async with connect(url, name="passer-by") as passer_by:
            pass  # registered (not watched), then left
        await _slow_worker(nursery, url)
        async with connect(url, name="asker") as asker:
            handle = await asker.submit("shape", {})
            await handle.wait()
            with trio.fail_after(WAIT):
                seen = [orjson.loads(line) for line in await out.until('"completed"')]
    finally:
        await _stop(process)
    kinds = [(e["kind"], e.get("task", {}).get("state")) for e in seen]
    assert kinds == [
        ("agent_left", None),
        ("task_state", "pending"),
        ("task_state", "in_progress"),
        ("task_state", "completed"),
    ], kinds
    assert seen[0]["agent"]["agent_id"] == passer_by.agent_id
    seqs = [e["seq"] for e in seen]
    assert seqs == sorted(set(seqs))  # increasing; the kinds not asked for leave gaps
    assert seen[-1]["task"]["task_id"] == handle.task_id
    assert seen[-1]["duration"] > 0
    assert "missed" not in seen[-1]  # nothing was missed, so it is not printed


@pytest.mark.parametrize("hub_config", [WATCH_ADMIN])
async def test_watch_refusals_are_one_line(hub: Hub) -> None:
    url = hub.url or ""
    not_admin = await cli("watch", "--hub", url, "--token", "user", "--kinds", "task_state")
    assert not_admin.returncode == 1
    assert _one_line(not_admin) == (
        "agentmesh: forbidden: watching tasks, progress and broadcasts needs an admin token; "
        "anyone may watch the agents (agent_registered, agent_online, agent_offline, agent_left)"
    )
    bad = await cli("watch", "--hub", url, "--token", "root", "--kinds", "task_state,teleport")
    assert bad.returncode == 2
    assert _one_line(bad).startswith(
        "agentmesh: --kinds: unknown kind(s) teleport; there are: agent_registered, "
    )
    assert hub._router is not None
    assert not hub._router.events.active


async def test_agents_searches_by_keywords_and_says_why(hub: Hub, nursery: trio.Nursery) -> None:
    assert hub.url is not None
    for name, cap, tags in (("exact", "code-review", ["py"]), ("x", "code-review-x", [])):
        agent = Agent(name, tags=tags)
        agent.capability(cap)(lambda: None)
        await nursery.start(agent.serve, hub.url)
    done = await cli("agents", "Code Review", "--hub", hub.url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert lines[0].split() == ["AGENT", "ID", "NAME", "ONLINE", "CAPABILITIES", "MATCH"]
    assert [line.split()[1] for line in lines[1:]] == ["exact", "x"]
    assert lines[1].endswith("exact code-review")
    assert lines[2].endswith("name code-review-x")
    tagged = await cli("agents", "code review", "--tag", "PY", "--online", "--hub", hub.url)
    assert [line.split()[1] for line in tagged.stdout.decode().splitlines()[1:]] == ["exact"]


async def test_delegate_with_a_priority_out_of_range_is_refused(hub: Hub, echo: Agent) -> None:
    assert hub.url is not None
    done = await cli("delegate", "echo", '{"text": "x"}', "--priority", "101", "--hub", hub.url)
    assert done.returncode == 1
    assert "$.payload.priority: must be an integer from -100 to 100, got 101" in _one_line(done)
    fine = await cli("delegate", "echo", '{"text": "x"}', "--priority", "100", "--hub", hub.url)
    assert fine.returncode == 0, fine.stderr
