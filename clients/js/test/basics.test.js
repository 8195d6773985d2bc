// Register, discover, delegate between JS agents and requesters; typed errors; progress;
// status and listTasks; broadcasts; heartbeats; bad input.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  Agent,
  AgentMeshError,
  Backoff,
  HubUnavailable,
  InvalidMessage,
  NoCapableAgent,
  TaskFailed,
  TaskFinished,
  TaskTimeout,
  UnknownAgent,
  UnknownTask,
  checkParams,
  connect,
} from "../src/index.js";
import { URL_OPEN, gate, nextEvent, requester, runAgent, skip, unique, within } from "./helpers.js";

const SCHEMA = {
  type: "object",
  properties: { text: { type: "string" }, times: { type: "integer", minimum: 1 } },
  required: ["text"],
  additionalProperties: false,
};

describe("a JS agent and a JS requester", { skip, timeout: 15000 }, () => {
  test("register, discover and delegate round trip", async () => {
    const capability = unique("echo");
    const agent = await runAgent("js-echo", {
      [capability]: [async ({ text, times = 1 }) => text.repeat(times), { description: "repeats", paramsSchema: SCHEMA }],
    });
    assert.match(agent.agentId, /^agt_/);
    const client = await requester();
    const [info] = await within(client.discover(capability), "discover");
    assert.equal(info.agentId, agent.agentId);
    assert.equal(info.name, "js-echo");
    assert.equal(info.online, true);
    assert.deepEqual(info.capabilities, [{ name: capability, description: "repeats", paramsSchema: SCHEMA }]);
    // A word of the name matches too: the unique suffix is its own word.
    assert.equal((await client.discover(capability.split("-").at(-1))).length >= 1, true);
    assert.equal(await within(client.delegate(capability, { text: "ab", times: 3 }), "delegate"), "ababab");
    // By ID, and case-insensitively by whole name.
    assert.equal(await client.delegate(` ${capability.toUpperCase()} `, { text: "x" }, { to: agent.agentId }), "x");
    const handle = await client.submit(capability, { text: "h" });
    assert.match(handle.taskId, /^task_/);
    assert.equal(handle.agentId, agent.agentId);
    assert.equal(await within(handle.wait(), "the handle"), "h");
    assert.equal(handle.state, "completed");
    assert.deepEqual(handle.outcome, { taskId: handle.taskId, state: "completed", success: true, data: "h", error: null });
    const record = await client.status(handle.taskId);
    assert.equal(record.state, "completed");
    assert.equal(record.requester, client.agentId);
    assert.equal(record.assignee, agent.agentId);
    const mine = await client.listTasks({ state: "completed", limit: 10 });
    assert.ok(mine.some((task) => task.taskId === handle.taskId));
    const summary = await client.status();
    assert.equal(summary.protocol, 2); // the client asks for version 2
    assert.ok(summary.agents >= 2);
  });

  test("typed errors: refused delegations and tasks that fail", async () => {
    const capability = unique("strict");
    const agent = await runAgent("js-strict", {
      [capability]: [async ({ text }) => text, { paramsSchema: SCHEMA }],
      [`${capability}-raise`]: async () => {
        throw new RangeError("out of range: 7");
      },
      [`${capability}-bigint`]: async () => 10n,
    });
    const client = await requester();
    await assert.rejects(client.delegate(unique("nobody"), {}), (error) => {
      assert.ok(error instanceof NoCapableAgent);
      assert.ok(error instanceof AgentMeshError);
      assert.equal(error.code, "no_capable_agent");
      assert.match(error.message, /no agent offers capability/);
      return true;
    });
    await assert.rejects(client.delegate(capability, {}, { to: "agt_nobody" }), UnknownAgent);
    await assert.rejects(client.delegate(capability, {}, { ttl: -1 }), (error) => {
      assert.ok(error instanceof InvalidMessage);
      assert.match(error.message, /ttl/);
      return true;
    });
    await assert.rejects(client.delegate(`${capability}-raise`), (error) => {
      assert.ok(error instanceof TaskFailed);
      assert.equal(error.code, "failed");
      assert.equal(error.error, "out of range: 7");
      assert.match(error.taskId, /^task_/);
      return true;
    });
    await assert.rejects(client.delegate(capability, { text: 5 }), {
      name: "TaskFailed",
      message: "bad params: param 'text': expected a string, got an integer",
    });
    await assert.rejects(client.delegate(capability, { text: "a", colour: "red" }), {
      message: "bad params: unknown param(s): colour",
    });
    await assert.rejects(client.delegate(capability, {}), { message: "bad params: missing param(s): text" });
    await assert.rejects(client.delegate(`${capability}-bigint`), {
      message: /the handler's return value is not JSON serialisable/,
    });
    await assert.rejects(client.status("task_nope"), UnknownTask);
    const done = await client.submit(capability, { text: "ok" });
    await done.wait();
    await assert.rejects(done.cancel("too late"), TaskFinished);
    assert.equal(agent.stats.started, 3); // bad params never reach the handler
  });

  test("a task past its TTL times out", async () => {
    const capability = unique("stall");
    const hold = gate();
    await runAgent("js-stall", { [capability]: () => hold.promise });
    const client = await requester();
    await assert.rejects(within(client.delegate(capability, {}, { ttl: 0.2 }), "the timeout"), (error) => {
      assert.ok(error instanceof TaskTimeout);
      assert.equal(error.code, "timeout");
      assert.match(error.message, /timed out after 0.2s/);
      return true;
    });
    hold.open();
  });

  test("progress: as an async iterator and as a callback", async () => {
    const capability = unique("steps");
    await runAgent("js-steps", {
      [capability]: async ({ steps }, ctx) => {
        for (let i = 1; i <= steps; i += 1) await ctx.progress(i / steps, `step ${i}`, { i });
        return "done";
      },
    });
    const client = await requester();
    const seen = [];
    const handle = await client.submit(capability, { steps: 4 }, { onProgress: (update) => seen.push(update.progress) });
    const updates = [];
    for await (const update of handle.progress()) updates.push(update);
    assert.equal(await handle.wait(), "done");
    assert.deepEqual(updates.map((u) => u.message), ["step 1", "step 2", "step 3", "step 4"]);
    assert.deepEqual(updates[3], { taskId: handle.taskId, progress: 1, message: "step 4", data: { i: 4 } });
    assert.deepEqual(seen, [0.25, 0.5, 0.75, 1]);
  });

  test("broadcasts reach other agents, as an iterator and as events", async () => {
    const sender = await requester({ name: "js-sender" });
    const listener = await requester({ name: "js-listener" });
    const messages = listener.broadcasts();
    const heard = nextEvent(listener, "broadcast", (m) => m.message === "deploy finished");
    const recipients = await sender.broadcast("deploy finished", { version: "1.2" });
    assert.ok(recipients >= 1);
    const expected = { sender: sender.agentId, message: "deploy finished", data: { version: "1.2" } };
    assert.deepEqual(await heard, expected);
    for (;;) {
      const { value } = await within(messages.next(), "a broadcast");
      if (value.message === "deploy finished") {
        assert.deepEqual(value, expected);
        break;
      }
    }
    await messages.return();
  });

  test("a hidden client is not discovered; a closed one is gone", async () => {
    const hidden = await requester({ name: unique("hidden"), hidden: true });
    const name = unique("leaving");
    const leaving = await connect(URL_OPEN, { name, capabilities: [name] });
    const client = await requester();
    const everyone = await client.discover();
    assert.ok(!everyone.some((a) => a.agentId === hidden.agentId));
    assert.deepEqual((await client.discover(name)).map((a) => a.agentId), [leaving.agentId]);
    await leaving.close(); // deregisters: not merely offline
    assert.deepEqual(await client.discover(name), []);
    await assert.rejects(leaving.discover(), { name: "ClientClosed" });
  });

  test("heartbeats at the announced interval keep an idle client connected", async () => {
    const client = await requester();
    assert.equal(client.heartbeatInterval, 0.5); // the hub's silence limit is 1.5 s
    let dropped = false;
    client.on("disconnect", () => {
      dropped = true;
    });
    await within(new Promise((resolve) => setTimeout(resolve, 1800)), "idling"); // 1.2 silence limits
    assert.equal(dropped, false);
    assert.equal(client.sessions, 1);
    assert.ok(client.online);
  });

  test("requests made before the connection is up wait for it", async () => {
    const capability = unique("early");
    await runAgent("js-early", { [capability]: async () => "up" });
    const client = new (await import("../src/index.js")).Client(URL_OPEN, { name: "js-eager" });
    try {
      // Sent before registering: it waits for the connection, not failing.
      const [found, result] = await within(Promise.all([client.discover(capability), client.delegate(capability)]), "early requests");
      assert.equal(found.length, 1);
      assert.equal(result, "up");
    } finally {
      await client.close();
    }
  });
});

