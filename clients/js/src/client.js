// The requester's side: one WebSocket to a hub, registered as an agent, kept alive
// (heartbeats, reconnect with backoff, resume with the token), with typed errors. The
// wire protocol is docs/protocol.md; the behaviour mirrors the Python SDK's `Client`.

import {
  AgentMeshError,
  ClientClosed,
  ConnectionLost,
  HubError,
  HubRestarted,
  HubUnavailable,
  StoreUnavailable,
  TaskCancelled,
  Unauthorized,
  hubError,
  outcomeError,
} from "./errors.js";
import {
  agentInfo,
  capabilityToWire,
  hubSummary,
  limitToWire,
  progressUpdate,
  tagsToWire,
  taskInfo,
  watchEvent,
} from "./records.js";
import { Backoff, Listeners, Queue, deferred, raceTimeout, reasonText, sleep } from "./util.js";

/** The protocol version this client speaks (docs/protocol.md#versions). */
export const PROTOCOL_VERSION = 2;
const LOOKER_HEARTBEAT = 10; // seconds: an unregistered client is told no interval
const PROGRESS_BUFFER = 64;
const noop = () => {};

/**
 * Connect to a hub and register; resolves to the Client once registered (or, with
 * `register: false`, once connected). A hub that is down is retried with the backoff.
 * `url` may be an array of hub URLs (the hubs of a cluster): see `Client`.
 * Rejects with `Unauthorized` (refused token), `HubUnavailable` (after
 * `backoff.maxAttempts` failures), a `HubError` (the hub refused the registration; a
 * `StoreUnavailable` one is retried, as an unreachable hub is),
 * `ClientClosed` (the `signal` aborted) or a `TypeError` (a bad URL).
 * @param {string | readonly string[]} url
 * @param {import("../index.d.ts").ClientOptions} [options]
 * @returns {Promise<Client>}
 */
export async function connect(url, options = {}) {
  const client = new Client(url, options);
  await client.ready;
  return client;
}

/** A delegated task, as its requester sees it. */
export class TaskHandle {
  /**
   * @param {Client} client
   * @param {string} taskId
   * @param {string} agentId the assignee; "" while the task waits in the hub's queue
   * @param {string} state
   * @param {string} capability
   */
  constructor(client, taskId, agentId, state, capability) {
    this.taskId = taskId;
    /** The assignee's ID: "" while the task waits in the hub's queue (state "pending"),
     * set when an agent takes it (the hub's `status` push). */
    this.agentId = agentId;
    this.state = state;
    this.capability = capability;
    /** @type {any} the outcome payload once the task ended, in camelCase */
    this.outcome = null;
    this.done = false;
    /** @type {((update: any) => void) | null} */
    this.onProgress = null;
    this._client = client;
    this._result = deferred();
    this._result.promise.catch(noop); // not every caller waits: no unhandled rejection
    /** @type {Queue<any>} */
    this._progress = new Queue(PROGRESS_BUFFER);
  }

  /** The task's result data; rejects with TaskFailed, TaskTimeout, TaskCancelled, ... */
  wait() {
    return this._result.promise;
  }

  /**
   * Progress reports as they come (`for await`), ending when the task ends. Up to 64
   * wait unread; later ones are dropped until they are read.
   * @returns {AsyncIterableIterator<any>}
   */
  progress() {
    return this._progress;
  }

  /**
   * Cancel the task at the hub (and in the agent). Rejects with TaskFinished if it
   * already ended. The outcome (TaskCancelled) reaches `wait()`.
   * @param {string} [reason]
   */
  cancel(reason) {
    return this._client.cancel(this.taskId, reason);
  }

  /** @param {any} payload */
  _onProgress(payload) {
    const update = progressUpdate(payload);
    this._progress.push(update);
    if (this.onProgress) {
      try {
        this.onProgress(update);
      } catch (error) {
        this._client._emit("warning", error);
      }
    }
  }

  /**
   * @param {any} outcome the result payload, or null when `error` is given
   * @param {Error} [error]
   */
  _finish(outcome, error) {
    if (this.done) return;
    this.done = true;
    if (outcome) {
      this.state = outcome.state;
      this.outcome = {
        taskId: outcome.task_id,
        state: outcome.state,
        success: outcome.success,
        data: outcome.data ?? null,
        error: outcome.error ?? null,
      };
      error = outcomeError(outcome) ?? undefined;
    }
    this._progress.end();
    if (error) this._result.reject(error);
    else this._result.resolve(outcome.data ?? null);
  }
}

