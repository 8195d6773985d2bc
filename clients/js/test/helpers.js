// Shared by the tests. They run against real hubs that tests/test_js_client.py starts
// (on loopback port 0) and names in environment variables:
//   AGENTMESH_TEST_URL          an open hub (heartbeat_interval 0.5 s), with a Python
//                               SDK agent "py-helper" on it (py-echo, py-fail, py-drop,
//                               py-delegate)
//   AGENTMESH_TEST_TOKEN_URL    a hub with tokens: AGENTMESH_TEST_TOKEN (ordinary) and
//                               AGENTMESH_TEST_ADMIN_TOKEN (admin)
// Without them (run outside pytest) every test is skipped.

import { after } from "node:test";

import { Agent, connect } from "../src/index.js";

export const URL_OPEN = process.env.AGENTMESH_TEST_URL;
export const URL_TOKENS = process.env.AGENTMESH_TEST_TOKEN_URL;
export const TOKEN = process.env.AGENTMESH_TEST_TOKEN;
export const ADMIN_TOKEN = process.env.AGENTMESH_TEST_ADMIN_TOKEN;
export const skip = URL_OPEN ? false : "no hub: run through tests/test_js_client.py";

/** Every wait in a test is bounded by this (ms). */
export const WAIT = 5000;

/**
 * `promise`, or a rejection naming `what` after `ms`.
 * @template T
 * @param {Promise<T>} promise
 * @param {string} what
 * @param {number} [ms]
 * @returns {Promise<T>}
 */
export function within(promise, what, ms = WAIT) {
  /** @type {ReturnType<typeof setTimeout>} */
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return /** @type {Promise<T>} */ (Promise.race([promise, timeout]).finally(() => clearTimeout(timer)));
}

/**
 * The next `event` a client emits (e.g. "connect", "disconnect") matching `test`.
 * @param {import("../src/index.js").Client} client
 * @param {string} event
 * @param {(value: any) => boolean} [test]
 */
export function nextEvent(client, event, test = () => true) {
  return within(
    new Promise((resolve) => {
      const off = client.on(event, (value) => {
        if (!test(value)) return;
        off();
        resolve(value);
      });
    }),
    `the client's ${event} event`,
  );
}

let counter = 0;
/** A capability name no other test uses (test files run at the same time on one hub). */
export function unique(prefix) {
  counter += 1;
  return `${prefix}-${process.pid}-${counter}`;
}

const cleanups = [];
after(async () => {
  await Promise.allSettled(cleanups.splice(0).map((close) => close()));
});

/**
 * A requester connected to the open hub (closed after the file's tests).
 * @param {import("../index.d.ts").ClientOptions} [options]
 * @param {string} [url]
 */
export async function requester(options = {}, url = URL_OPEN) {
  const client = await within(connect(/** @type {string} */ (url), { name: "js-requester", ...options }), "connect");
  cleanups.push(() => client.close());
  return client;
}

/**
 * An agent on the open hub with the given capabilities, running (stopped after the
 * file's tests).
 * @param {string} name
 * @param {Record<string, Function | [Function, object]>} capabilities
 * @param {import("../index.d.ts").ClientOptions & {agent?: object}} [options]
 */
export async function runAgent(name, capabilities, options = {}, url = URL_OPEN) {
  const { agent: agentOptions, ...runOptions } = options;
  const agent = new Agent(name, agentOptions);
  for (const [capability, spec] of Object.entries(capabilities)) {
    const [handler, capabilityOptions] = Array.isArray(spec) ? spec : [spec, {}];
    agent.capability(capability, /** @type {any} */ (handler), capabilityOptions);
  }
  await within(agent.run(/** @type {string} */ (url), runOptions), `agent ${name} registering`);
  cleanups.push(() => agent.stop({ grace: 0 }));
  return agent;
}

/** A promise with its resolve, to hold a handler until the test lets it go. */
export function gate() {
  /** @type {(value?: any) => void} */
  let open = () => {};
  const promise = new Promise((resolve) => {
    open = resolve;
  });
  return { promise, open };
}

/** Resolves when `signal` aborts, with its reason. */
export function aborted(signal) {
  return new Promise((resolve) => {
    if (signal.aborted) resolve(signal.reason);
    else signal.addEventListener("abort", () => resolve(signal.reason), { once: true });
  });
}