describe("bad input", { skip, timeout: 10000 }, () => {
  test("a bad URL is a clear TypeError", async () => {
    await assert.rejects(connect("http://127.0.0.1:1"), {
      name: "TypeError",
      message: 'agentmesh: the hub URL must look like ws://host:port (or wss://), got "http://127.0.0.1:1"',
    });
    await assert.rejects(connect("not a url"), { name: "TypeError", message: /must look like ws:\/\/host:port/ });
    assert.throws(() => new Agent(""), TypeError);
  });

  test("a hub that is not there: HubUnavailable after maxAttempts, naming the cause", async () => {
    const closed = await new Promise((resolve) => {
      // A port nobody listens on: bind one, note it, close it.
      import("node:net").then(({ createServer }) => {
        const server = createServer().listen(0, "127.0.0.1", () => {
          const { port } = server.address();
          server.close(() => resolve(port));
        });
      });
    });
    const started = Date.now();
    await assert.rejects(
      within(connect(`ws://127.0.0.1:${closed}`, { backoff: new Backoff({ base: 0.01, maxAttempts: 3 }) }), "giving up"),
      (error) => {
        assert.ok(error instanceof HubUnavailable);
        assert.match(error.message, new RegExp(`cannot reach the hub at ws://127.0.0.1:${closed} after 3 attempt\\(s\\): .*ECONNREFUSED`));
        return true;
      },
    );
    assert.ok(Date.now() - started < WAIT_SHORT);
  });

  test("an aborted signal stops a client that is still trying to connect", async () => {
    const controller = new AbortController();
    const pending = connect("ws://127.0.0.1:1", { signal: controller.signal, backoff: { base: 0.05 } });
    controller.abort();
    await assert.rejects(within(pending, "the abort"), { name: "ClientClosed" });
  });

  test("the agent checks params against the schema's subset", () => {
    assert.equal(checkParams(SCHEMA, { text: "a", times: 2 }), null);
    assert.equal(checkParams(SCHEMA, { text: "a", times: 0 }), "param 'times': must be at least 1, got 0");
    assert.equal(checkParams(SCHEMA, { text: "a", times: 1.5 }), "param 'times': expected an integer, got a number");
    assert.equal(checkParams(SCHEMA, []), "params must be an object, got an array");
    const nested = { properties: { tags: { type: "array", items: { enum: ["a", "b"] } } } };
    assert.equal(checkParams(nested, { tags: ["a", "c"] }), `param 'tags'[1]: must be one of "a", "b", got "c"`);
    assert.equal(checkParams(null, { anything: 1 }), null);
  });
});

const WAIT_SHORT = 3000;
