"""The hub over real loopback sockets, driven by plain WebSocket clients speaking JSON."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from agentmesh import Hub, HubConfig

from .conftest import WAIT, RawClient, open_raw

Connect = Any


async def _pair(connect: Connect, stack: Any) -> tuple[RawClient, RawClient]:
    agent = await stack.enter_async_context(connect())
    requester = await stack.enter_async_context(connect())
    await agent.register("echoer", {"name": "echo", "description": "says it back"})
    await requester.register("asker")
    return agent, requester


async def _quiet(client: RawClient) -> None:
    """Assert nothing else is queued for `client`: the next frame is a heartbeat ack."""
    reply = await client.request("heartbeat")
    assert reply["type"] == "heartbeat_ack"
    assert client.inbox == []


# --- register, discover ---------------------------------------------------------------


async def test_register_assigns_id_and_token(connect: Connect) -> None:
    async with connect() as client:
        reply = await client.request("register", {"name": "a", "capabilities": ["echo"]})
        assert reply["type"] == "register"
        assert reply["from"] == "hub"
        payload = reply["payload"]
        assert payload["agent_id"].startswith("agt_")
        assert len(payload["resume_token"]) >= 24
        assert payload["heartbeat_interval"] == 30.0
        assert payload["resumed"] is False
        again = await client.request("register", {"name": "a"})
        assert again["payload"]["code"] == "already_registered"


async def test_discover_by_name_and_keyword(connect: Connect) -> None:
    async with connect() as a, connect() as b, connect() as c:
        await a.register("reviewer", {"name": "Code-Review", "description": "reviews diffs"})
        await b.register("echoer", "echo")
        await c.register("asker")
        for keyword, expected in [
            ("code-review", {a.agent_id}),
            ("REVIEW", {a.agent_id}),
            ("echo", {b.agent_id}),
            ("rev", set()),
            ("", {a.agent_id, b.agent_id, c.agent_id}),
        ]:
            reply = await c.request("discover", {"capability": keyword})
            assert {x["agent_id"] for x in reply["payload"]["agents"]} == expected, keyword
        reply = await c.request("discover", {"capability": "review"})
        [info] = reply["payload"]["agents"]
        assert info["name"] == "reviewer"
        assert info["capabilities"][0]["description"] == "reviews diffs"
        assert info["online"] is True


async def test_unregistered_connection_may_only_look(connect: Connect) -> None:
    async with connect() as client:
        assert (await client.request("discover"))["type"] == "discover"
        assert (await client.request("status"))["payload"]["agents"] == 0
        reply = await client.request("delegate", {"capability": "echo"})
        assert reply["type"] == "error"
        assert reply["payload"]["code"] == "not_registered"


# --- delegate and results -------------------------------------------------------------


async def test_delegate_by_id_round_trip(connect: Connect) -> None:
    async with connect() as agent, connect() as requester:
        await agent.register("echoer", "echo")
        await requester.register("asker")
        ack = await requester.request(
            "delegate", {"capability": "echo", "params": {"text": "hi"}}, to=agent.agent_id
        )
        assert ack["type"] == "delegate"
        assert ack["payload"]["agent_id"] == agent.agent_id
        assert ack["payload"]["state"] == "in_progress"
        task_id = ack["payload"]["task_id"]

        task = await agent.expect("delegate")
        assert task["from"] == requester.agent_id
        assert task["to"] == agent.agent_id
        assert task["payload"]["task_id"] == task_id
        assert task["payload"]["params"] == {"text": "hi"}
        assert 0 < task["payload"]["ttl"] <= 300

        await agent.send("result", {"task_id": task_id, "success": True, "data": {"text": "hi"}})
        result = await requester.expect("result")
        assert result["from"] == agent.agent_id
        assert result["payload"] == {
            "task_id": task_id,
            "state": "completed",
            "success": True,
            "data": {"text": "hi"},
            "error": None,
        }
        await _quiet(agent)  # the result itself is not acknowledged: no frame wasted


async def test_delegate_by_capability_picks_least_busy(connect: Connect) -> None:
    async with connect() as a, connect() as b, connect() as requester:
        await a.register("a", "echo")
        await b.register("b", "echo")
        await requester.register("asker")
        picked = []
        for _ in range(4):
            ack = await requester.request("delegate", {"capability": "ECHO"})
            picked.append(ack["payload"]["agent_id"])
        # Nobody answers, so each pick goes to whoever has fewer tasks in flight.
        assert sorted(picked) == sorted([a.agent_id, b.agent_id] * 2)
        assert picked[0] != picked[1]


async def test_delegate_errors(connect: Connect) -> None:
    async with connect() as agent, connect() as requester:
        await agent.register("echoer", "echo")
        await requester.register("asker")
        cases = [
            ({"capability": "echo"}, {"to": "agt_nobody"}, "unknown_agent"),
            ({"capability": "translate"}, {}, "no_capable_agent"),
            ({"capability": "translate"}, {"to": agent.agent_id}, "no_capable_agent"),
            ({"capability": "echo", "ttl": "abc"}, {}, "invalid_message"),
            ({"capability": "echo", "ttl": 0}, {}, "invalid_message"),
            ({"capability": "echo", "params": [1, 2]}, {}, "invalid_message"),
        ]
        for payload, envelope, code in cases:
            reply = await requester.request("delegate", payload, **envelope)
            assert reply["type"] == "error", payload
            assert reply["payload"]["code"] == code, (payload, reply)
            assert reply["payload"]["message"]
        await _quiet(agent)  # none of those reached the agent


async def test_failure_result_reaches_requester(connect: Connect) -> None:
    async with connect() as agent, connect() as requester:
        await agent.register("echoer", "echo")
        await requester.register("asker")
        ack = await requester.request("delegate", {"capability": "echo"})
        task_id = ack["payload"]["task_id"]
        await agent.expect("delegate")
        await agent.send("result", {"task_id": task_id, "success": False, "error": "boom"})
        result = await requester.expect("result")
        assert result["payload"]["state"] == "failed"
        assert result["payload"]["error"] == "boom"


async def test_duplicate_and_foreign_results_are_refused(connect: Connect) -> None:
    async with connect() as agent, connect() as other, connect() as requester:
        await agent.register("echoer", "echo")
        await other.register("intruder", "echo")
        await requester.register("asker")
        ack = await requester.request("delegate", {"capability": "echo"}, to=agent.agent_id)
        task_id = ack["payload"]["task_id"]

        foreign = await other.request("result", {"task_id": task_id, "success": True, "data": 1})
        assert foreign["payload"]["code"] == "forbidden"

        await agent.send("result", {"task_id": task_id, "success": True, "data": 2})
        assert (await requester.expect("result"))["payload"]["data"] == 2

        dup = await agent.request("result", {"task_id": task_id, "success": True, "data": 3})
        assert dup["payload"]["code"] == "task_finished"
        unknown = await agent.request("result", {"task_id": "task_nope", "success": True})
        assert unknown["payload"]["code"] == "unknown_task"
        await _quiet(requester)  # heard exactly once


async def test_spoofed_from_is_overwritten(connect: Connect) -> None:
    async with connect() as agent, connect() as requester, connect() as victim:
        await agent.register("echoer", "echo")
        await requester.register("asker")
        await victim.register("victim")
        await requester.send("delegate", {"capability": "echo"}, **{"from": victim.agent_id})
        task = await agent.expect("delegate")
        assert task["from"] == requester.agent_id
        await requester.send("broadcast", {"message": "hi"}, **{"from": victim.agent_id})
        heard = await agent.expect("broadcast")
        assert heard["from"] == requester.agent_id


# --- status, broadcast, heartbeat, progress, cancel -----------------------------------


async def test_status_of_task_and_hub(connect: Connect) -> None:
    async with connect() as agent, connect() as requester, connect() as stranger:
        await agent.register("echoer", "echo")
        await requester.register("asker")
        await stranger.register("stranger")
        ack = await requester.request("delegate", {"capability": "echo", "params": {"n": 1}})
        task_id = ack["payload"]["task_id"]
        for client in (requester, agent):
            reply = await client.request("status", {"task_id": task_id})
            assert reply["payload"]["state"] == "in_progress"
            assert reply["payload"]["requester"] == requester.agent_id
            assert reply["payload"]["assignee"] == agent.agent_id
        forbidden = await stranger.request("status", {"task_id": task_id})
        assert forbidden["payload"]["code"] == "forbidden"
        unknown = await stranger.request("status", {"task_id": "task_x"})
        assert unknown["payload"]["code"] == "unknown_task"

        summary = (await stranger.request("status"))["payload"]
        assert summary["agents"] == 3
        assert summary["online"] == 3
        assert summary["tasks"]["in_progress"] == 1
        assert summary["counters"]["delegated"] == 1
        assert summary["uptime"] >= 0


async def test_broadcast_reaches_everyone_else(connect: Connect) -> None:
    async with connect() as a, connect() as b, connect() as c, connect() as lurker:
        for client, name in ((a, "a"), (b, "b"), (c, "c")):
            await client.register(name)
        ack = await a.request("broadcast", {"message": "hello", "data": {"k": 1}})
        assert ack["payload"] == {"recipients": 2}
        for client in (b, c):
            heard = await client.expect("broadcast")
            assert heard["from"] == a.agent_id
            assert heard["payload"] == {"message": "hello", "data": {"k": 1}}
        await _quiet(a)  # not echoed to the sender
        await _quiet(lurker)  # not to connections that never registered


async def test_heartbeat_is_acknowledged(connect: Connect) -> None:
    async with connect() as client:
        msg_id = await client.send("heartbeat")
        ack = await client.recv()
        assert ack["type"] == "heartbeat_ack"
        assert ack["in_reply_to"] == msg_id


async def test_progress_is_forwarded_from_assignee_only(connect: Connect) -> None:
    async with connect() as agent, connect() as requester:
        await agent.register("echoer", "echo")
        await requester.register("asker")
        ack = await requester.request("delegate", {"capability": "echo"})
        task_id = ack["payload"]["task_id"]
        await agent.send("progress", {"task_id": task_id, "progress": 0.5, "message": "half"})
        update = await requester.expect("progress")
        assert update["from"] == agent.agent_id
        assert update["payload"]["progress"] == 0.5
        assert update["payload"]["message"] == "half"
        refused = await requester.request("progress", {"task_id": task_id, "progress": 1})
        assert refused["payload"]["code"] == "forbidden"


async def test_cancel_by_requester(connect: Connect) -> None:
    async with connect() as agent, connect() as requester:
        await agent.register("echoer", "echo")
        await requester.register("asker")
        ack = await requester.request("delegate", {"capability": "echo"})
        task_id = ack["payload"]["task_id"]
        await agent.expect("delegate")

        refused = await agent.request("cancel", {"task_id": task_id})
        assert refused["payload"]["code"] == "forbidden"

        reply = await requester.request("cancel", {"task_id": task_id, "reason": "changed mind"})
        assert reply["payload"] == {"task_id": task_id, "state": "cancelled"}
        result = await requester.expect("result")
        assert result["payload"]["state"] == "cancelled"
        told = await agent.expect("cancel")
        assert told["payload"] == {"task_id": task_id, "reason": "changed mind"}

        late = await agent.request("result", {"task_id": task_id, "success": True})
        assert late["payload"]["code"] == "task_finished"
        again = await requester.request("cancel", {"task_id": task_id})
        assert again["payload"]["code"] == "task_finished"
        await _quiet(requester)


async def test_deregister_fails_its_tasks(connect: Connect) -> None:
    async with connect() as agent, connect() as requester:
        await agent.register("echoer", "echo")
        await requester.register("asker")
        ack = await requester.request("delegate", {"capability": "echo"})
        reply = await agent.request("deregister")
        assert reply["payload"] == {"agent_id": agent.agent_id}
        result = await requester.expect("result")
        assert result["payload"]["task_id"] == ack["payload"]["task_id"]
        assert result["payload"]["state"] == "failed"
        assert "deregistered" in result["payload"]["error"]
        gone = await requester.request("discover", {"capability": "echo"})
        assert gone["payload"]["agents"] == []
        after = await agent.request("delegate", {"capability": "echo"})
        assert after["payload"]["code"] == "not_registered"


# --- timers ---------------------------------------------------------------------------


async def test_ttl_timeout_then_late_result(connect: Connect) -> None:
    async with connect() as agent, connect() as requester:
        await agent.register("echoer", "echo")
        await requester.register("asker")
        ack = await requester.request("delegate", {"capability": "echo", "ttl": 0.2})
        task_id = ack["payload"]["task_id"]
        start = trio.current_time()
        result = await requester.expect("result")
        assert trio.current_time() - start >= 0.15  # not before its TTL
        assert result["payload"]["state"] == "timeout"
        assert result["from"] == "hub"
        told = await agent.expect("cancel")
        assert told["payload"]["task_id"] == task_id
        late = await agent.request("result", {"task_id": task_id, "success": True})
        assert late["payload"]["code"] == "task_finished"
        await _quiet(requester)


@pytest.mark.parametrize("hub_config", [HubConfig(heartbeat_interval=0.1)])
async def test_silent_connection_is_closed(connect: Connect) -> None:
    async with connect() as silent, connect() as chatty:
        await silent.register("silent")
        await chatty.register("chatty")

        async def keep_talking() -> None:
            while True:
                await chatty.request("heartbeat")
                await trio.sleep(0.05)  # a heartbeat cadence, not a wait for a result

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_talking)
            with pytest.raises(ConnectionClosed) as closed:
                await silent.recv()  # says nothing, hears nothing, until the hub closes it
            nursery.cancel_scope.cancel()
        assert closed.value.reason.code == 4001
        summary = (await chatty.request("status"))["payload"]
        assert summary["online"] == 1


@pytest.mark.parametrize("hub_config", [HubConfig(resume_grace=0.3)])
async def test_assignee_disconnect_fails_task_after_grace(connect: Connect) -> None:
    async with connect() as requester:
        await requester.register("asker")
        async with connect() as agent:
            await agent.register("echoer", "echo")
            ack = await requester.request("delegate", {"capability": "echo"})
            await agent.expect("delegate")
        result = await requester.expect("result")
        assert result["payload"]["task_id"] == ack["payload"]["task_id"]
        assert result["payload"]["state"] == "failed"
        assert "did not resume" in result["payload"]["error"]


async def test_resume_gets_identity_and_pending_tasks_back(connect: Connect) -> None:
    async with connect() as requester:
        await requester.register("asker")
        async with connect() as agent:
            await agent.register("echoer", "echo")
            agent_id, token = agent.agent_id, agent.resume_token
        # The agent is away: a task for it waits, PENDING.
        ack = await requester.request("delegate", {"capability": "echo"}, to=agent_id)
        assert ack["payload"]["state"] == "pending"
        task_id = ack["payload"]["task_id"]
        async with connect() as back:
            bad = await back.request(
                "register", {"name": "x", "resume": {"agent_id": agent_id, "token": "wrong"}}
            )
            assert bad["payload"]["resumed"] is False
            assert bad["payload"]["agent_id"] != agent_id
        async with connect() as back:
            reply = await back.request(
                "register",
                {
                    "name": "echoer",
                    "capabilities": ["echo"],
                    "resume": {"agent_id": agent_id, "token": token},
                },
            )
            assert reply["payload"]["agent_id"] == agent_id
            assert reply["payload"]["resumed"] is True
            task = await back.expect("delegate")
            assert task["payload"]["task_id"] == task_id
            pushed = await requester.expect("status")
            assert pushed["payload"]["task_id"] == task_id
            assert pushed["payload"]["state"] == "in_progress"
            await back.send("result", {"task_id": task_id, "success": True, "data": "done"})
            result = await requester.expect("result")
            assert result["payload"]["data"] == "done"


async def test_requester_resume_gets_missed_outcome(connect: Connect) -> None:
    async with connect() as agent:
        await agent.register("echoer", "echo")
        async with connect() as requester:
            await requester.register("asker")
            ack = await requester.request("delegate", {"capability": "echo"})
            task_id = ack["payload"]["task_id"]
            resume = {"agent_id": requester.agent_id, "token": requester.resume_token}
        await agent.expect("delegate")
        await agent.send("result", {"task_id": task_id, "success": True, "data": 42})
        await _quiet(agent)  # the hub has handled the result by now
        async with connect() as back:
            reply = await back.request("register", {"name": "asker", "resume": resume})
            assert reply["payload"]["resumed"] is True
            result = await back.expect("result")
            assert result["payload"]["task_id"] == task_id
            assert result["payload"]["data"] == 42
            await _quiet(back)  # exactly once


async def test_resume_replaces_a_stale_connection(connect: Connect) -> None:
    async with connect() as first, connect() as second:
        await first.register("echoer", "echo")
        resume = {"agent_id": first.agent_id, "token": first.resume_token}
        reply = await second.request("register", {"name": "echoer", "resume": resume})
        assert reply["payload"]["resumed"] is True
        with pytest.raises(ConnectionClosed) as closed:
            await first.recv()
        assert closed.value.reason.code == 4003


# --- bad input ------------------------------------------------------------------------


async def test_malformed_frames_get_errors_and_connection_stays(connect: Connect) -> None:
    async with connect() as client:
        for frame, code in [
            ("{not json", "invalid_message"),
            ("[1, 2]", "invalid_message"),
            ('{"type": "register"}', "invalid_message"),
            ('{"type": "teleport", "id": "x1"}', "unknown_type"),
            ('{"type": "register", "id": "x2", "payload": {"name": 7}}', "invalid_message"),
        ]:
            await client.ws.send_message(frame)
            error = await client.recv()
            assert error["type"] == "error", frame
            assert error["payload"]["code"] == code, frame
        await client.ws.send_message(b'{"type": "heartbeat", "id": "b"}')
        error = await client.recv()
        assert error["payload"]["code"] == "invalid_message"
        assert "binary" in error["payload"]["message"]
        reply = await client.register("still-here")
        assert reply["payload"]["agent_id"]


@pytest.mark.parametrize("hub_config", [HubConfig(max_frame_size=10_000)])
async def test_a_result_too_large_to_forward_is_refused(connect: Connect) -> None:
    async with connect() as agent, connect() as requester:
        await agent.register("echoer", "echo")
        await requester.register("asker")
        ack = await requester.request("delegate", {"capability": "echo"})
        task_id = ack["payload"]["task_id"]
        big = await agent.request(
            "result", {"task_id": task_id, "success": True, "data": "x" * 9_500}
        )
        assert big["payload"]["code"] == "too_large"
        await agent.send("result", {"task_id": task_id, "success": True, "data": "fits"})
        assert (await requester.expect("result"))["payload"]["data"] == "fits"


@pytest.mark.parametrize("hub_config", [HubConfig(max_frame_size=10_000)])
async def test_oversized_frame_closes_with_1009(connect: Connect) -> None:
    async with connect() as big, connect() as bystander:
        await bystander.register("bystander")

        async def send_big() -> None:  # refused once its header arrives, maybe mid-send
            await big.send("broadcast", {"message": "x" * 20_000})
            await big.recv()

        with pytest.raises(ConnectionClosed) as closed:
            await send_big()
        assert closed.value.reason.code == 1009
        assert (await bystander.request("heartbeat"))["type"] == "heartbeat_ack"


@pytest.mark.parametrize("hub_config", [HubConfig(outbox_size=4)])
async def test_slow_consumer_is_dropped_and_others_go_on(hub: Hub, connect: Connect) -> None:
    # An agent that stops reading: its library queue holds one message, then TCP fills.
    async with open_raw(hub.url, message_queue_size=0) as slow:
        await slow.register("slow", "sink")
        async with connect() as speaker, connect() as listener:
            await speaker.register("speaker")
            await listener.register("listener")
            big = {"blob": "x" * 200_000}
            sent = 0
            with trio.fail_after(WAIT * 4):
                while hub.router.summary().online == 3:  # tasks pile up for the slow agent
                    ack = await speaker.request("delegate", {"capability": "sink", "params": big})
                    assert ack["type"] == "delegate", ack
                    sent += 1
            assert sent > 4
            ack = await speaker.request("broadcast", {"message": "after"})
            assert ack["payload"]["recipients"] == 1
            assert (await listener.expect("broadcast"))["payload"]["message"] == "after"


@pytest.mark.parametrize("hub_config", [HubConfig(outbox_size=4)])
async def test_broadcasts_never_make_a_slow_reader_a_slow_consumer(
    hub: Hub, connect: Connect
) -> None:
    # Broadcasts are advisory: a peer that is behind misses some instead of being cut off.
    async with open_raw(hub.url, message_queue_size=0) as slow:
        await slow.register("slow")
        async with connect() as speaker, connect() as listener:
            await speaker.register("speaker")
            await listener.register("listener")
            big = "x" * 200_000
            for _ in range(40):
                ack = await speaker.request("broadcast", {"message": big})
                assert ack["payload"]["recipients"] == 2
                heard = await listener.expect("broadcast")
                assert len(heard["payload"]["message"]) == len(big)
            assert hub.router.summary().online == 3


async def test_graceful_shutdown_closes_with_1001() -> None:
    hub = Hub()
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve, "127.0.0.1", 0)
        async with open_raw(hub.url) as client:
            await client.register("a")
            nursery.cancel_scope.cancel()
            with pytest.raises(ConnectionClosed) as closed:
                await client.recv()
            assert closed.value.reason.code == 1001
    with pytest.raises(HandshakeError):  # nobody listens any more
        async with open_websocket_url(hub.url):
            pass
