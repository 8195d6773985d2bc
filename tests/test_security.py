"""Authentication, TLS, authorization and limits, over real sockets."""

from __future__ import annotations

import ssl
import subprocess
import sys
from typing import Any

import pytest
import trio
import trustme

import agentmesh
from agentmesh import Agent, Backoff, Hub, HubConfig, connect

from .conftest import WAIT, open_raw

SECRET, ADMIN = "s3cret-token", "admin-token"
AUTH = HubConfig(tokens={SECRET}, admin_tokens={ADMIN})
ONCE = Backoff(max_attempts=1)


# --- tokens at the handshake -------------------------------------------------------------


async def handshake(port: int, path: str = "/", *headers: str) -> str:
    """Send a WebSocket upgrade request by hand; return the response's status code."""
    request = "\r\n".join(
        [
            f"GET {path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
            *headers,
            "",
            "",
        ]
    )
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request.encode())
            response = b""
            while b"\r\n" not in response:
                chunk = await stream.receive_some()
                assert chunk, response
                response += chunk
    return response.split(b"\r\n", 1)[0].decode().split(" ")[1]  # the status code


@pytest.mark.parametrize("hub_config", [AUTH])
async def test_missing_or_wrong_token_is_refused_with_401(hub: Hub) -> None:
    port = hub.port or 0
    assert await handshake(port) == "401"
    assert await handshake(port, "/?token=wrong") == "401"
    assert await handshake(port, "/", "Authorization: Bearer wrong") == "401"
    assert await handshake(port, "/", "Authorization: Basic " + SECRET) == "401"
    assert await handshake(port, "/", "Authorization: Bearer " + SECRET) == "101"
    assert len(hub.router.registry) == 0  # no frame was read from a refused client


@pytest.mark.parametrize("hub_config", [AUTH])
async def test_token_in_header_or_query(hub: Hub) -> None:
    url = hub.url or ""
    async with open_raw(url + f"/?token={SECRET}") as browser:
        assert (await browser.register("browser"))["payload"]["agent_id"]
    async with connect(url, token=SECRET, name="sdk") as client:
        seen = {a.name: a.online for a in await client.discover()}
        assert seen == {"browser": False, "sdk": True}  # the browser left; it may resume


@pytest.mark.parametrize("hub_config", [AUTH])
async def test_sdk_wrong_token_fails_fast(hub: Hub) -> None:
    with trio.fail_after(WAIT), pytest.raises(agentmesh.Unauthorized) as refused:
        async with connect(hub.url or "", token="nope"):
            pass  # pragma: no cover
    assert "401" in str(refused.value)


@pytest.mark.parametrize("hub_config", [AUTH])
async def test_cli_sends_its_token(hub: Hub) -> None:
    url = hub.url or ""

    async def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        with trio.fail_after(WAIT * 2):
            return await trio.run_process(
                [sys.executable, "-m", "agentmesh", *args, "--hub", url],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )

    assert (await cli("status", "--token", SECRET)).returncode == 0
    refused = await cli("status", "--token", "wrong")
    assert refused.returncode == 3
    assert refused.stderr.decode().count("\n") == 1
    assert "refused the token" in refused.stderr.decode()


# --- authorization -----------------------------------------------------------------------


@pytest.mark.parametrize("hub_config", [AUTH])
async def test_only_the_parties_or_an_admin_see_a_task(hub: Hub, nursery: trio.Nursery) -> None:
    url = hub.url or ""
    agent = Agent("sleeper")
    release = trio.Event()

    @agent.capability()
    async def nap() -> str:
        await release.wait()
        return "rested"

    await nursery.start(lambda task_status: agent.serve(url, token=SECRET, task_status=task_status))
    async with (
        connect(url, token=SECRET, name="owner") as owner,
        connect(url, token=SECRET, name="stranger") as stranger,
        connect(url, token=ADMIN, name="operator") as admin,
        connect(url, token=SECRET, register=False) as looker,
    ):
        task = await owner.submit("nap")
        assert [t.task_id for t in await owner.list_tasks()] == [task.task_id]
        assert await stranger.list_tasks() == []
        with pytest.raises(agentmesh.Forbidden):
            await stranger.status(task.task_id)
        with pytest.raises(agentmesh.Forbidden):
            await stranger.cancel(task.task_id)
        with pytest.raises(agentmesh.Forbidden):
            await looker.list_tasks()  # an unregistered look at everything needs admin

        info = await admin.status(task.task_id)
        assert info.state == "in_progress"  # type: ignore[union-attr]
        assert [t.task_id for t in await admin.list_tasks()] == [task.task_id]
        await admin.cancel(task.task_id, "operator says stop")
        with pytest.raises(agentmesh.TaskCancelled):
            await task.wait()
        release.set()


