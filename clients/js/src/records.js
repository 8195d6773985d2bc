// The hub's payloads in JavaScript's spelling: snake_case fields become camelCase, and
// the other way round for what the client sends. Every converter keeps free-form
// values (params, data, metadata, params_schema) exactly as they came.

/**
 * A concurrency limit as the hub wants it: a whole number from 1, or `undefined` for
 * none (`null`, `undefined` or `Infinity`), which is then left out of the frame (a hub
 * older than limits decodes strictly). Anything else is a TypeError.
 * @param {unknown} value
 * @param {string} what e.g. "maxConcurrency"
 * @returns {number | undefined}
 */
export function limitToWire(value, what = "maxConcurrency") {
  if (value === null || value === undefined || value === Infinity) return undefined;
  if (typeof value !== "number" || !Number.isInteger(value) || value < 1) {
    throw new TypeError(`${what} must be a whole number from 1, or null (no limit), got ${String(value)}`);
  }
  return value;
}

/**
 * Tags as the hub wants them: an array of strings (left out of the frame when empty).
 * @param {unknown} tags
 * @returns {string[]}
 */
export function tagsToWire(tags) {
  if (tags === null || tags === undefined) return [];
  if (typeof tags === "string" || typeof (/** @type {any} */ (tags))[Symbol.iterator] !== "function") {
    throw new TypeError("tags must be an array of strings");
  }
  const list = [.../** @type {Iterable<unknown>} */ (tags)];
  if (!list.every((tag) => typeof tag === "string")) throw new TypeError("tags must be an array of strings");
  return /** @type {string[]} */ (list);
}

/**
 * A capability as the hub wants it, from a name or an object.
 * @param {string | {name: string, description?: string, paramsSchema?: object | null, maxConcurrency?: number | null}} capability
 */
export function capabilityToWire(capability) {
  if (typeof capability === "string") return { name: capability };
  if (!capability || typeof capability.name !== "string") {
    throw new TypeError("a capability is a name or an object with a string `name`");
  }
  const wire = /** @type {Record<string, unknown>} */ ({ name: capability.name });
  if (capability.description !== undefined) wire.description = capability.description;
  if (capability.paramsSchema !== undefined) wire.params_schema = capability.paramsSchema;
  const limit = limitToWire(capability.maxConcurrency, `capability ${capability.name}: maxConcurrency`);
  if (limit !== undefined) wire.max_concurrency = limit;
  return wire;
}

/** @param {any} c */
export function capabilityInfo(c) {
  const info = /** @type {Record<string, unknown>} */ ({
    name: c.name,
    description: c.description ?? "",
    paramsSchema: c.params_schema ?? null,
  });
  if (c.max_concurrency != null) info.maxConcurrency = c.max_concurrency;
  return info;
}

/** @param {any} a */
export function agentInfo(a) {
  const info = /** @type {Record<string, unknown>} */ ({
    agentId: a.agent_id,
    name: a.name,
    description: a.description ?? "",
    capabilities: (a.capabilities ?? []).map(capabilityInfo),
    online: a.online,
    metadata: a.metadata ?? {},
    tags: [...(a.tags ?? [])],
  });
  if (a.hidden) info.hidden = true;
  if (a.max_concurrency != null) info.maxConcurrency = a.max_concurrency;
  if (a.hub != null) info.hub = a.hub;
  if (a.match) {
    info.match = { reason: a.match.reason, score: a.match.score, capability: a.match.capability ?? null };
  }
  return info;
}

/** @param {any} t */
export function taskInfo(t) {
  const info = /** @type {Record<string, unknown>} */ ({
    taskId: t.task_id,
    state: t.state,
    capability: t.capability,
    requester: t.requester,
    assignee: t.assignee,
    createdAt: t.created_at,
    updatedAt: t.updated_at,
    ttl: t.ttl,
    success: t.success ?? null,
    data: t.data ?? null,
    error: t.error ?? null,
  });
  if (t.truncated !== undefined) info.truncated = t.truncated;
  if (t.priority) info.priority = t.priority;
  if (t.queue_position != null) info.queuePosition = t.queue_position;
  return info;
}

/** @param {any} s */
export const hubSummary = (s) => ({
  agents: s.agents,
  online: s.online,
  tasks: s.tasks,
  uptime: s.uptime,
  counters: s.counters,
  version: s.version,
  protocol: s.protocol,
});

/** @param {any} p */
export const progressUpdate = (p) => ({
  taskId: p.task_id,
  progress: p.progress ?? null,
  message: p.message ?? null,
  data: p.data ?? null,
});

/** @param {any} e */
export function watchEvent(e) {
  const event = /** @type {Record<string, unknown>} */ ({
    kind: e.kind,
    seq: e.seq,
    time: e.time,
    missed: e.missed ?? 0,
  });
  if (e.agent) event.agent = agentInfo(e.agent);
  if (e.reason !== undefined) event.reason = e.reason;
  if (e.task) event.task = taskInfo(e.task);
  if (e.duration !== undefined) event.duration = e.duration;
  if (e.progress) {
    event.progress = { taskId: e.progress.task_id, progress: e.progress.progress ?? null, message: e.progress.message ?? null };
  }
  if (e.broadcast) event.broadcast = { ...e.broadcast };
  return event;
}
