// Issue 16 from the JS side: limits registered with the hub (the agent's and a
// capability's), the hub's dispatch queue (pending handles with agentId "", their
// queuePosition, priority first, the status push that names the assignee), discover's
// ranking with `match`, and its online and tags filters.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { Agent, connect } from "../src/index.js";
import { URL_OPEN, WAIT, gate, requester, runAgent, skip, unique, within } from "./helpers.js";

/** A word of letters and digits only, no other test uses: keeps a search to this test. */
function word() {
  return unique("w").replace(/-/g, "x");
}

/**
 * `check()` until it returns something truthy (every 20 ms), within the helpers' bound.
 * @template T
 * @param {() => Promise<T>} check
 * @param {string} what
 * @returns {Promise<T>}
 */
async function until(check, what) {
  const end = Date.now() + WAIT;
  while (Date.now() < end) {
    const value = await within(check(), what);
    if (value) return value;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  throw new Error(`timed out after ${WAIT} ms waiting for ${what}`);
}

describe("the hub's dispatch queue", { skip, timeout: 20000 }, () => {
  test("an agent with maxConcurrency 1: the rest wait at the hub, priority first", async () => {
    const capability = unique("slow");
    const started = [];
    const release = gate();
    const agent = await runAgent(
      "js-one-at-a-time",
      {
        [capability]: async ({ n }) => {
          started.push(n);
          await release.promise;
          return n * 10;
        },
      },
      { agent: { maxConcurrency: 1 } },
    );
    const client = await requester();
    const [info] = await client.discover(capability);
    assert.equal(info.agentId, agent.agentId);
    assert.equal(info.maxConcurrency, 1); // registered: the hub knows the limit

    const first = await within(client.submit(capability, { n: 1 }), "submit 1");
    assert.equal(first.agentId, agent.agentId);
    assert.equal(first.state, "in_progress");
    await until(async () => started.length === 1, "the first task to start");
    const second = await client.submit(capability, { n: 2 });
    const third = await client.submit(capability, { n: 3 });
    for (const handle of [second, third]) {
      assert.equal(handle.agentId, ""); // waiting in the hub's queue, nobody's yet
      assert.equal(handle.state, "pending");
    }
    const waiting = await client.status(second.taskId);
    assert.equal(waiting.state, "pending");
    assert.equal(waiting.assignee, "");
    assert.equal(waiting.queuePosition, 1);
    assert.equal(waiting.priority, undefined); // 0: not sent
    assert.equal((await client.status(third.taskId)).queuePosition, 2);
    assert.equal((await client.status(first.taskId)).queuePosition, undefined);

    // A higher priority goes before the ones that came first.
    const urgent = await client.submit(capability, { n: 4 }, { priority: 10 });
    assert.equal(urgent.agentId, "");
    const urgentRecord = await client.status(urgent.taskId);
    assert.equal(urgentRecord.priority, 10);
    assert.equal(urgentRecord.queuePosition, 1);
    assert.equal((await client.status(second.taskId)).queuePosition, 2);
    assert.equal((await client.status(third.taskId)).queuePosition, 3);
    assert.deepEqual(started, [1]); // the hub sent the agent nothing more

    release.open();
    const results = await within(Promise.all([first, second, third, urgent].map((h) => h.wait())), "all four");
    assert.deepEqual(results, [10, 20, 30, 40]);
    assert.deepEqual(started, [1, 4, 2, 3]);
    // The status push named the assignee of each task taken from the queue.
    for (const handle of [second, third, urgent]) {
      assert.equal(handle.agentId, agent.agentId);
      assert.equal(handle.state, "completed");
    }
    const done = await client.status(third.taskId);
    assert.equal(done.assignee, agent.agentId);
    assert.equal(done.queuePosition, undefined);
  });

  test("a capability's own limit, within the agent's; delegate waits its turn", async () => {
    const capability = unique("gpu");
    const other = `${capability}-cheap`;
    const release = gate();
    let running = 0;
    let most = 0;
    const agent = await runAgent(
      "js-limited",
      {
        [capability]: [
          async () => {
            running += 1;
            most = Math.max(most, running);
            await release.promise;
            running -= 1;
            return "gpu";
          },
          { maxConcurrency: 1, description: "one at a time" },
        ],
        [other]: async () => "cheap",
      },
      { agent: { maxConcurrency: 4, tags: ["gpu"] } },
    );
    const client = await requester();
    const [info] = await client.discover(capability, { tags: ["gpu"] });
    assert.equal(info.agentId, agent.agentId);
    assert.equal(info.maxConcurrency, 4);
    assert.deepEqual(info.tags, ["gpu"]);
    const byName = new Map(info.capabilities.map((c) => [c.name, c]));
    assert.deepEqual(byName.get(capability), { name: capability, description: "one at a time", paramsSchema: null, maxConcurrency: 1 });
    assert.equal("maxConcurrency" in byName.get(other), false);

    const first = await client.submit(capability, {});
    const queued = client.delegate(capability, {}, { ttl: 10 }); // waits at the hub
    await until(async () => (await client.listTasks({ state: "pending", limit: 10 })).some((t) => t.capability === capability), "a task queued");
    // The agent has room for another capability meanwhile.
    assert.equal(await within(client.delegate(other, {}), "the other capability"), "cheap");
    release.open();
    assert.equal(await within(first.wait(), "the first"), "gpu");
    assert.equal(await within(queued, "the queued delegate"), "gpu");
    assert.equal(most, 1);
  });
});

describe("discover: ranked, with match, filtered", { skip, timeout: 20000 }, () => {
  test("an exact name before a name holding the words, before the text", async () => {
    const w = word();
    const keyword = `code review ${w}`;
    // Registered in the reverse of their rank: the order is the rank's, not registration's.
    const bot = await runAgent(`Code Review Bot ${w}`, { summarize: async () => "" });
    const style = await runAgent("js-style", {
      [`lint-${w}`]: [async () => "", { description: "checks code style, and does a quick review" }],
    });
    const named = await runAgent("js-x", { [`code-review-${w}-x`]: async () => "" });
    const exact = await runAgent("js-exact", { [`code-review-${w}`]: async () => "" });
    const client = await requester();

    const found = await within(client.discover(keyword), "discover");
    assert.deepEqual(
      found.map((a) => [a.agentId, a.match]),
      [
        [exact.agentId, { reason: "exact", score: 3, capability: `code-review-${w}` }],
        [named.agentId, { reason: "name", score: 2, capability: `code-review-${w}-x` }],
        [bot.agentId, { reason: "text", score: 1, capability: null }],
        [style.agentId, { reason: "text", score: 1, capability: `lint-${w}` }],
      ],
    );
    // Spelled as a name, or in another case: the same words.
    assert.deepEqual((await client.discover(`Code_Review-${w.toUpperCase()}`)).map((a) => a.agentId), found.map((a) => a.agentId));
    assert.deepEqual((await client.discover(`review ${w} x`)).map((a) => [a.agentId, a.match?.reason]), [[named.agentId, "name"]]);
    assert.deepEqual(await client.discover(`code nothing ${w}`), []);
    // Paged, in rank order.
    const page = await client.discoverPage(keyword, { limit: 2 });
    assert.deepEqual(page.agents.map((a) => a.agentId), [exact.agentId, named.agentId]);
    assert.ok(page.nextCursor);
    const rest = await client.discoverPage(keyword, { limit: 2, cursor: page.nextCursor });
    assert.deepEqual(rest.agents.map((a) => a.agentId), [bot.agentId, style.agentId]);
    // No keyword: every agent, no match.
    const all = await client.discover("", { limit: 1000 });
    const mine = all.find((a) => a.agentId === exact.agentId);
    assert.ok(mine);
    assert.equal(mine.match, undefined);
    assert.deepEqual(mine.tags, []);
    assert.equal("maxConcurrency" in mine, false); // not declared: the hub is not told
  });

  test("tags are found and filter whole; online leaves out the resuming", async () => {
    const w = word();
    const gpu = await runAgent("js-tagged", { [`summarize-${w}`]: async () => "" }, { agent: { tags: ["GPU", "eu-west"] } });
    const cpu = await runAgent("js-untagged", { [`summarize-${w}`]: async () => "" }, { agent: { maxConcurrency: null } });
    // A plain client with tags and a limit: a tag's words are found by discover.
    const tool = await requester({ name: "js-tool", tags: [`tool-${w}`], maxConcurrency: 2 });
    const client = await requester();

    const both = await client.discover(`summarize ${w}`);
    assert.deepEqual(both.map((a) => a.agentId), [gpu.agentId, cpu.agentId]);
    assert.deepEqual(both[0].tags, ["GPU", "eu-west"]);
    assert.equal("maxConcurrency" in both[1], false); // no bound: not registered
    assert.deepEqual((await client.discover(`summarize ${w}`, { tags: ["gpu"] })).map((a) => a.agentId), [gpu.agentId]);
    assert.deepEqual((await client.discover(`summarize ${w}`, { tags: ["gpu", "EU-WEST"] })).map((a) => a.agentId), [gpu.agentId]);
    assert.deepEqual(await client.discover(`summarize ${w}`, { tags: ["eu"] }), []); // tags match whole
    assert.deepEqual(await client.discover(`summarize ${w}`, { tags: ["gpu", "nope"] }), []);
    // An empty keyword with a tag: every agent with it.
    assert.deepEqual((await client.discover("", { tags: [`tool-${w}`] })).map((a) => a.agentId), [tool.agentId]);
    const [found] = await client.discover(`tool ${w}`);
    assert.equal(found.agentId, tool.agentId);
    assert.equal(found.match.reason, "text");
    assert.equal(found.maxConcurrency, 2);
    assert.deepEqual(found.tags, [`tool-${w}`]);

    // An agent that dropped (it may still resume) is offline: `online` leaves it out.
    const leaving = await within(connect(/** @type {string} */ (URL_OPEN), { name: "js-dropping", capabilities: [`summarize-${w}`] }), "connect");
    await leaving.close({ deregister: false });
    const everyone = await until(async () => {
      const agents = await client.discover(`summarize ${w}`);
      return agents.find((a) => a.agentId === leaving.agentId && !a.online) ? agents : null;
    }, "the dropped agent offline");
    assert.deepEqual(everyone.map((a) => a.agentId), [gpu.agentId, cpu.agentId, leaving.agentId]);
    const online = await client.discover(`summarize ${w}`, { online: true });
    assert.deepEqual(online.map((a) => a.agentId), [gpu.agentId, cpu.agentId]);
  });

  test("bad limits and tags are refused before anything is sent", () => {
    assert.throws(() => new Agent("x", { maxConcurrency: 0 }), TypeError);
    assert.throws(() => new Agent("x", { maxConcurrency: 1.5 }), TypeError);
    assert.throws(() => new Agent("x", { tags: "gpu" }), TypeError);
    assert.throws(() => new Agent("x").capability("c", () => 1, { maxConcurrency: -1 }), TypeError);
    assert.equal(new Agent("x", { maxConcurrency: Infinity }).maxConcurrency, null);
    assert.equal(new Agent("x").maxConcurrency, null); // not declared: 16 at once, locally
  });
});

/**
 * A WebSocket stand-in that answers like a hub: it records every frame the client
 * sends, and `answer(frame)` returns the frames to send back.
 */
function fakeHub(answer) {
  const sent = [];
  class FakeSocket {
    constructor() {
      this.readyState = 0;
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      setTimeout(() => {
        this.readyState = 1;
        this.onopen?.({});
      }, 0);
    }
    send(text) {
      const frame = JSON.parse(text);
      sent.push(frame);
      for (const reply of answer(frame)) {
        setTimeout(() => this.readyState === 1 && this.onmessage?.({ data: JSON.stringify(reply) }), 0);
      }
    }
    close() {
      if (this.readyState === 3) return;
      this.readyState = 3;
      setTimeout(() => this.onclose?.({ code: 1000, reason: "" }), 0);
    }
  }
  return { sent, WebSocket: FakeSocket };
}

const record = (taskId, state, assignee) => ({
  task_id: taskId, state, capability: "echo", requester: "agt_me", assignee,
  created_at: 1, updated_at: 2, ttl: 300, success: null, data: null, error: null,
});

describe("the wire: new fields only when not at their defaults", { timeout: 10000 }, () => {
  test("register, discover and delegate leave defaults out; the status push names the assignee", async () => {
    const hub = fakeHub((frame) => {
      const reply = (payload) => [{ type: frame.type, in_reply_to: frame.id, payload }];
      switch (frame.type) {
        case "register":
          return reply({ agent_id: "agt_me", resume_token: "t", heartbeat_interval: 30, max_frame_size: 1 << 20, resumed: false });
        case "discover":
          return reply({
            agents: [{
              agent_id: "agt_1", name: "a", description: "", online: true, metadata: {},
              capabilities: [{ name: "echo", description: "", params_schema: null, max_concurrency: 2 }],
              tags: ["gpu"], max_concurrency: 8, match: { reason: "exact", score: 3, capability: "echo" },
            }],
            next_cursor: null,
          });
        case "delegate":
          return [
            ...reply({ task_id: "task_1", agent_id: "", state: "pending" }),
            { type: "status", payload: { ...record("task_1", "in_progress", "agt_1"), priority: 5 } },
            { type: "result", payload: { task_id: "task_1", state: "completed", success: true, data: "ok" } },
          ];
        case "status":
          return reply({ ...record("task_1", "pending", ""), priority: 5, queue_position: 3 });
        default:
          return reply({});
      }
    });
    const plain = await within(connect("ws://127.0.0.1:9", { WebSocket: hub.WebSocket }), "connect");
    const register = hub.sent.find((f) => f.type === "register").payload;
    assert.equal("tags" in register, false);
    assert.equal("max_concurrency" in register, false);
    await plain.discover("echo");
    await plain.submit("echo", {}, { priority: 0 });
    const [discover] = hub.sent.filter((f) => f.type === "discover");
    assert.deepEqual(discover.payload, { capability: "echo" });
    const [delegate] = hub.sent.filter((f) => f.type === "delegate");
    assert.equal("priority" in delegate.payload, false);
    await plain.close();

    hub.sent.length = 0;
    const agentLike = await connect("ws://127.0.0.1:9", {
      WebSocket: hub.WebSocket,
      tags: ["gpu"],
      maxConcurrency: 3,
      capabilities: [{ name: "echo", maxConcurrency: 2 }, { name: "free", maxConcurrency: Infinity }],
    });
    const registered = hub.sent.find((f) => f.type === "register").payload;
    assert.deepEqual(registered.tags, ["gpu"]);
    assert.equal(registered.max_concurrency, 3);
    assert.deepEqual(registered.capabilities, [{ name: "echo", max_concurrency: 2 }, { name: "free" }]);
    const [info] = await agentLike.discover("echo", { online: true, tags: ["gpu"], limit: 5 });
    assert.deepEqual(hub.sent.find((f) => f.type === "discover").payload, { capability: "echo", online: true, tags: ["gpu"], limit: 5 });
    assert.deepEqual(info.tags, ["gpu"]);
    assert.equal(info.maxConcurrency, 8);
    assert.deepEqual(info.match, { reason: "exact", score: 3, capability: "echo" });
    assert.deepEqual(info.capabilities, [{ name: "echo", description: "", paramsSchema: null, maxConcurrency: 2 }]);

    const handle = await agentLike.submit("echo", {}, { priority: 5 });
    assert.equal(hub.sent.find((f) => f.type === "delegate").payload.priority, 5);
    assert.equal(handle.agentId, ""); // as the reply said: queued
    assert.equal(await within(handle.wait(), "the result"), "ok");
    assert.equal(handle.agentId, "agt_1"); // from the status push
    const waiting = await agentLike.status("task_1");
    assert.equal(waiting.priority, 5);
    assert.equal(waiting.queuePosition, 3);
    await agentLike.close();
  });
});