/** A watch of the hub's events (protocol §4.16), read with `for await`. */
export class Watch {
  /**
   * @param {Client} client
   * @param {string[]} kinds
   * @param {number} buffer
   */
  constructor(client, kinds, buffer) {
    this.kinds = kinds;
    this._client = client;
    /** @type {string[] | null} the kinds the hub said it watches, once it answered */
    this.watching = null;
    this._queue = new Queue(buffer, () => client._unwatch(this));
    this._missed = 0;
    this._ready = deferred();
    this._ready.promise.catch(noop);
    /** Resolves once the hub answered the watch; rejects with its refusal. */
    this.ready = this._ready.promise;
  }

  /** @param {any} payload */
  _push(payload) {
    const event = watchEvent(payload);
    if (this._missed) {
      event.missed = /** @type {number} */ (event.missed) + this._missed;
    }
    if (this._queue.push(event)) this._missed = 0;
    else if (!this._queue.ended) this._missed += 1;
  }

  /** @returns {Promise<IteratorResult<any>>} */
  async next() {
    await this._ready.promise;
    return this._queue.next();
  }

  /** Stop watching (also what `break` in a `for await` does). */
  return() {
    return this._queue.return();
  }

  [Symbol.asyncIterator]() {
    return this;
  }
}

/**
 * @typedef {import("../index.d.ts").ClientOptions & {
 *   _onTask?: (frame: any) => void,
 *   _onCancel?: (frame: any) => void,
 * }} InternalOptions the options, with the agent's hooks (see agent.js)
 */

/**
 * One connection to a hub, kept alive. `url` may be an array of hub URLs (the hubs of a
 * cluster, docs/cluster.md): the client stays on one hub and moves on only when it
 * cannot have a session there. After a failed attempt (the hub cannot be reached, or
 * refuses the registration with `store_unavailable`) it tries the next URL at once;
 * after a whole round of failures it waits the backoff (`backoff.maxAttempts` counts
 * attempts, every URL's). A connection that drops is first retried on the same hub.
 */
export class Client {
  /**
   * @param {string | readonly string[]} url
   * @param {InternalOptions} [options]
   */
  constructor(url, options = {}) {
    /** @type {readonly string[]} every hub URL, in the order they are tried */
    this.urls = checkUrls(url);
    /** The hub it is connected to, or tries next. */
    this.url = this.urls[0];
    this._at = 0; // this.url's place in this.urls
    this.name = options.name ?? "client";
    this.description = options.description ?? "";
    this.capabilities = (options.capabilities ?? []).map(capabilityToWire);
    this.metadata = options.metadata ?? {};
    this.tags = tagsToWire(options.tags);
    /** @type {number | null} tasks this agent runs at once, registered (null: no limit) */
    this.maxConcurrency = limitToWire(options.maxConcurrency) ?? null;
    this.token = options.token ?? null;
    this.tokenIn = options.tokenIn ?? "query";
    this.register = options.register ?? true;
    this.hidden = options.hidden ?? false;
    this.backoff = options.backoff instanceof Backoff ? options.backoff : new Backoff(options.backoff);
    this.connectTimeout = options.connectTimeout ?? 10;
    this.broadcastBuffer = options.broadcastBuffer ?? 256;
    const WebSocketClass = options.WebSocket ?? globalThis.WebSocket;
    if (typeof WebSocketClass !== "function") {
      throw new TypeError(
        "agentmesh: no WebSocket here: use Node >= 22, `node --experimental-websocket` on Node 20, " +
          "or pass a constructor (options.WebSocket, e.g. from the `ws` package)",
      );
    }
    this._WebSocket = WebSocketClass;
    /** @type {((frame: any) => void) | undefined} */
    this._onTask = options._onTask;
    /** @type {((frame: any) => void) | undefined} */
    this._onCancel = options._onCancel;

    /** @type {string | null} */
    this.agentId = null;
    this.heartbeatInterval = null;
    this.maxFrameSize = 1 << 20;
    this.sessions = 0; // how many times it registered (1 + reconnections)
    this.attempts = 0; // connection attempts, successful or not
    this.online = false;
    /** @type {number | null} the close code of the last connection */
    this._lastClose = null;

    /** @type {{agent_id: string, token: string} | null} */
    this._identity = null;
    /** @type {any} */
    this._ws = null;
    this._seq = 0;
    /** @type {Map<string, (frame: any) => void>} request id -> reply callback */
    this._pending = new Map();
    /** @type {Map<string, TaskHandle>} unfinished tasks this client delegated */
    this._tasks = new Map();
    /** @type {Set<Queue<any>>} */
    this._broadcastReaders = new Set();
    this._listeners = new Listeners();
    /** @type {Watch | null} */
    this._watch = null;
    this._closing = false;
    /** @type {Error | null} why the client stopped for good */
    this._fatal = null;
    this._stop = new AbortController(); // aborted by close(): wakes the backoff sleep
    this._onlineWait = deferred();
    this._onlineWait.promise.catch(noop);
    this._firstOnline = deferred();
    this._firstOnline.promise.catch(noop);
    /** Resolves once first registered (or connected, without registering). */
    this.ready = this._firstOnline.promise.then(() => this);
    this.ready.catch(noop);
    /** Resolves when the client has stopped for good (closed, or a fatal error). */
    this._ended = deferred();
    this.closed = this._ended.promise;

    const signal = options.signal;
    if (signal) {
      if (signal.aborted) {
        this._halt(new ClientClosed("the client's signal was aborted before it connected"));
      } else {
        signal.addEventListener("abort", () => void this.close().catch(noop), { once: true });
      }
    }
    if (!this._closing) void this._run();
  }

