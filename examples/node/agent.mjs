// An agentmesh agent in Node.js, with the JavaScript client in clients/js (no npm install:
// it uses Node's built-in WebSocket).
//
//   node agent.mjs [ws://127.0.0.1:8765]                           (Node >= 22)
//   node --experimental-websocket agent.mjs [ws://127.0.0.1:8765]  (Node 20/21)
//
// It offers one capability, `reverse`. The package does what a long-running agent needs:
// heartbeats, params checked against the schema, cancel and deadlines as an AbortSignal,
// duplicate tasks after a resume, reconnect with backoff + resume. This file adds logs
// and a clean shutdown on Ctrl-C / SIGTERM. In your own project, import from
// "@agentmesh/client" after `npm install path/to/agentmesh/clients/js`.

import { Agent } from "../../clients/js/src/index.js";

const URL = process.argv[2] ?? "ws://127.0.0.1:8765";
const log = (...args) => console.log(...args);

// Wait `ms`, but give up as soon as the task is cancelled (or its deadline passes).
const sleep = (ms, signal) => new Promise((resolve, reject) => {
  const timer = setTimeout(resolve, ms);
  signal.addEventListener("abort", () => { clearTimeout(timer); reject(signal.reason); }, { once: true });
});

const agent = new Agent("node-reverser", {
  description: "A Node.js agent using the agentmesh JavaScript client",
  metadata: { lang: "javascript", runtime: `node ${process.version}` },
});

agent.capability(
  "reverse",
  async ({ text, delay_ms = 0 }, ctx) => {
    if (delay_ms) await sleep(delay_ms, ctx.signal);
    return Array.from(text).reverse().join(""); // by code point, so emoji survive
  },
  {
    description: "Reverses a text; delay_ms simulates slow work (cancellable)",
    // Checked by the agent before the handler runs (the hub does not check params).
    paramsSchema: {
      type: "object",
      properties: {
        text: { type: "string" },
        delay_ms: { type: "integer", minimum: 0, maximum: 60000 },
      },
      required: ["text"],
      additionalProperties: false,
    },
  },
);

agent.on("task", ({ taskId }) => log(`task ${taskId} started`));
agent.on("done", ({ taskId, success, error }) => log(`task ${taskId} ${success ? "completed" : `failed: ${error}`}`));
agent.on("cancel", ({ taskId, reason }) => log(`task ${taskId} cancelled: ${reason}`));
agent.on("duplicate", ({ taskId, resent }) =>
  log(`duplicate task ${taskId}: ${resent ? "sending its result again" : "still working on it"}`));

let stopping = false;
async function shutdown(signal) {
  if (stopping) process.exit(1); // a second Ctrl-C: give up at once
  stopping = true;
  log(`${signal}: deregistering`);
  await agent.stop({ grace: 3 }); // running tasks get 3 s, then fail; then deregister
  process.exit(0);
}
process.on("SIGINT", shutdown);
process.on("SIGTERM", shutdown);

try {
  await agent.run(URL, { backoff: { base: 0.25, cap: 8 } }); // stay well inside the resume grace
} catch (error) {
  console.error(`agent: ${error.message}`);
  process.exit(1);
}
const client = agent.client;
log(`registered as ${client.agentId}`);
client.on("disconnect", ({ code, reason }) => log(`connection closed (${code} ${reason || "-"}); reconnecting`));
client.on("connect", ({ agentId, resumed, session }) => {
  if (session > 1) log(`registered as ${agentId}${resumed ? " (resumed)" : ""}`);
});
client.on("warning", (error) => console.error("hub:", error.message));
