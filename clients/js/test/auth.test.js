// A hub with tokens: the token opens it (in the URL or a header), a wrong or missing one
// is a clear Unauthorized at once (not retried), and only the admin token watches tasks.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { Forbidden, Unauthorized, connect } from "../src/index.js";
import { ADMIN_TOKEN, TOKEN, URL_TOKENS, requester, runAgent, skip, unique, within } from "./helpers.js";

describe("a hub with tokens", { skip, timeout: 15000 }, () => {
  test("the token lets an agent and a requester in, as a query or a header", async () => {
    const capability = unique("secret-echo");
    await runAgent("js-authed", { [capability]: async ({ text }) => text }, { token: TOKEN }, URL_TOKENS);
    const viaQuery = await requester({ token: TOKEN }, URL_TOKENS);
    assert.equal(await within(viaQuery.delegate(capability, { text: "q" }), "delegate"), "q");
    const viaHeader = await requester({ token: TOKEN, tokenIn: "header" }, URL_TOKENS);
    assert.equal(await within(viaHeader.delegate(capability, { text: "h" }), "delegate"), "h");
  });

  test("a wrong token is refused at once with Unauthorized, naming the hub", async () => {
    for (const tokenIn of ["query", "header"]) {
      const client = connect(URL_TOKENS, { token: "not-the-token", tokenIn });
      await assert.rejects(within(client, "the refusal"), (error) => {
        assert.ok(error instanceof Unauthorized);
        assert.equal(error.code, "unauthorized");
        assert.equal(error.message, `the hub at ${URL_TOKENS} refused the token (HTTP 401)`);
        return true;
      });
    }
  });

  test("a missing token says one is wanted", async () => {
    await assert.rejects(within(connect(URL_TOKENS, { name: "no-token" }), "the refusal"), {
      name: "Unauthorized",
      message: `the hub at ${URL_TOKENS} wants a token (HTTP 401); pass options.token`,
    });
  });

  test("an ordinary token watches the agents; tasks want the admin token", async () => {
    const looker = await requester({ token: TOKEN, register: false }, URL_TOKENS);
    await assert.rejects(within(looker.watch(["task_state"]).next(), "the refusal"), Forbidden);
    const events = looker.watch(); // all it may: the agent kinds
    await within(events.ready, "the watch reply");
    assert.deepEqual(events.watching, ["agent_registered", "agent_online", "agent_offline", "agent_left"]);
    await events.return();
  });

  test("the admin token watches tasks; others see agent events", async () => {
    const admin = await requester({ token: ADMIN_TOKEN, register: false }, URL_TOKENS);
    const looker = await requester({ token: TOKEN, register: false }, URL_TOKENS);
    const tasks = admin.watch(["task_state"]);
    const agents = looker.watch();
    const name = unique("watched");
    const agent = await runAgent(name, { [name]: async () => "seen" }, { token: TOKEN }, URL_TOKENS);
    const client = await requester({ token: TOKEN }, URL_TOKENS);
    const handle = await client.submit(name, {});
    await handle.wait();
    const states = [];
    for await (const event of tasks) {
      if (event.task.taskId !== handle.taskId) continue;
      states.push(event.task.state);
      if (event.task.state === "completed") {
        assert.equal(event.task.assignee, agent.agentId);
        assert.ok(event.duration >= 0);
        break;
      }
    }
    assert.deepEqual(states, ["pending", "in_progress", "completed"]); // created, delivered, ended
    for await (const event of agents) {
      if (event.agent.agentId === agent.agentId) {
        assert.equal(event.kind, "agent_registered");
        assert.equal(event.agent.name, name);
        break;
      }
    }
  });
});