  // ---------------------------------------------------------------------------------
  // Events

  /**
   * Call `listener` on an event: "connect" ({agentId, resumed, session}), "disconnect"
   * ({code, reason}), "broadcast" ({sender, message, data}), "warning" (an Error).
   * Returns a function that removes the listener.
   * @param {string} event
   * @param {(value: any) => void} listener
   */
  on(event, listener) {
    return this._listeners.on(event, listener);
  }

  /** @param {string} event @param {unknown} value */
  _emit(event, value) {
    this._listeners.emit(event, value, (error) => {
      if (event !== "warning") this._emit("warning", error);
    });
  }

  // ---------------------------------------------------------------------------------
  // Requests

  /**
   * Agents a keyword (one or more words) matches, best first: a capability of exactly
   * that name (`match.reason` "exact"), then capabilities whose names hold the words in
   * that order ("name"), then agents whose text (capability names and descriptions, the
   * agent's name, description and tags) holds them all ("text"). `online: true` keeps
   * only the agents online now, `tags` those with every one of them (whole, any case).
   * One page of up to `limit`; an empty keyword lists every agent.
   * @param {string} [capability]
   * @param {import("../index.d.ts").DiscoverOptions} [options]
   */
  async discover(capability = "", options = {}) {
    return (await this.discoverPage(capability, options)).agents;
  }

  /**
   * A page of `discover` with its `nextCursor` (null after the last).
   * @param {string} [capability]
   * @param {import("../index.d.ts").DiscoverOptions} [options]
   */
  async discoverPage(capability = "", { online, tags, limit, cursor, signal } = {}) {
    const wanted = tagsToWire(tags);
    // Left out at their defaults: a hub older than these fields decodes strictly.
    const payload = compact({
      capability,
      online: online ? true : undefined,
      tags: wanted.length ? wanted : undefined,
      limit,
      cursor,
    });
    const page = await this._request("discover", payload, {}, { signal });
    return { agents: page.agents.map(agentInfo), nextCursor: page.next_cursor ?? null };
  }

  /**
   * Delegate a task and resolve to its handle once the hub accepted it. When every
   * capable agent is busy the task waits in the hub's queue: the handle's `agentId` is
   * "" and its `state` "pending" until an agent takes it (`status` shows its
   * `queuePosition`); `priority` (-100 to 100, default 0) goes first there.
   * @param {string} capability
   * @param {Record<string, unknown>} [params]
   * @param {import("../index.d.ts").DelegateOptions} [options]
   * @returns {Promise<TaskHandle>}
   */
  async submit(capability, params = {}, options = {}) {
    const { to, ttl, signal, onProgress, traceparent, tracestate, priority } = options;
    signal?.throwIfAborted();
    const payload = compact({ capability, params, ttl, traceparent, tracestate, priority: priority || undefined });
    /** @type {TaskHandle | null} */
    let handle = null;
    let abandoned = false;
    const cancelOnAbort = () => {
      if (handle && !handle.done) this._cancelQuietly(handle.taskId, reasonText(signal?.reason, "the requester stopped waiting"));
    };
    const onReply = (/** @type {any} */ reply) => {
      // Runs as the reply arrives, before any frame after it: the outcome may be next.
      handle = new TaskHandle(this, reply.task_id, reply.agent_id, reply.state, capability);
      if (onProgress) handle.onProgress = onProgress;
      this._tasks.set(handle.taskId, handle);
      if (abandoned) cancelOnAbort();
      return handle;
    };
    try {
      await this._request("delegate", payload, to == null ? {} : { to }, { signal, onReply });
    } catch (error) {
      abandoned = true; // a reply still to come is cancelled at once
      cancelOnAbort();
      throw error;
    }
    const accepted = /** @type {TaskHandle} */ (/** @type {unknown} */ (handle));
    if (signal) {
      const onAbort = () => cancelOnAbort();
      signal.addEventListener("abort", onAbort, { once: true });
      accepted._result.promise.then(
        () => signal.removeEventListener("abort", onAbort),
        () => signal.removeEventListener("abort", onAbort),
      );
    }
    return accepted;
  }

