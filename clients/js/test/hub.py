"""A hub for the JS tests that stop and start hubs of their own (test/hubs.js).

    python hub.py PORT [--sick DIR]

Serves on 127.0.0.1:PORT (0: a free port) and prints its URL on stdout once it accepts
connections. It stops gracefully (every connection closed with 1001, as on SIGTERM) when
its stdin closes, so it never outlives the node process that started it.

With ``--sick DIR`` the hub keeps its state in DIR/agentmesh.db on a disk that fails
every write: a first registration (a Python client's) finds that out, and from then on
the hub refuses new work with ``store_unavailable``; the URL is printed only then.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
from pathlib import Path

import trio

import agentmesh
from agentmesh import Hub, HubConfig
from agentmesh.sqlite_store import SQLiteStore


def _failing_disk(db: sqlite3.Connection) -> None:
    raise sqlite3.OperationalError("disk I/O error")


async def main(port: int, sick: Path | None) -> None:
    config = HubConfig(close_timeout=0.5)
    store = None if sick is None else SQLiteStore(sick / "agentmesh.db", faults=_failing_disk)
    hub = Hub(config, store=store)  # without a store, in memory
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve, "127.0.0.1", port)
        assert hub.url is not None
        if sick is not None:
            first = agentmesh.Client(hub.url, name="first", hidden=True)
            nursery.start_soon(first.serve)
            with trio.fail_after(10):
                while hub.router.store_error is None:  # noqa: ASYNC110
                    await trio.sleep(0.01)
        print(hub.url, flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        while await stdin.receive_some():
            pass
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--sick", type=Path, default=None)
    args = parser.parse_args()
    trio.run(main, args.port, args.sick)
