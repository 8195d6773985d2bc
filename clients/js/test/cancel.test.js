// Cancellation: an AbortSignal on delegate (or handle.cancel) cancels the task at the hub
// and aborts the agent's ctx.signal; the TTL deadline aborts it too.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { TaskCancelled, TaskTimeout } from "../src/index.js";
import { aborted, gate, requester, runAgent, skip, unique, within } from "./helpers.js";

describe("cancellation and deadlines", { skip, timeout: 15000 }, () => {
  test("aborting the delegate's signal cancels the task in the agent", async () => {
    const capability = unique("wait-forever");
    const started = gate();
    const stopped = gate();
    const agent = await runAgent("js-canceller", {
      [capability]: async (_params, ctx) => {
        started.open(ctx.taskId);
        stopped.open(await aborted(ctx.signal));
        return "never seen";
      },
    });
    const client = await requester();
    const controller = new AbortController();
    const pending = client.delegate(capability, {}, { signal: controller.signal });
    const taskId = await within(started.promise, "the handler starting");
    controller.abort();
    await assert.rejects(within(pending, "the delegate rejecting"), { name: "AbortError" });
    const reason = await within(stopped.promise, "ctx.signal aborting");
    assert.ok(reason instanceof TaskCancelled);
    assert.equal(reason.taskId, taskId);
    assert.match(reason.message, /the requester stopped waiting|aborted/);
    // The hub ends the task before it tells the agent: it is cancelled, for good.
    assert.equal((await client.status(taskId)).state, "cancelled");
    assert.equal(agent.stats.started, 1);
  });

  test("a signal aborted with a reason and handle.cancel(reason) tell the agent why", async () => {
    const capability = unique("cancel-me");
    const reasons = [];
    const seen = gate();
    const started = [];
    const running = gate();
    await runAgent("js-cancel-reasons", {
      [capability]: async (_params, ctx) => {
        started.push(ctx.taskId);
        if (started.length === 2) running.open();
        reasons.push((await aborted(ctx.signal)).message);
        if (reasons.length === 2) seen.open();
      },
    });
    const client = await requester();
    const controller = new AbortController();
    const first = client.delegate(capability, {}, { signal: controller.signal });
    const second = await client.submit(capability, {});
    await within(running.promise, "both handlers starting");
    controller.abort("user pressed stop");
    await assert.rejects(first, (error) => error === "user pressed stop");
    await second.cancel("changed my mind");
    await assert.rejects(within(second.wait(), "the cancelled outcome"), (error) => {
      assert.ok(error instanceof TaskCancelled);
      assert.equal(error.message, "changed my mind");
      return true;
    });
    await within(seen.promise, "both signals aborting");
    assert.deepEqual(reasons.sort(), ["changed my mind", "user pressed stop"]);
  });

  test("the TTL deadline aborts the handler's signal", async () => {
    const capability = unique("too-slow");
    const stopped = gate();
    await runAgent("js-deadline", {
      [capability]: async (_params, ctx) => {
        assert.ok(ctx.deadline > Date.now());
        stopped.open(await aborted(ctx.signal));
      },
    });
    const client = await requester();
    const started = Date.now();
    await assert.rejects(within(client.delegate(capability, {}, { ttl: 0.3 }), "the timeout"), TaskTimeout);
    const reason = await within(stopped.promise, "ctx.signal aborting");
    assert.ok(reason instanceof TaskTimeout, String(reason));
    assert.ok(Date.now() - started >= 250, "not before the deadline");
  });

  test("a handler that ignores its signal is not waited for; its slot is free again", async () => {
    const capability = unique("stubborn");
    const hold = gate();
    const started = gate();
    const agent = await runAgent(
      "js-stubborn",
      { [capability]: () => (started.open(), hold.promise), [`${capability}-quick`]: async () => "quick" },
      { agent: { maxConcurrency: 1 } },
    );
    const client = await requester();
    const handle = await client.submit(capability, {});
    await within(started.promise, "the handler starting");
    await handle.cancel();
    await assert.rejects(within(handle.wait(), "the cancel"), { name: "TaskCancelled", message: "cancelled by the requester" });
    // With one slot, the next task runs: the agent stopped waiting for the stubborn one.
    assert.equal(await within(client.delegate(`${capability}-quick`), "the next task"), "quick");
    hold.open("late"); // returned after the cancel: dropped, nothing is sent
    assert.equal(agent.stats.started, 2);
  });
});