  /**
   * Delegate a task and resolve to its result data. While every capable agent is busy
   * the task waits at the hub (its TTL running), `priority` first. Rejects with
   * NoCapableAgent, UnknownAgent, LimitExceeded (the hub's queue is full), TaskFailed,
   * TaskTimeout, TaskCancelled, HubRestarted, ConnectionLost (no reply before the
   * connection dropped). Aborting `signal` cancels the task at the hub and in the
   * agent, and rejects with the signal's reason.
   * @param {string} capability
   * @param {Record<string, unknown>} [params]
   * @param {import("../index.d.ts").DelegateOptions} [options]
   */
  async delegate(capability, params = {}, options = {}) {
    const handle = await this.submit(capability, params, options);
    const { signal } = options;
    if (!signal) return handle.wait();
    return new Promise((resolve, reject) => {
      const onAbort = () => reject(signal.reason);
      if (signal.aborted) return onAbort();
      signal.addEventListener("abort", onAbort, { once: true });
      handle.wait().then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
    });
  }

  /**
   * Cancel a task this client delegated.
   * @param {string} taskId
   * @param {string} [reason]
   */
  async cancel(taskId, reason) {
    const ack = await this._request("cancel", compact({ task_id: taskId, reason }));
    return { taskId: ack.task_id, state: ack.state };
  }

  /** @param {string} taskId @param {string} reason */
  _cancelQuietly(taskId, reason) {
    if (this._closing) return;
    this.cancel(taskId, reason).catch(noop); // it may have ended meanwhile
  }

  /**
   * A task's record (yours, or assigned to you), or without `taskId` the hub's summary.
   * @param {string} [taskId]
   */
  async status(taskId) {
    const payload = await this._request("status", taskId == null ? {} : { task_id: taskId });
    return "task_id" in payload ? taskInfo(payload) : hubSummary(payload);
  }

  /**
   * Tasks newest first, filtered; one page of up to `limit`.
   * @param {import("../index.d.ts").ListTasksOptions} [options]
   */
  async listTasks(options = {}) {
    return (await this.listTasksPage(options)).tasks;
  }

  /**
   * A page of `listTasks` with its `nextCursor` (null after the last).
   * @param {import("../index.d.ts").ListTasksOptions} [options]
   */
  async listTasksPage({ state, requester, assignee, limit, cursor } = {}) {
    const page = await this._request("list_tasks", compact({ state, requester, assignee, limit, cursor }));
    return { tasks: page.tasks.map(taskInfo), nextCursor: page.next_cursor ?? null };
  }

  /**
   * Send to every other online agent; resolves to how many it reached.
   * @param {string} message
   * @param {unknown} [data]
   */
  async broadcast(message, data = null) {
    return (await this._request("broadcast", { message, data })).recipients;
  }

  /**
   * Broadcasts from other agents, from now on, as they arrive (`for await`). Up to
   * `broadcastBuffer` wait unread; later ones are dropped. `break` stops reading.
   * @returns {AsyncIterableIterator<{sender: string, message: string, data: unknown}>}
   */
  broadcasts() {
    /** @type {Queue<any>} */
    const queue = new Queue(this.broadcastBuffer, () => this._broadcastReaders.delete(queue));
    if (this._closing) queue.end();
    else this._broadcastReaders.add(queue);
    return queue;
  }

  /**
   * Follow the hub's events (protocol §4.16) with `for await`; all kinds if none are
   * given (an ordinary client on a hub with tokens then gets the agent kinds). The first
   * read rejects with Forbidden or InvalidMessage if the hub refuses. Up to `buffer`
   * events wait unread; the one after a gap says how many were lost in `missed`. After
   * a reconnection the client watches again before anything else. `break` unwatches.
   * @param {string[]} [kinds]
   * @param {{buffer?: number}} [options]
   */
  watch(kinds = [], { buffer = 1024 } = {}) {
    if (this._watch) throw new AgentMeshError("this client already watches; stop that watch first (break out of it)");
    const watch = new Watch(this, [...kinds], buffer);
    this._watch = watch;
    if (this._closing) {
      watch._ready.reject(new ClientClosed("the client is closed"));
      return watch;
    }
    this._request("watch", { kinds: watch.kinds }).then(
      (reply) => {
        watch.watching = reply.kinds;
        watch._ready.resolve();
      },
      (error) => {
        if (this._watch === watch) this._watch = null;
        watch._ready.reject(error);
        watch._queue.end();
      },
    );
    return watch;
  }

  /** @param {Watch} watch */
  _unwatch(watch) {
    if (this._watch !== watch) return;
    this._watch = null;
    if (this.online && !this._closing) this._sendFrame("unwatch", {}, {}, noop);
  }

