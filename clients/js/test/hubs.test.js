// Several hub URLs (README "Several hubs"), against real hubs: the pytest ones and hubs
// of the tests' own (test/hubs.js) that they stop and start again. The client stays on
// one hub and moves on only when it cannot have a session there.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { Agent, Backoff, Client, HubUnavailable, connect } from "../src/index.js";
import { URL_OPEN, nextEvent, skip, unique, within } from "./helpers.js";
import { deadPort, startHub } from "./hubs.js";

/** A backoff that records the `attempt` of each wait and waits `seconds`. */
class Recorded extends Backoff {
  /** @param {number} seconds @param {number | null} [maxAttempts] */
  constructor(seconds, maxAttempts = null) {
    super({ maxAttempts });
    this.seconds = seconds;
    /** @type {number[]} */
    this.waits = [];
  }

  /** @param {number} attempt */
  delay(attempt) {
    this.waits.push(attempt);
    return this.seconds;
  }
}

const echo = { echo: ({ text }) => text };

describe("several hubs", { skip, timeout: 30000 }, () => {
  test("a hub that cannot be reached is skipped at once, for the next one", async () => {
    const dead = `ws://127.0.0.1:${await deadPort()}`;
    // A wait of a minute after any failure: only a move at once registers in time.
    const backoff = new Recorded(60);
    const name = unique("js-skipper");
    const agent = new Agent(name).capability("echo", ({ text }) => text);
    const client = new Client([dead, URL_OPEN], { name: "js-asker", backoff: new Recorded(60) });
    try {
      await within(agent.run([dead, URL_OPEN], { backoff }), "the agent registering");
      assert.deepEqual([agent.client.url, agent.client.attempts, agent.client.sessions], [URL_OPEN, 2, 1]);
      assert.deepEqual(agent.client.urls, [dead, URL_OPEN]);
      assert.deepEqual(backoff.waits, []);
      await within(client.ready, "connect");
      assert.deepEqual([client.url, client.attempts], [URL_OPEN, 2]);
      assert.deepEqual((await client.discover(name)).map((found) => found.name), [name]);
    } finally {
      await client.close();
      await agent.stop({ grace: 0 });
    }
  });

  test("both ends move when their hub stops, then stay where they are", async () => {
    const dead = `ws://127.0.0.1:${await deadPort()}`;
    let first = await startHub();
    const second = await startHub();
    const urls = [dead, first.url, second.url];
    const agent = new Agent("js-mover").capability("echo", ({ text }) => text);
    const client = new Client(urls.slice(1), { name: "js-asker", backoff: { base: 0.01, cap: 0.05 } });
    try {
      await within(agent.run(urls, { backoff: { base: 0.01, cap: 0.05 } }), "the agent registering");
      await within(client.ready, "connect");
      assert.deepEqual([agent.client.url, agent.client.attempts], [first.url, 2]);
      assert.equal(client.url, first.url);
      assert.equal(await within(client.delegate("echo", { text: "first" }), "a delegation"), "first");

      // Its hub goes away: both retry it, then move on to the next one, afresh there.
      const moved = Promise.all([nextEvent(agent.client, "connect"), nextEvent(client, "connect")]);
      await first.stop();
      const [agentBack, clientBack] = await moved;
      assert.deepEqual([agentBack.resumed, agentBack.session, clientBack.resumed, clientBack.session], [false, 2, false, 2]);
      assert.equal(await within(client.delegate("echo", { text: "second" }), "a delegation"), "second");
      // Each tried its hub once more (the attempt refused) before the next one.
      assert.deepEqual([client.url, client.sessions, client.attempts], [second.url, 2, 3]);
      assert.deepEqual([agent.client.url, agent.client.sessions, agent.client.attempts], [second.url, 2, 4]);

      // The first hub comes back: nobody moves, since their hub is fine; a connection
      // that drops comes back to its hub, and resumes there.
      first = await startHub({ port: first.port });
      assert.equal(await within(client.delegate("echo", { text: "again" }), "a delegation"), "again");
      const resumed = nextEvent(agent.client, "connect");
      agent.client._ws.close(1000, "cut by the test");
      assert.deepEqual(await resumed, { agentId: agent.agentId, resumed: true, session: 3 });
      assert.equal(await within(client.delegate("echo", { text: "still" }), "a delegation"), "still");
      assert.deepEqual([client.url, client.sessions], [second.url, 2]);
      assert.deepEqual([agent.client.url, agent.client.attempts], [second.url, 5]);
    } finally {
      await client.close();
      await agent.stop({ grace: 0 });
      await Promise.all([first.stop(), second.stop()]);
    }
  });

  test("a client that reaches none of its hubs says so, each URL's attempts counted", async () => {
    const urls = [`ws://127.0.0.1:${await deadPort()}`, `ws://127.0.0.1:${await deadPort()}`];
    const backoff = new Recorded(0.01, 5);
    const client = new Client(urls, { backoff });
    try {
      await assert.rejects(within(client.ready, "giving up"), (error) => {
        assert.ok(error instanceof HubUnavailable);
        assert.match(error.message, /^cannot reach any of 2 hubs after 5 attempt\(s\): .*ECONNREFUSED/);
        return true;
      });
    } finally {
      await client.close();
    }
    assert.equal(client.attempts, 5);
    // The backoff once a whole round failed, growing with each round.
    assert.deepEqual(backoff.waits, [1, 2]);
    assert.equal(client.url, urls[0]); // where the fifth attempt went
  });

  test("a hub whose store fails is passed over, and retried when it is the only one", async () => {
    const sick = await startHub({ sick: true });
    try {
      const client = new Client([sick.url, URL_OPEN], { name: "js-mover", backoff: new Recorded(60) });
      try {
        await within(client.ready, "connect");
        assert.deepEqual([client.url, client.attempts, client.sessions], [URL_OPEN, 2, 1]);
      } finally {
        await client.close();
      }
      const alone = new Client(sick.url, { backoff: new Recorded(0.01, 2) });
      try {
        await assert.rejects(within(alone.ready, "giving up"), (error) => {
          assert.ok(error instanceof HubUnavailable);
          assert.match(error.message, new RegExp(`^cannot reach the hub at ${sick.url} after 2 attempt\\(s\\): the hub cannot store new work now`));
          return true;
        });
      } finally {
        await alone.close();
      }
    } finally {
      await sick.stop();
    }
  });

  test("hub URLs are checked: at least one, each ws:// or wss://", async () => {
    assert.throws(() => new Client([]), { name: "TypeError", message: /give at least one hub URL/ });
    await assert.rejects(connect(["ws://127.0.0.1:1", "http://127.0.0.1:2"]), {
      name: "TypeError",
      message: 'agentmesh: the hub URL must look like ws://host:port (or wss://), got "http://127.0.0.1:2"',
    });
    await assert.rejects(new Agent("js-nowhere").run([]), TypeError);
    const given = [URL_OPEN];
    const client = new Client(given);
    try {
      given.push("ws://127.0.0.1:1"); // the client has its own copy
      assert.deepEqual([client.url, client.urls], [URL_OPEN, [URL_OPEN]]);
      assert.ok(Object.isFrozen(client.urls));
      await within(client.ready, "connect");
    } finally {
      await client.close();
    }
    assert.deepEqual(new Client(URL_OPEN, { signal: AbortSignal.abort() }).urls, [URL_OPEN]);
  });
});
