// An agentmesh agent in plain Node.js: no npm install, only the built-in WebSocket.
//
//   node agent.mjs [ws://127.0.0.1:8765]                           (Node >= 22)
//   node --experimental-websocket agent.mjs [ws://127.0.0.1:8765]  (Node 20/21)
//
// It offers one capability, `reverse`, and shows everything a long-running agent needs:
// heartbeats, cancel, duplicate tasks after a resume, reconnect with backoff + resume,
// parameter checks, and a clean shutdown on Ctrl-C / SIGTERM. The wire protocol is
// described in docs/protocol.md.

const URL = process.argv[2] ?? "ws://127.0.0.1:8765";

// What we advertise. params_schema is informational: the hub does not check params
// against it, so the agent validates them itself (see validate below).
const CAPABILITY = {
  name: "reverse",
  description: "Reverses a text; delay_ms simulates slow work (cancellable)",
  params_schema: {
    type: "object",
    properties: {
      text: { type: "string" },
      delay_ms: { type: "integer", minimum: 0, maximum: 60000 },
    },
    required: ["text"],
    additionalProperties: false,
  },
};

let ws = null;                 // the current connection
let identity = null;           // {agent_id, token}: kept across reconnects to resume
let seq = 0;                   // request ids: unique per connection is enough
let failures = 0;              // consecutive failed connections, for the backoff
let online = false;            // registered on the current connection
let stopping = false;          // set by SIGINT/SIGTERM: do not reconnect
const waiting = new Map();     // request id -> resolve(reply frame)
const running = new Map();     // task_id -> AbortController, while we work on it
const finished = new Map();    // task_id -> result payload (re-sent if the task comes back)

const log = (...args) => console.log(...args);

// --- sending -------------------------------------------------------------------------

function send(type, payload = {}) {
  const id = `n${++seq}`;
  ws.send(JSON.stringify({ type, id, payload }));
  return id;
}

// Send a request and wait for its reply (an `error` frame if refused or if we time out).
function request(type, payload = {}, timeoutMs = 10000) {
  return new Promise((resolve) => {
    const id = send(type, payload);
    const timeout = { type: "error", payload: { code: "timeout" } };
    const timer = setTimeout(() => done(timeout), timeoutMs);
    const done = (frame) => { clearTimeout(timer); waiting.delete(id); resolve(frame); };
    waiting.set(id, done);
  });
}

// --- the work ------------------------------------------------------------------------

// Returns an error message for bad params, or null when they are fine.
function validate(params) {
  const allowed = Object.keys(CAPABILITY.params_schema.properties);
  const extra = Object.keys(params).filter((key) => !allowed.includes(key));
  if (extra.length) return `unknown param(s): ${extra.join(", ")}`;
  if (typeof params.text !== "string")
    return `param 'text' must be a string, got ${describe(params.text)}`;
  const delay = params.delay_ms ?? 0;
  if (!Number.isInteger(delay) || delay < 0 || delay > 60000)
    return `param 'delay_ms' must be an integer from 0 to 60000, got ${describe(params.delay_ms)}`;
  return null;
}
const describe = (value) => (value === undefined ? "nothing" : JSON.stringify(value));

// Wait `ms`, but give up as soon as the task is cancelled.
const sleep = (ms, signal) => new Promise((resolve, reject) => {
  const timer = setTimeout(resolve, ms);
  const stop = () => { clearTimeout(timer); reject(new Error("cancelled")); };
  signal.addEventListener("abort", stop, { once: true });
});

async function reverse(params, signal) {
  if (params.delay_ms) await sleep(params.delay_ms, signal);
  return Array.from(params.text).reverse().join("");  // by code point, so emoji survive
}

async function onTask({ task_id, params }) {
  if (running.has(task_id)) { log(`duplicate task ${task_id}: still working on it`); return; }
  if (finished.has(task_id)) {                     // after a resume: our result may be lost
    log(`duplicate task ${task_id}: sending its result again`);
    send("result", finished.get(task_id));
    return;
  }
  log(`task ${task_id} started`);
  const abort = new AbortController();
  running.set(task_id, abort);
  let result;
  const problem = validate(params);
  if (problem) {
    result = { task_id, success: false, error: `invalid params: ${problem}` };
  } else {
    try {
      result = { task_id, success: true, data: await reverse(params, abort.signal) };
    } catch (err) {
      result = { task_id, success: false, error: String(err.message ?? err) };
    }
  }
  running.delete(task_id);
  if (abort.signal.aborted) return;                // cancelled: the hub would refuse a result
  finished.set(task_id, result);
  setTimeout(() => finished.delete(task_id), 330_000).unref();  // the hub forgets it by then
  // No reply on success. If the socket is down, the hub re-sends the task after the
  // resume and the `finished` branch above answers it.
  if (online) send("result", result);
  log(`task ${task_id} ${result.success ? "completed" : `failed: ${result.error}`}`);
}