  /**
   * Deregister (unless `deregister: false`: the hub then sees a dropped connection and
   * keeps the identity for its resume grace) and close the connection. Unfinished tasks
   * this client delegated end with TaskCancelled. Bounded by `connectTimeout`.
   * @param {{deregister?: boolean, reason?: string}} [options]
   */
  async close({ deregister = true } = {}) {
    if (this._closing) return this._ended.promise;
    this._closing = true;
    const ws = this._ws;
    if (ws && this.online && deregister && this.register) {
      const done = deferred();
      this._sendFrame("deregister", {}, {}, done.resolve);
      await raceTimeout(done.promise, this.connectTimeout * 1000);
    }
    this._halt(new ClientClosed("the client was closed"));
    if (ws) {
      const gone = deferred();
      ws.addEventListener?.("close", () => gone.resolve());
      ws.addEventListener?.("error", () => gone.resolve());
      try {
        ws.close(1000, "client closing");
      } catch {
        gone.resolve();
      }
      if (ws.readyState === 3) gone.resolve();
      await raceTimeout(gone.promise, 2000);
    }
    return this._ended.promise;
  }

  /** @returns {Promise<void>} */
  [Symbol.asyncDispose]() {
    return this.close();
  }

  // ---------------------------------------------------------------------------------
  // The connection

  /** Stop for good: reject whoever waits, end every reader. */
  /** @param {Error} error */
  _halt(error) {
    this._closing = true;
    this._fatal ??= error;
    this._stop.abort();
    this._firstOnline.reject(error);
    this._onlineWait.reject(error);
    const lost = this._pending;
    this._pending = new Map();
    for (const reply of lost.values()) reply({ type: "__lost", error });
    for (const handle of this._tasks.values()) {
      handle._finish(null, error instanceof ClientClosed ? new TaskCancelled(handle.taskId, "the client closed before the task ended") : error);
    }
    this._tasks.clear();
    for (const queue of this._broadcastReaders) queue.end();
    this._broadcastReaders.clear();
    if (this._watch) {
      this._watch._ready.reject(error);
      this._watch._queue.end();
      this._watch = null;
    }
    this._ended.resolve();
  }

  async _run() {
    let failures = 0;
    const hubs = this.urls.length;
    while (!this._closing) {
      const sessions = this.sessions;
      /** @type {unknown} */
      let error = null;
      try {
        await this._connectOnce();
      } catch (err) {
        error = err;
      }
      if (this._closing) return;
      // A refused token or registration is not retried, but a hub whose store fails
      // (or, in a cluster, cannot check a resume) is: a failed attempt, like no hub.
      if (error instanceof Unauthorized || (error instanceof HubError && !(error instanceof StoreUnavailable))) {
        this._halt(/** @type {Error} */ (error));
        return;
      }
      if (this._lastClose === 4003) {
        // A newer connection resumed this identity: do not fight it for the identity.
        this._halt(new AgentMeshError("another connection resumed this agent (close code 4003); not reconnecting", { code: "replaced" }));
        return;
      }
      // A connection that registered resets the backoff, and the same hub is tried
      // again; a failed attempt counts, and moves the client to the next hub.
      failures = this.sessions > sessions ? 0 : failures + 1;
      const limit = this.backoff.maxAttempts;
      if (limit !== null && failures >= limit) {
        const why = error instanceof Error ? error.message : "the connection closed";
        const where = hubs === 1 ? `the hub at ${this.url}` : `any of ${hubs} hubs`;
        this._halt(new HubUnavailable(`cannot reach ${where} after ${failures} attempt(s): ${why}`));
        return;
      }
      if (failures) {
        this._at = (this._at + 1) % hubs;
        this.url = this.urls[this._at];
        if (failures % hubs) continue; // the next hub at once; the backoff after a whole round
      }
      await sleep(this.backoff.delay(Math.floor(failures / hubs)) * 1000, this._stop.signal);
    }
  }

  /**
   * The URL to open: with `?protocol=2` (the version this client speaks), and with
   * `?token=` unless the token goes in a header.
   */
  _wsUrl() {
    const url = new URL(this.url);
    url.searchParams.set("protocol", String(PROTOCOL_VERSION));
    if (this.token && this.tokenIn !== "header") url.searchParams.set("token", this.token);
    return url.href;
  }

