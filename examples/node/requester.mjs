// An agentmesh requester in Node.js, with the JavaScript client in clients/js:
// discover, delegate, wait for the result.
//
//   node requester.mjs [ws://127.0.0.1:8765] [text]                           (Node >= 22)
//   node --experimental-websocket requester.mjs [ws://127.0.0.1:8765] [text]  (Node 20/21)
//
// Start agent.mjs first. Every line printed is one JSON object, so a script can read it.
// Exits 0 on success, 1 on an unexpected failure, 2 if the whole run takes over 15 s.

import { Backoff, NoCapableAgent, TaskFailed, connect } from "../../clients/js/src/index.js";

const URL = process.argv[2] ?? "ws://127.0.0.1:8765";
const TEXT = process.argv[3] ?? "hello, agentmesh";

const deadline = setTimeout(() => fail("timed out after 15 s", 2), 15000);
const print = (obj) => console.log(JSON.stringify(obj));
function fail(message, code = 1) {
  console.error(`requester: ${message}`);
  process.exit(code);
}

async function main() {
  // 1. Connect and register with no capabilities: we only ask. Give up after 3 tries.
  const client = await connect(URL, { name: "node-requester", backoff: new Backoff({ maxAttempts: 3 }) });
  print({ event: "registered", agent_id: client.agentId });

  // 2. Discover: a keyword matches a capability name or one word of it, any case.
  const agents = await client.discover("reverse");
  const found = agents.map((a) => ({ agent_id: a.agentId, name: a.name, online: a.online }));
  print({ event: "discovered", agents: found });
  if (agents.length === 0) fail("no agent offers 'reverse'; start agent.mjs first");

  // 3. Delegate by capability: the hub picks an agent; we get the result.
  const task = await client.submit("reverse", { text: TEXT }, { ttl: 10 });
  const data = await task.wait();
  print({ event: "result", task_id: task.taskId, agent_id: task.agentId, data });

  // 4. A bad param: the task is accepted, then the agent fails it with a clear error.
  const bad = await client.submit("reverse", { text: 42 }, { ttl: 10 });
  try {
    await bad.wait();
    fail("a bad param was accepted");
  } catch (error) {
    if (!(error instanceof TaskFailed)) throw error;
    print({ event: "failed", task_id: bad.taskId, state: bad.state, error: error.error });
  }

  // 5. Nobody offers `translate`: the delegate itself is refused, with a typed error.
  try {
    await client.delegate("translate", { text: "bonjour" });
    fail("delegate of 'translate' was accepted; expected no_capable_agent");
  } catch (error) {
    if (!(error instanceof NoCapableAgent)) throw error;
    print({ event: "error", capability: "translate", code: error.code, message: error.message });
  }

  // 6. Leave for good: close() deregisters, then closes the socket.
  await client.close();
  clearTimeout(deadline);
}

main().catch((err) => fail(err.stack ?? String(err)));
