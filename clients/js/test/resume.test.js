// Dropped connections (Hub.drop from the Python side, close code 4004), then a resume
// with the token: the requester hears every outcome exactly once, the agent never runs a
// task twice, re-sends a result it made while offline, and requests wait for the
// connection.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { gate, nextEvent, requester, runAgent, skip, unique, within } from "./helpers.js";

/** Count the `result` frames each task gets, as they arrive, before the client's dedup. */
function countOutcomes(client) {
  const counts = new Map();
  const dispatch = client._dispatch.bind(client);
  client._dispatch = (data) => {
    const frame = JSON.parse(String(data));
    if (frame.type === "result" && frame.in_reply_to == null) {
      counts.set(frame.payload.task_id, (counts.get(frame.payload.task_id) ?? 0) + 1);
    }
    dispatch(data);
  };
  return counts;
}

describe("drop and resume", { skip, timeout: 15000 }, () => {
  test("a requester dropped while it waits hears each outcome exactly once", async () => {
    const capability = unique("held");
    const hold = gate();
    await runAgent("js-held", { [capability]: async ({ n }) => (await hold.promise, n * 2) });
    const client = await requester({ backoff: { base: 0.05 } });
    const agentId = client.agentId;
    const frames = countOutcomes(client);
    const handles = await Promise.all(Array.from({ length: 20 }, (_, n) => client.submit(capability, { n })));
    const settled = new Map();
    for (const handle of handles) {
      handle.wait().then((value) => settled.set(handle.taskId, [...(settled.get(handle.taskId) ?? []), value]));
    }
    // The outcomes come while it is away: the agent finishes once the hub has cut it.
    const dropped = nextEvent(client, "disconnect");
    const resumed = nextEvent(client, "connect");
    // Its own request cuts it: the Python helper calls Hub.drop(agent_id) for it.
    const cut = client.delegate("py-drop", { agent_id: agentId });
    const { code, reason } = await dropped;
    assert.equal(code, 4004);
    assert.equal(reason, "dropped by the JS test");
    hold.open();
    const back = await resumed;
    assert.deepEqual(back, { agentId, resumed: true, session: 2 });
    assert.equal(await within(cut, "py-drop's outcome after the resume"), true);
    const values = await within(Promise.all(handles.map((h) => h.wait())), "every outcome");
    assert.deepEqual(values, Array.from({ length: 20 }, (_, n) => n * 2));
    await within(client.status(), "a round trip"); // any second copy would have come by now
    for (const handle of handles) {
      assert.deepEqual(settled.get(handle.taskId), [handle.outcome.data]);
      assert.ok(frames.get(handle.taskId) >= 1);
    }
    assert.equal(client.agentId, agentId);
  });

  test("an agent dropped mid-task resumes, drops the re-sent task, runs it once", async () => {
    const capability = unique("long");
    const hold = gate();
    const started = gate();
    const agent = await runAgent("js-long", {
      [capability]: async (_params, ctx) => {
        started.open();
        await hold.promise;
        return ctx.taskId;
      },
    }, { backoff: { base: 0.05 } });
    const client = await requester();
    const handle = await client.submit(capability, {});
    await within(started.promise, "the handler starting");
    const resumed = nextEvent(agent.client, "connect");
    assert.equal(await within(client.delegate("py-drop", { agent_id: agent.agentId }), "py-drop"), true);
    assert.equal((await resumed).resumed, true);
    await within(agent.client.status(), "the end of the catch-up"); // its reply follows it
    assert.equal(agent.stats.duplicates, 1);
    hold.open();
    assert.equal(await within(handle.wait(), "the outcome"), handle.taskId);
    assert.equal(agent.stats.started, 1);
  });

  test("a result made while offline is sent again when the task comes back", async () => {
    const capability = unique("offline-result");
    const hold = gate();
    const started = gate();
    const agent = await runAgent("js-offline", {
      [capability]: async () => {
        started.open();
        await hold.promise;
        return "made offline";
      },
    }, { backoff: { base: 0.05 } });
    agent.client.on("disconnect", () => hold.open()); // finish while the socket is down
    const client = await requester();
    const handle = await client.submit(capability, {});
    await within(started.promise, "the handler starting");
    await within(client.delegate("py-drop", { agent_id: agent.agentId }), "py-drop");
    assert.equal(await within(handle.wait(), "the outcome"), "made offline");
    assert.equal(agent.stats.started, 1);
    assert.equal(agent.stats.resent, 1);
  });

  test("requests made while disconnected wait for the connection", async () => {
    const client = await requester({ backoff: { base: 0.05 } });
    const control = await requester({ name: "js-control", hidden: true });
    const later = nextEvent(client, "disconnect").then(() => client.delegate("py-echo", { text: "after" }));
    await within(control.delegate("py-drop", { agent_id: client.agentId }), "py-drop");
    assert.equal(await within(later, "the request made while offline"), "py:after");
    assert.equal(client.sessions, 2);
  });
});