  /**
   * One connection, from opening to its end. Resolves when it ends after having
   * opened; rejects with why it could not open (or register).
   * @returns {Promise<void>}
   */
  _connectOnce() {
    this.attempts += 1;
    const { promise, resolve, reject } = deferred();
    let ws;
    try {
      ws = this.token && this.tokenIn === "header"
        ? new this._WebSocket(this._wsUrl(), { headers: { Authorization: `Bearer ${this.token}` } })
        : new this._WebSocket(this._wsUrl());
    } catch (error) {
      const why = error instanceof Error ? error.message : String(error);
      reject(new TypeError(`agentmesh: cannot open a WebSocket to ${this.url}: ${why}`));
      return promise;
    }
    this._ws = ws;
    let opened = false;
    let ended = false;
    let registered = false;
    let refusing = false; // finding out why the handshake failed
    /** @type {ReturnType<typeof setInterval> | undefined} */
    let beat;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    let silence;
    const openTimer = setTimeout(() => end(1006, `no registration within ${this.connectTimeout}s`, true), this.connectTimeout * 1000);

    const armSilence = () => {
      clearTimeout(silence);
      const interval = this.heartbeatInterval ?? LOOKER_HEARTBEAT;
      silence = setTimeout(() => end(1006, `the hub said nothing for ${3 * interval}s`, true), 3 * interval * 1000);
    };

    /**
     * @param {number} code
     * @param {string} reason
     * @param {boolean} [closeIt] close the socket ourselves
     * @param {Error} [error] reject with this (the attempt failed)
     */
    const end = (code, reason, closeIt = false, error = undefined) => {
      if (ended) return;
      ended = true;
      clearTimeout(openTimer);
      clearTimeout(silence);
      clearInterval(beat);
      if (closeIt) {
        try {
          ws.close();
        } catch {
          // already closing
        }
      }
      if (this._ws === ws) this._ws = null;
      this._lastClose = code;
      const wasOnline = this.online;
      this.online = false;
      if (!this._closing) {
        this._onlineWait = deferred();
        this._onlineWait.promise.catch(noop);
      }
      const lost = this._pending;
      this._pending = new Map();
      const gone = new ConnectionLost(`the connection to the hub closed (${code}${reason ? ` ${reason}` : ""}) before the reply`);
      for (const reply of lost.values()) reply({ type: "__lost", error: gone });
      if (wasOnline) this._emit("disconnect", { code, reason });
      if (error) reject(error);
      else if (!registered) reject(new AgentMeshError(`the hub at ${this.url} closed the connection (${code}${reason ? ` ${reason}` : ""}) before it registered`));
      else resolve();
    };

    const online = () => {
      registered = true;
      clearTimeout(openTimer);
      this.online = true;
      this.sessions += 1;
      armSilence();
      clearInterval(beat);
      beat = setInterval(() => this._sendFrame("heartbeat", {}, {}, noop), (this.heartbeatInterval ?? LOOKER_HEARTBEAT) * 1000);
      // Watch again before anything else is sent (those who wait resume after this).
      const watch = this._watch;
      if (watch && watch.watching !== null) {
        this._sendFrame("watch", { kinds: watch.kinds }, {}, (frame) => {
          if (frame.type === "error") {
            this._watch = null;
            watch._queue.end(hubError(frame.payload));
          }
        });
      }
      this._onlineWait.resolve();
      this._firstOnline.resolve();
    };

    ws.onopen = () => {
      opened = true;
      if (this._closing) return end(1000, "client closing", true);
      if (!this.register) {
        this.heartbeatInterval = null;
        online();
        this._emit("connect", { agentId: null, resumed: false, session: this.sessions });
        return;
      }
      const payload = /** @type {Record<string, unknown>} */ ({
        name: this.name,
        description: this.description,
        capabilities: this.capabilities,
        metadata: this.metadata,
      });
      if (this.hidden) payload.hidden = true;
      // Left out at their defaults: a hub older than these fields decodes strictly.
      if (this.tags.length) payload.tags = this.tags;
      if (this.maxConcurrency !== null) payload.max_concurrency = this.maxConcurrency;
      if (this._identity) {
        // The outcomes still awaited: any the hub wrote that never arrived come again.
        payload.resume = { ...this._identity, awaiting: [...this._tasks.keys()] };
      }
      this._sendFrame("register", payload, {}, (frame) => {
        // A plain callback, run as the reply arrives: the resume's catch-up may follow
        // it in the same read, and must find the client registered.
        if (frame.type === "__lost") return;
        if (frame.type === "error") {
          return end(1000, "registration refused", true, hubError(frame.payload));
        }
        const reply = frame.payload;
        const forgotten = this._identity !== null && !reply.resumed;
        this.agentId = reply.agent_id;
        this.heartbeatInterval = reply.heartbeat_interval;
        if (reply.max_frame_size) this.maxFrameSize = reply.max_frame_size;
        this._identity = { agent_id: reply.agent_id, token: reply.resume_token };
        if (forgotten) this._hubForgotUs();
        online();
        this._emit("connect", { agentId: reply.agent_id, resumed: Boolean(reply.resumed), session: this.sessions });
      });
    };

    ws.onmessage = (/** @type {{data: unknown}} */ event) => {
      if (ended) return;
      if (registered) armSilence();
      this._dispatch(event.data);
    };

    ws.onclose = (/** @type {{code: number, reason: string}} */ event) => {
      if (!opened) {
        if (refusing) return;
        refusing = true;
        void this._refused(event.code).then((error) => end(event.code, event.reason, false, error));
        return;
      }
      end(event.code, event.reason);
    };

    // Node 20's WebSocket fires only `error` (never `close`) when it cannot connect.
    ws.onerror = (/** @type {any} */ event) => {
      if (opened || ended || refusing) return;
      refusing = true;
      const message = String(event?.message ?? event?.error?.message ?? "");
      void this._refused(1006, message).then((error) => end(1006, "cannot connect", true, error));
    };
    return promise;
  }

