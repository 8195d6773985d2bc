// The assignee's side: capabilities with async handlers, run on tasks the hub sends.
// Mirrors the Python SDK's `Agent` (docs/agents.md): params checked before the handler
// runs, handlers run concurrently up to `maxConcurrency` (registered, so the hub holds
// the tasks past it in its dispatch queue), each with an AbortSignal that
// aborts on the hub's cancel or the task's deadline, a task never run twice (a duplicate
// after a resume is dropped, or answered with the result already made), and a graceful
// stop that lets running tasks finish within `shutdownGrace`.

import { Client } from "./client.js";
import { AgentMeshError, TaskCancelled, TaskTimeout } from "./errors.js";
import { limitToWire, tagsToWire } from "./records.js";
import { checkParams } from "./schema.js";
import { Listeners, deferred, raceTimeout } from "./util.js";

const REMEMBER_MS = 330_000; // a finished task is known to the hub for 300-330 s
const noop = () => {};

/** @param {string} name */
const key = (name) => name.trim().toLowerCase();

/**
 * A handler's return value as JSON data, or why it cannot be.
 * @param {unknown} value
 * @returns {{data: unknown} | {error: string}}
 */
function asData(value) {
  if (value === undefined) return { data: null };
  try {
    const text = JSON.stringify(value);
    if (text === undefined) return { error: `the handler's return value is not JSON serialisable: ${typeof value}` };
    return { data: JSON.parse(text) };
  } catch (error) {
    return { error: `the handler's return value is not JSON serialisable: ${error instanceof Error ? error.message : error}` };
  }
}

/** @param {unknown} error */
function errorText(error) {
  if (error instanceof Error) return error.message || error.name;
  return String(error);
}

const LOCAL_LIMIT = 16; // handlers at once, for an agent that declares no maxConcurrency

export class Agent {
  /**
   * `maxConcurrency` bounds the handlers running at once, and the agent registers it:
   * the hub never sends it more, holding the rest in its dispatch queue for whichever
   * capable agent frees a slot first. Left out, up to 16 run at once, the hub is not
   * told, and it sends the agent every task it picks it for (an older hub refuses the
   * field). `tags` are words to be found by (`discover` matches them, and filters on them).
   * @param {string} name
   * @param {import("../index.d.ts").AgentOptions} [options]
   */
  constructor(name, { description = "", metadata = {}, maxConcurrency = null, shutdownGrace = 10, tags = [] } = {}) {
    if (typeof name !== "string" || !name.trim()) throw new TypeError("an agent needs a name");
    this.name = name;
    this.description = description;
    this.metadata = metadata;
    /** @type {number | null} registered with the hub; null: not declared (16 at once) */
    this.maxConcurrency = limitToWire(maxConcurrency) ?? null;
    this.tags = tagsToWire(tags);
    this.shutdownGrace = shutdownGrace;
    /** @type {Map<string, {name: string, handler: Function, description: string, paramsSchema: Record<string, unknown> | null, maxConcurrency: number | null}>} */
    this._capabilities = new Map();
    /** @type {Client | null} */
    this.client = null;
    /** @type {Map<string, {controller: AbortController, done: Promise<void>, payload: any}>} */
    this._running = new Map();
    /** @type {Map<string, any>} task_id -> the result sent (null: ended without one) */
    this._finished = new Map();
    this._active = 0;
    /** @type {Array<() => void>} */
    this._queue = [];
    this._stopping = false;
    this._stopped = deferred();
    /** Resolves once the agent has stopped (after `stop()`, or a fatal client error). */
    this.closed = this._stopped.promise;
    /** How many tasks it ran, dropped as duplicates, or answered again (for tests, metrics). */
    this.stats = { started: 0, duplicates: 0, resent: 0 };
    this._listeners = new Listeners();
  }

  /**
   * Call `listener` on an event, for logs and metrics: "task" ({taskId, capability,
   * requester}: a handler starts), "done" ({taskId, success, error}: its result is
   * sent), "cancel" ({taskId, reason}: the hub cancelled it or its deadline passed),
   * "duplicate" ({taskId, resent}: a task delivered again after a resume). Connection
   * events are the client's: `agent.client.on("connect" | "disconnect", ...)`.
   * Returns a function that removes the listener.
   * @param {string} event
   * @param {(value: any) => void} listener
   */
  on(event, listener) {
    return this._listeners.on(event, listener);
  }

  /** @param {string} event @param {unknown} value */
  _emit(event, value) {
    this._listeners.emit(event, value, (error) => this.client?._emit("warning", error));
  }

