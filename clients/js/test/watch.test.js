// Watching the network (protocol §4.16) on an open hub, where any client is an
// operator: agents coming and going, tasks' states, progress and broadcasts; the watch
// comes back after a reconnection.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { InvalidMessage, connect } from "../src/index.js";
import { URL_OPEN, nextEvent, requester, runAgent, skip, unique, within } from "./helpers.js";

/**
 * The first event from `events` that `match` accepts.
 * @param {AsyncIterator<any>} events
 * @param {(event: any) => boolean} match
 */
async function first(events, match, what) {
  return within(
    (async () => {
      for (;;) {
        const { value, done } = await events.next();
        if (done) throw new Error(`the watch ended before ${what}`);
        if (match(value)) return value;
      }
    })(),
    what,
  );
}

describe("watch", { skip, timeout: 15000 }, () => {
  test("agent and task events, in order, with their fields", async () => {
    const looker = await requester({ register: false });
    const events = looker.watch(["agent_registered", "agent_left", "task_state", "task_progress", "broadcast"]);
    await within(events.ready, "the watch reply");
    const capability = unique("observed");
    const agent = await runAgent("js-observed", {
      [capability]: async (_params, ctx) => {
        await ctx.progress(0.5, "half");
        return "ok";
      },
    });
    const registered = await first(events, (e) => e.kind === "agent_registered" && e.agent.agentId === agent.agentId, "agent_registered");
    assert.equal(registered.agent.name, "js-observed");
    assert.equal(registered.missed, 0);
    assert.ok(Number.isInteger(registered.seq));
    const client = await requester();
    const handle = await client.submit(capability, {});
    await handle.wait();
    const progress = await first(events, (e) => e.kind === "task_progress" && e.progress.taskId === handle.taskId, "task_progress");
    assert.deepEqual(progress.progress, { taskId: handle.taskId, progress: 0.5, message: "half" });
    const completed = await first(events, (e) => e.kind === "task_state" && e.task.taskId === handle.taskId && e.task.state === "completed", "completed");
    assert.ok(completed.seq > progress.seq);
    assert.equal(completed.task.data, null); // events leave data out
    await client.broadcast("hello watchers");
    const broadcast = await first(events, (e) => e.kind === "broadcast" && e.broadcast.sender === client.agentId, "broadcast");
    assert.equal(broadcast.broadcast.message, "hello watchers");
    await agent.stop();
    const left = await first(events, (e) => e.kind === "agent_left" && e.agent.agentId === agent.agentId, "agent_left");
    assert.match(left.reason, /deregistered/);
    await events.return();
  });

  test("an unknown kind is refused; after break, the client may watch again", async () => {
    const looker = await requester({ register: false });
    await assert.rejects(within(looker.watch(["teleports"]).next(), "the refusal"), InvalidMessage);
    const events = looker.watch(["agent_registered"]);
    await within(events.ready, "the watch reply");
    const name = unique("newcomer");
    const newcomer = await connect(URL_OPEN, { name });
    try {
      for await (const event of events) {
        if (event.agent.name === name) break; // unwatches
      }
      assert.equal(looker._watch, null);
      const again = looker.watch(["agent_left"]);
      await within(again.ready, "the second watch");
      await again.return();
    } finally {
      await newcomer.close();
    }
  });

  test("a watch comes back after a reconnection", async () => {
    const looker = await requester({ backoff: { base: 0.05 } });
    const events = looker.watch(["agent_registered"]);
    await within(events.ready, "the watch reply");
    const resumed = nextEvent(looker, "connect");
    await within(looker.delegate("py-drop", { agent_id: looker.agentId }), "py-drop");
    await resumed;
    const name = unique("after-drop");
    const late = await connect(URL_OPEN, { name });
    try {
      const event = await first(events, (e) => e.agent.name === name, "an event after the resume");
      assert.equal(event.kind, "agent_registered");
    } finally {
      await late.close();
      await events.return();
    }
  });
});