  /**
   * Why a handshake failed, as clear as the platform lets us tell: a refused token
   * becomes Unauthorized (from the error's text, or on Node, Deno and Bun by asking the
   * hub with an HTTP upgrade request of our own).
   * @param {number} code
   * @param {string} [message]
   * @returns {Promise<Error>}
   */
  async _refused(code, message = "") {
    const status = /\b(40[13])\b/.exec(message)?.[1] ?? (await probeHandshake(this._wsUrl(), this.token, this.tokenIn));
    if (status === "401" || status === "403") {
      return new Unauthorized(
        this.token
          ? `the hub at ${this.url} refused the token (HTTP ${status})`
          : `the hub at ${this.url} wants a token (HTTP ${status}); pass options.token`,
      );
    }
    const why = status && !/^\d+$/.test(status) ? status : status ? `HTTP ${status}` : message || `close code ${code}`;
    return new AgentMeshError(`cannot connect to the hub at ${this.url}: ${why}`, { code: "connect_failed" });
  }

  _hubForgotUs() {
    for (const handle of this._tasks.values()) {
      handle._finish(null, new HubRestarted(handle.taskId, "the hub restarted (or forgot this client) and lost this task"));
    }
    this._tasks.clear();
  }

  /** @param {unknown} data */
  _dispatch(data) {
    let frame;
    try {
      const text = typeof data === "string" ? data : new TextDecoder().decode(/** @type {any} */ (data));
      frame = JSON.parse(text);
    } catch (error) {
      this._emit("warning", new AgentMeshError(`ignoring a frame from the hub that is not JSON: ${error}`));
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    if (frame.in_reply_to != null) {
      const reply = this._pending.get(frame.in_reply_to);
      if (reply) {
        this._pending.delete(frame.in_reply_to);
        reply(frame);
      } else if (frame.type === "error") {
        this._emit("warning", hubError(frame.payload)); // e.g. a late result refused
      }
      return;
    }
    const payload = frame.payload ?? {};
    switch (frame.type) {
      case "result": {
        // Exactly once: a handle is finished once and then forgotten, so a second copy
        // of an outcome (after a resume with `awaiting`) finds nobody and is dropped.
        const handle = this._tasks.get(payload.task_id);
        if (!handle) return;
        this._tasks.delete(payload.task_id);
        handle._finish(payload);
        return;
      }
      case "progress":
        this._tasks.get(payload.task_id)?._onProgress(payload);
        return;
      case "status": {
        // Delivered late (the assignee resumed), or taken from the hub's queue.
        const handle = this._tasks.get(payload.task_id);
        if (handle) {
          handle.state = payload.state;
          if (payload.assignee) handle.agentId = payload.assignee;
        }
        return;
      }
      case "broadcast": {
        const message = { sender: frame.from, message: payload.message, data: payload.data ?? null };
        for (const queue of this._broadcastReaders) queue.push(message);
        this._emit("broadcast", message);
        return;
      }
      case "event":
        this._watch?._push(payload);
        return;
      case "delegate":
        this._onTask?.(frame);
        return;
      case "cancel":
        this._onCancel?.(frame);
        return;
      case "error":
        this._emit("warning", hubError(payload));
        return;
      default:
        return; // a newer hub's event: ignored
    }
  }

  _nextId() {
    this._seq += 1;
    return `js${this._seq}`;
  }

  /**
   * Send a frame now, on the current connection; `onReply` gets the reply frame (or a
   * `{type: "__lost"}` if the connection ends first). Returns false if not sent.
   * @param {string} type
   * @param {object} payload
   * @param {object} [envelope]
   * @param {(frame: any) => void} [onReply]
   */
  _sendFrame(type, payload, envelope = {}, onReply = undefined) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    const id = this._nextId();
    try {
      ws.send(JSON.stringify({ type, id, payload, ...envelope }));
    } catch {
      return false;
    }
    if (onReply) this._pending.set(id, onReply);
    return true;
  }

