// JS <-> Python: a JS requester uses the Python SDK agent, and a Python requester (the
// helper agent's py-delegate) uses a JS agent.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { TaskFailed } from "../src/index.js";
import { requester, runAgent, skip, unique, within } from "./helpers.js";

describe("with the Python SDK", { skip, timeout: 15000 }, () => {
  test("a JS requester delegates to a Python agent", async () => {
    const client = await requester();
    const [helper] = await client.discover("py-echo");
    assert.equal(helper.name, "py-helper");
    // The Python SDK's schema, from the handler's type hints.
    const [echo] = helper.capabilities.filter((c) => c.name === "py-echo");
    assert.equal(echo.description, "Say it back, from Python.");
    assert.deepEqual(echo.paramsSchema.required, ["text"]);
    assert.equal(await within(client.delegate("py-echo", { text: "héllo 🌍" }), "py-echo"), "py:héllo 🌍");
    await assert.rejects(client.delegate("py-fail", { why: "on purpose" }), (error) => {
      assert.ok(error instanceof TaskFailed);
      assert.equal(error.error, "ValueError: on purpose");
      return true;
    });
    // The Python agent checks params itself.
    await assert.rejects(client.delegate("py-echo", { text: 3 }), { name: "TaskFailed", message: /bad params/ });
  });

  test("a Python requester delegates to a JS agent", async () => {
    const capability = unique("js-upper");
    const agent = await runAgent("js-upper", {
      [capability]: async ({ text }, ctx) => ({ upper: text.toUpperCase(), requester: ctx.requester }),
      [`${capability}-fail`]: async () => {
        throw new Error("the JS agent refuses");
      },
    });
    const client = await requester();
    const got = await within(client.delegate("py-delegate", { capability, params: { text: "abc" } }), "py-delegate");
    assert.equal(got.result.upper, "ABC");
    assert.match(got.result.requester, /^agt_/);
    assert.notEqual(got.result.requester, client.agentId); // the Python requester asked
    const failed = await within(client.delegate("py-delegate", { capability: `${capability}-fail`, params: {} }), "py-delegate");
    assert.deepEqual(failed, { error: "TaskFailed", message: "the JS agent refuses" });
    assert.equal(agent.stats.started, 2);
  });
});