  /**
   * Offer a capability: `handler(params, ctx)` is called for each task, its returned
   * value is the result and a thrown error fails the task with its message.
   * `maxConcurrency` bounds this capability's tasks running at once, within the
   * agent's (registered: the hub holds the rest; default none).
   * @param {string} name
   * @param {(params: any, ctx: import("../index.d.ts").TaskContext) => unknown} handler
   * @param {import("../index.d.ts").CapabilityOptions} [options]
   */
  capability(name, handler, { description = "", paramsSchema = null, maxConcurrency = null } = {}) {
    if (typeof name !== "string" || !name.trim()) throw new TypeError("a capability needs a name");
    if (typeof handler !== "function") throw new TypeError(`capability ${name}: the handler must be a function`);
    if (this._capabilities.has(key(name))) throw new AgentMeshError(`capability ${name} is already defined`);
    if (this.client) throw new AgentMeshError("add capabilities before run()");
    const limit = limitToWire(maxConcurrency, `capability ${name}: maxConcurrency`) ?? null;
    this._capabilities.set(key(name), { name, handler, description, paramsSchema, maxConcurrency: limit });
    return this;
  }

  /** The agent's ID once registered. */
  get agentId() {
    return this.client?.agentId ?? null;
  }

  /**
   * Connect, register, and serve tasks until `stop()`; resolves once registered.
   * Options are those of `connect` (token, backoff, WebSocket, signal, hidden, ...);
   * `url` may be an array of hub URLs, as for `connect`.
   * @param {string | readonly string[]} url
   * @param {import("../index.d.ts").ClientOptions} [options]
   */
  async run(url, options = {}) {
    if (this.client) throw new AgentMeshError("this agent already runs");
    const capabilities = [...this._capabilities.values()].map(({ name, description, paramsSchema, maxConcurrency }) => ({
      name,
      description,
      paramsSchema,
      maxConcurrency,
    }));
    this.client = new Client(url, {
      name: this.name,
      description: this.description,
      metadata: this.metadata,
      ...options,
      capabilities,
      // The agent's own: the hub's bound must be the one this agent keeps.
      tags: this.tags,
      maxConcurrency: this.maxConcurrency,
      register: true,
      _onTask: (/** @type {any} */ frame) => this._onTask(frame),
      _onCancel: (/** @type {any} */ frame) => this._onCancel(frame),
    });
    this.client.closed.then(() => {
      this._stopping = true;
      this._stopped.resolve();
    });
    await this.client.ready;
    return this;
  }

  /**
   * Stop gracefully: new tasks fail ("the agent is shutting down"), running ones get
   * `grace` seconds to finish, the rest are aborted and fail, then deregister.
   * @param {{grace?: number}} [options]
   */
  async stop({ grace = this.shutdownGrace } = {}) {
    if (!this.client) return;
    if (!this._stopping) {
      this._stopping = true;
      const running = [...this._running.values()].map((task) => task.done);
      if (running.length) await raceTimeout(Promise.all(running), grace * 1000);
      for (const [taskId, task] of this._running) {
        this._reply(taskId, { task_id: taskId, success: false, error: "the agent shut down before the task finished" });
        task.controller.abort(new AgentMeshError("the agent shut down before the task finished"));
      }
      for (const start of this._queue.splice(0)) start();
    }
    await this.client.close();
    await this._stopped.promise;
  }

  // ---------------------------------------------------------------------------------

