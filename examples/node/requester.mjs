// An agentmesh requester in plain Node.js: discover, delegate, wait for the result.
//
//   node requester.mjs [ws://127.0.0.1:8765] [text]                           (Node >= 22)
//   node --experimental-websocket requester.mjs [ws://127.0.0.1:8765] [text]  (Node 20/21)
//
// Start agent.mjs first. Every line printed is one JSON object, so a script can read it.
// Exits 0 on success, 1 on an unexpected failure, 2 if the whole run takes over 15 s.

const URL = process.argv[2] ?? "ws://127.0.0.1:8765";
const TEXT = process.argv[3] ?? "hello, agentmesh";

const deadline = setTimeout(() => fail("timed out after 15 s", 2), 15000);
const print = (obj) => console.log(JSON.stringify(obj));
function fail(message, code = 1) {
  console.error(`requester: ${message}`);
  process.exit(code);
}

const ws = new WebSocket(URL);
let seq = 0;
const waiting = new Map();    // request id -> resolve(reply)
const outcomes = new Map();   // task_id -> result payload, or resolve() of someone waiting for it

function request(type, payload = {}, envelope = {}) {
  const id = `q${++seq}`;
  return new Promise((resolve) => {
    waiting.set(id, resolve);
    ws.send(JSON.stringify({ type, id, payload, ...envelope }));
  });
}

// A task's outcome is an event: a `result` frame with no in_reply_to. Every task gets
// exactly one. The hub sends the delegate reply first, so we always know the task_id.
function outcome(taskId) {
  const known = outcomes.get(taskId);
  if (known && typeof known !== "function") return Promise.resolve(known);
  return new Promise((resolve) => outcomes.set(taskId, resolve));
}

ws.onmessage = ({ data }) => {
  const frame = JSON.parse(data);
  if (frame.in_reply_to != null) {
    waiting.get(frame.in_reply_to)?.(frame);
    waiting.delete(frame.in_reply_to);
  } else if (frame.type === "result") {
    const waiter = outcomes.get(frame.payload.task_id);
    if (typeof waiter === "function") waiter(frame.payload);
    else outcomes.set(frame.payload.task_id, frame.payload);
  }                                                 // other events (broadcasts...) are ignored
};
ws.onerror = () => fail(`cannot talk to the hub at ${URL}`);
ws.onclose = ({ code, reason }) => fail(`connection closed (${code} ${reason})`);

// Reply payload, or throw the hub's error code (e.g. no_capable_agent).
async function call(type, payload, envelope) {
  const reply = await request(type, payload, envelope);
  if (reply.type === "error") throw Object.assign(new Error(reply.payload.message), reply.payload);
  return reply.payload;
}

async function main() {
  await new Promise((resolve) => { ws.onopen = resolve; });

  // 1. Register with no capabilities: we only ask.
  const me = await call("register", { name: "node-requester" });
  print({ event: "registered", agent_id: me.agent_id });

  // 2. Discover: a keyword matches a capability name or one word of it, any case.
  const { agents } = await call("discover", { capability: "reverse" });
  const found = agents.map((a) => ({ agent_id: a.agent_id, name: a.name, online: a.online }));
  print({ event: "discovered", agents: found });
  if (agents.length === 0) fail("no agent offers 'reverse'; start agent.mjs first");

  // 3. Delegate by capability: the hub picks an agent. The reply only says it was
  //    accepted; the outcome comes later as a `result` event.
  const task = await call("delegate", { capability: "reverse", params: { text: TEXT }, ttl: 10 });
  const result = await outcome(task.task_id);
  if (!result.success) fail(`task ${result.state}: ${result.error}`);
  print({ event: "result", task_id: task.task_id, agent_id: task.agent_id, data: result.data });

  // 4. A bad param: the task is accepted, then the agent fails it with a clear error.
  const bad = await call("delegate", { capability: "reverse", params: { text: 42 }, ttl: 10 });
  const failed = await outcome(bad.task_id);
  print({ event: "failed", task_id: bad.task_id, state: failed.state, error: failed.error });

  // 5. Nobody offers `translate`: the delegate itself is refused with an error code.
  try {
    await call("delegate", { capability: "translate", params: { text: "bonjour" } });
    fail("delegate of 'translate' was accepted; expected no_capable_agent");
  } catch (err) {
    print({ event: "error", capability: "translate", code: err.code, message: err.message });
  }

  // 6. Leave for good, then close the socket.
  await call("deregister");
  ws.onclose = null;
  const closed = new Promise((resolve) => { ws.onclose = resolve; });
  ws.close(1000, "done");
  await closed;
  clearTimeout(deadline);
}

main().catch((err) => fail(err.stack ?? String(err)));