  /**
   * Send a request once connected (waiting for the connection if it is down) and
   * resolve to its reply payload, or reject with the hub's typed error.
   * @param {string} type
   * @param {object} payload
   * @param {object} [envelope]
   * @param {{signal?: AbortSignal, onReply?: (payload: any) => unknown}} [options]
   * @returns {Promise<any>}
   */
  async _request(type, payload, envelope = {}, { signal, onReply } = {}) {
    for (;;) {
      signal?.throwIfAborted();
      if (this._fatal) throw this._fatal;
      if (!this.online) await this._whenOnline(signal);
      const { promise, resolve, reject } = deferred();
      const sent = this._sendFrame(type, payload, envelope, (frame) => {
        if (frame.type === "__lost") reject(frame.error);
        else if (frame.type === "error") reject(hubError(frame.payload));
        else resolve(onReply ? onReply(frame.payload) : frame.payload);
      });
      if (!sent) {
        // The socket closed under us (it ends a moment later): wait for the next one.
        await sleep(0);
        continue;
      }
      if (!signal) return promise;
      return new Promise((res, rej) => {
        const onAbort = () => rej(signal.reason);
        signal.addEventListener("abort", onAbort, { once: true });
        promise.then(res, rej).finally(() => signal.removeEventListener("abort", onAbort));
      });
    }
  }

  /** @param {AbortSignal} [signal] */
  _whenOnline(signal) {
    const waiting = this._onlineWait.promise;
    if (!signal) return waiting;
    return new Promise((resolve, reject) => {
      const onAbort = () => reject(signal.reason);
      signal.addEventListener("abort", onAbort, { once: true });
      waiting.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
    });
  }
}

/**
 * The hub URLs, checked: one URL or an array of them, each ws:// or wss:// with a host.
 * @param {string | readonly string[]} url
 * @returns {readonly string[]}
 */
function checkUrls(url) {
  const urls = Array.isArray(url) ? [...url] : [/** @type {string} */ (url)];
  if (!urls.length) throw new TypeError("agentmesh: give at least one hub URL, got an empty array");
  return Object.freeze(urls.map(checkUrl));
}

/**
 * The URL, checked: ws:// or wss:// with a host.
 * @param {string} url
 */
function checkUrl(url) {
  let parsed;
  try {
    parsed = new URL(url);
  } catch {
    throw new TypeError(`agentmesh: the hub URL must look like ws://host:port, got ${JSON.stringify(url)}`);
  }
  if ((parsed.protocol !== "ws:" && parsed.protocol !== "wss:") || !parsed.hostname) {
    throw new TypeError(`agentmesh: the hub URL must look like ws://host:port (or wss://), got ${JSON.stringify(url)}`);
  }
  return url;
}

/**
 * An object without its undefined fields.
 * @param {Record<string, unknown>} object
 */
function compact(object) {
  return Object.fromEntries(Object.entries(object).filter(([, value]) => value !== undefined));
}

/**
 * Ask the hub for its answer to a WebSocket upgrade, to tell a refused token (401) from
 * a hub that is not there. Only where `node:http` exists (Node, Deno, Bun); resolves to
 * the HTTP status as a string, an error code (ECONNREFUSED, ENOTFOUND, ...), or null.
 * @param {string} url
 * @param {string | null} token
 * @param {string} tokenIn
 * @returns {Promise<string | null>}
 */
async function probeHandshake(url, token, tokenIn) {
  if (typeof /** @type {any} */ (globalThis).process?.versions?.node !== "string") return null;
  let http;
  try {
    const parsed = new URL(url);
    http = await import(parsed.protocol === "wss:" ? "node:https" : "node:http");
  } catch {
    return null;
  }
  const target = new URL(url.replace(/^ws/, "http"));
  return new Promise((resolve) => {
    /** @type {Record<string, string>} */
    const headers = {
      Connection: "Upgrade",
      Upgrade: "websocket",
      "Sec-WebSocket-Version": "13",
      "Sec-WebSocket-Key": "YWdlbnRtZXNoIHByb2JlIQ==",
    };
    if (token && tokenIn === "header") headers.Authorization = `Bearer ${token}`;
    const request = http.request(target, { headers, timeout: 2000 });
    const done = (/** @type {string | null} */ value) => {
      request.destroy();
      resolve(value);
    };
    request.on("upgrade", (/** @type {any} */ response, /** @type {any} */ socket) => {
      socket.destroy();
      done(String(response.statusCode));
    });
    request.on("response", (/** @type {any} */ response) => {
      response.resume();
      done(String(response.statusCode));
    });
    request.on("timeout", () => done(null));
    request.on("error", (/** @type {any} */ error) => done(error?.code ?? null));
    request.end();
  });
}