// --- the connection ------------------------------------------------------------------

function connect() {
  ws = new WebSocket(URL);
  let beat = null;
  let opened = false;

  ws.onopen = () => {
    opened = true;
    const id = send("register", {
      name: "node-reverser",
      description: "A Node.js agent using only the built-in WebSocket",
      capabilities: [CAPABILITY],
      metadata: { lang: "javascript", runtime: `node ${process.version}` },
      ...(identity && { resume: identity }),       // always the full registration
    });
    // A plain callback, not `await`: the resume catch-up frames can arrive in the same
    // network read as this reply, and an `await` would resume only after they were handled.
    waiting.set(id, (reply) => {
      waiting.delete(id);
      if (reply.payload.code === "closed") return;  // the connection dropped first
      if (reply.type === "error") {                 // e.g. limit_exceeded: try again later
        console.error("register refused:", reply.payload.code, reply.payload.message);
        ws.close();
        return;
      }
      const p = reply.payload;                      // resumed: false means a fresh identity
      identity = { agent_id: p.agent_id, token: p.resume_token };
      failures = 0;
      online = true;
      beat = setInterval(() => send("heartbeat"), p.heartbeat_interval * 1000);
      log(`registered as ${p.agent_id}${p.resumed ? " (resumed)" : ""}`);
    });
  };

  ws.onmessage = ({ data }) => {
    const frame = JSON.parse(data);
    if (frame.in_reply_to != null) {                // a reply to one of our requests
      const done = waiting.get(frame.in_reply_to);
      if (done) done(frame);
      else if (frame.type === "error") console.error("refused:", frame.payload.message);
      return;
    }
    switch (frame.type) {                           // events the hub pushes
      case "delegate": onTask(frame.payload); break;
      case "cancel": {
        const task = running.get(frame.payload.task_id);
        if (task) task.abort();
        if (task) log(`task ${frame.payload.task_id} cancelled: ${frame.payload.reason}`);
        break;
      }
      case "error": console.error("hub error:", frame.payload.code, frame.payload.message); break;
    }
  };

  // Runs once per connection, however it ended. Node 20's WebSocket fires only `error`
  // (no `close`) when the connection cannot be opened at all, so both events lead here.
  let ended = false;
  ws.onerror = () => { if (!opened) lost(1006, "cannot connect"); };
  ws.onclose = ({ code, reason }) => lost(code, reason);

  function lost(code, reason) {
    if (ended) return;
    ended = true;
    clearInterval(beat);
    online = false;
    for (const done of waiting.values()) done({ type: "error", payload: { code: "closed" } });
    if (stopping) return;
    if (code === 4003) {                            // a newer connection took our identity
      console.error("replaced by another connection; exiting");
      process.exit(1);
    }
    // Exponential backoff with full jitter: 0.25 s, 0.5 s, 1 s ... capped at 8 s, so we
    // stay well inside the hub's resume grace (30 s by default).
    const delay = Math.random() * Math.min(8000, 250 * 2 ** failures++);
    log(`connection closed (${code} ${reason || "-"}); retrying in ${Math.round(delay)} ms`);
    setTimeout(connect, delay);
  }
}

// --- shutdown ------------------------------------------------------------------------

async function shutdown(signal) {
  if (stopping) process.exit(1);                    // a second Ctrl-C: give up at once
  stopping = true;
  log(`${signal}: deregistering`);
  // Deregister even if our register reply is still on its way: the hub handles frames in
  // order. Its reply means our tasks are failed and our requests cancelled, for good.
  if (ws.readyState === WebSocket.OPEN) {          // (between reconnects there is nothing to do)
    await request("deregister", {}, 3000);
    const closed = new Promise((resolve) => ws.addEventListener("close", resolve));
    ws.close(1000, "agent stopping");
    await Promise.race([closed, new Promise((resolve) => setTimeout(resolve, 3000))]);
  }
  process.exit(0);
}
process.on("SIGINT", shutdown);
process.on("SIGTERM", shutdown);

connect();