  /** @param {any} frame */
  _onTask(frame) {
    const payload = frame.payload ?? {};
    const taskId = payload.task_id;
    if (this._running.has(taskId)) {
      this.stats.duplicates += 1; // re-sent after a resume: still working on it
      this._emit("duplicate", { taskId, resent: false });
      return;
    }
    if (this._finished.has(taskId)) {
      this.stats.duplicates += 1;
      const result = this._finished.get(taskId);
      if (result) {
        // Done, but the result may not have reached the hub: send it again.
        this.stats.resent += 1;
        this.client?._sendFrame("result", result, {}, noop);
      }
      this._emit("duplicate", { taskId, resent: Boolean(result) });
      return;
    }
    if (this._stopping) {
      this._reply(taskId, { task_id: taskId, success: false, error: "the agent is shutting down" });
      return;
    }
    const capability = this._capabilities.get(key(String(payload.capability ?? "")));
    const controller = new AbortController();
    const ttl = typeof payload.ttl === "number" ? payload.ttl : null;
    const deadline = ttl === null ? null : Date.now() + ttl * 1000;
    const timer = ttl === null ? undefined : setTimeout(
      () => controller.abort(new TaskTimeout(taskId, `the task's deadline passed (ttl ${ttl}s)`)),
      ttl * 1000,
    );
    const finished = deferred();
    this._running.set(taskId, { controller, done: finished.promise, payload });
    const ctx = {
      taskId,
      requester: frame.from,
      capability: capability?.name ?? payload.capability,
      deadline,
      signal: controller.signal,
      traceparent: payload.traceparent ?? null,
      /**
       * Report progress to the requester (advisory: dropped while offline).
       * @param {number | null} [fraction]
       * @param {string | null} [message]
       * @param {unknown} [data]
       */
      progress: async (fraction = null, message = null, data = null) => {
        if (fraction !== null && !(typeof fraction === "number" && Number.isFinite(fraction))) {
          throw new TypeError("progress must be a finite number or null");
        }
        if (!this._running.has(taskId) || controller.signal.aborted) return;
        this.client?._sendFrame("progress", { task_id: taskId, progress: fraction, message, data }, {}, noop);
      },
    };
    const run = async () => {
      /** @type {any} */
      let result;
      try {
        if (controller.signal.aborted) return; // ended while it waited its turn
        if (this._stopping) throw new AgentMeshError("the agent is shutting down");
        if (!capability) throw new AgentMeshError(`no handler for capability ${JSON.stringify(payload.capability)}`);
        const problem = checkParams(capability.paramsSchema, payload.params ?? {});
        if (problem) throw new AgentMeshError(`bad params: ${problem}`);
        this.stats.started += 1;
        this._emit("task", { taskId, capability: capability.name, requester: frame.from });
        // Race the handler against its signal: a handler that ignores the abort is no
        // longer waited for, and what it returns later is dropped.
        const aborted = new Promise((resolve) => {
          controller.signal.addEventListener("abort", resolve, { once: true });
        });
        const outcome = await Promise.race([
          Promise.resolve().then(() => capability.handler(payload.params ?? {}, ctx)).then(
            (value) => ({ value }),
            (error) => ({ error }),
          ),
          aborted.then(() => null),
        ]);
        if (outcome === null || controller.signal.aborted) return;
        if ("error" in outcome) {
          result = { task_id: taskId, success: false, error: errorText(outcome.error) };
        } else {
          const data = asData(outcome.value);
          result = "data" in data
            ? { task_id: taskId, success: true, data: data.data }
            : { task_id: taskId, success: false, error: data.error };
        }
      } catch (error) {
        result = { task_id: taskId, success: false, error: errorText(error) };
      } finally {
        clearTimeout(timer);
        this._running.delete(taskId);
        if (!result) this._remember(taskId, null); // cancelled or timed out: never run again
        finished.resolve();
      }
      this._reply(taskId, result);
    };
    this._whenFree(controller.signal).then(() => run().finally(() => this._release()));
  }

  /**
   * Send a result and remember it, to answer a re-sent task with it. If the socket is
   * down, the hub re-sends the task after the resume and the cached result answers it.
   * @param {string} taskId
   * @param {any} result
   */
  _reply(taskId, result) {
    this._remember(taskId, result);
    this.client?._sendFrame("result", result, {}, noop);
    this._emit("done", { taskId, success: result.success, error: result.error ?? null });
  }

  /** @param {string} taskId @param {any} result */
  _remember(taskId, result) {
    if (this._finished.has(taskId) && !result) return;
    this._finished.set(taskId, result);
    const timer = setTimeout(() => this._finished.delete(taskId), REMEMBER_MS);
    /** @type {any} */ (timer).unref?.();
  }

  /** @param {any} frame */
  _onCancel(frame) {
    const { task_id: taskId, reason } = frame.payload ?? {};
    const task = this._running.get(taskId);
    if (!task) return; // already done, or a cancel sent twice
    const error = reason === "timeout"
      ? new TaskTimeout(taskId, "the task timed out")
      : new TaskCancelled(taskId, reason || "cancelled by the requester");
    task.controller.abort(error);
    this._emit("cancel", { taskId, reason: reason ?? null });
  }

  /** @param {AbortSignal} signal */
  _whenFree(signal) {
    // The hub sends no more than `maxConcurrency` at once; this holds the line anyway,
    // should the hub's count and ours disagree for a moment.
    if (this._active < (this.maxConcurrency ?? LOCAL_LIMIT)) {
      this._active += 1;
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const start = () => {
        signal.removeEventListener("abort", skip);
        this._active += 1;
        resolve(undefined);
      };
      const skip = () => {
        // Ended while waiting its turn: run() sees the abort and returns at once.
        const at = this._queue.indexOf(start);
        if (at >= 0) this._queue.splice(at, 1);
        this._active += 1;
        resolve(undefined);
      };
      signal.addEventListener("abort", skip, { once: true });
      this._queue.push(start);
    });
  }

  _release() {
    this._active -= 1;
    const next = this._queue.shift();
    if (next) next();
  }
}