# --- TLS -----------------------------------------------------------------------------------


async def test_wss_with_a_trusted_ca(nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    hub = Hub()
    port = await nursery.start(
        lambda task_status: hub.serve(
            "127.0.0.1", 0, ssl_context=server_context, task_status=task_status
        )
    )
    url = f"wss://127.0.0.1:{port}"
    assert hub.url == url

    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with connect(url, ssl_context=client_context, name="secure") as client:
        assert [a.name for a in await client.discover()] == ["secure"]

    # Without the CA the certificate is not trusted: the client cannot connect.
    with trio.fail_after(WAIT), pytest.raises(agentmesh.HubUnavailable) as refused:
        async with connect(url, backoff=ONCE):
            pass  # pragma: no cover
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)


# --- limits --------------------------------------------------------------------------------

LIMITS = HubConfig(
    max_agents=3, max_capabilities=2, max_params_size=1_000, max_tasks_per_requester=2
)


@pytest.mark.parametrize("hub_config", [LIMITS])
async def test_limits_each_with_a_code(connect: Any) -> None:
    async with connect() as agent, connect() as requester, connect() as third, connect() as extra:
        many = await agent.request("register", {"name": "a", "capabilities": ["x", "y", "z"]})
        assert many["payload"]["code"] == "limit_exceeded"
        await agent.register("a", "echo")
        await requester.register("r")
        await third.register("t")
        full = await extra.request("register", {"name": "too many"})
        assert full["payload"]["code"] == "limit_exceeded"

        big = await requester.request(
            "delegate", {"capability": "echo", "params": {"blob": "x" * 2_000}}
        )
        assert big["payload"]["code"] == "too_large"
        assert "$.payload.params" in big["payload"]["message"]
        for _ in range(2):
            ok = await requester.request("delegate", {"capability": "echo"})
            assert ok["type"] == "delegate"
        third_task = await requester.request("delegate", {"capability": "echo"})
        assert third_task["payload"]["code"] == "limit_exceeded"

        # Finishing one makes room for the next.
        task = await agent.expect("delegate")
        await agent.send("result", {"task_id": task["payload"]["task_id"], "success": True})
        await requester.expect("result")
        assert (await requester.request("delegate", {"capability": "echo"}))["type"] == "delegate"


@pytest.mark.parametrize("hub_config", [HubConfig(rate_limit=10, rate_burst=5)])
async def test_rate_limit_slows_one_connection_only(connect: Any) -> None:
    async with connect() as flooder, connect() as calm:
        await flooder.register("flooder")
        await calm.register("calm")
        ids = [await flooder.send("heartbeat") for _ in range(20)]
        replies = [await flooder.recv() for _ in ids]
        codes = [r["payload"].get("code") if r["type"] == "error" else "ok" for r in replies]
        assert codes[:4] == ["ok"] * 4  # the rest of the burst of 5 (register took one)
        assert codes.count("rate_limited") >= 10
        assert [r["in_reply_to"] for r in replies] == ids  # every frame answered, in order
        assert (await calm.request("heartbeat"))["type"] == "heartbeat_ack"
        # Malformed frames spend from the same budget.
        for _ in range(5):
            await flooder.ws.send_message("{not json")
        codes = [(await flooder.recv())["payload"]["code"] for _ in range(5)]
        assert "rate_limited" in codes
