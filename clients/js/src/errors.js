// Typed errors: every `error` frame from the hub becomes one of these, and so does every
// task that ends without success. All extend AgentMeshError and carry the protocol's
// `code` (docs/protocol.md §6), so `err instanceof NoCapableAgent` and
// `err.code === "no_capable_agent"` both work.

/** Base of every error this package throws. `code` is the protocol's error code, if any. */
export class AgentMeshError extends Error {
  /**
   * @param {string} message
   * @param {{code?: string | null, cause?: unknown}} [options]
   */
  constructor(message, options = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    /** @type {string | null} */
    this.code = options.code ?? /** @type {any} */ (new.target).code ?? null;
  }

  get name() {
    return this.constructor.name;
  }
}

// --- the hub refused a request --------------------------------------------------------

/** The hub answered a request with an `error` frame. `details` is its details object. */
export class HubError extends AgentMeshError {
  /**
   * @param {string} message
   * @param {{code?: string | null, details?: Record<string, unknown> | null}} [options]
   */
  constructor(message, options = {}) {
    super(message, { code: options.code });
    /** @type {Record<string, unknown> | null} */
    this.details = options.details ?? null;
  }
}

export class InvalidMessage extends HubError { static code = "invalid_message"; }
export class UnknownType extends HubError { static code = "unknown_type"; }
export class NotRegistered extends HubError { static code = "not_registered"; }
export class AlreadyRegistered extends HubError { static code = "already_registered"; }
export class UnknownAgent extends HubError { static code = "unknown_agent"; }
export class UnknownTask extends HubError { static code = "unknown_task"; }
export class NoCapableAgent extends HubError { static code = "no_capable_agent"; }
export class Forbidden extends HubError { static code = "forbidden"; }
export class TaskFinished extends HubError { static code = "task_finished"; }
export class TooLarge extends HubError { static code = "too_large"; }
export class LimitExceeded extends HubError { static code = "limit_exceeded"; }
export class RateLimited extends HubError { static code = "rate_limited"; }
export class InternalHubError extends HubError { static code = "internal"; }
/** The hub's disk is full or failing: it takes no new work until it heals. Retry later. */
export class StoreUnavailable extends HubError { static code = "store_unavailable"; }

const BY_CODE = new Map(
  [
    InvalidMessage, UnknownType, NotRegistered, AlreadyRegistered, UnknownAgent, UnknownTask,
    NoCapableAgent, Forbidden, TaskFinished, TooLarge, LimitExceeded, RateLimited,
    InternalHubError, StoreUnavailable,
  ].map((cls) => [cls.code, cls]),
);

/**
 * The error for an `error` frame's payload; an unknown code gives a plain HubError.
 * @param {{code: string, message?: string, details?: Record<string, unknown> | null}} payload
 * @returns {HubError}
 */
export function hubError(payload) {
  const cls = BY_CODE.get(payload.code);
  const message = payload.message ?? payload.code;
  if (cls === undefined) {
    return new HubError(`[${payload.code}] ${message}`, { code: payload.code, details: payload.details });
  }
  return new cls(message, { details: payload.details });
}

// --- a task did not complete ----------------------------------------------------------

/** A delegated task ended without success. `taskId` names it. */
export class TaskError extends AgentMeshError {
  /**
   * @param {string} taskId
   * @param {string} message
   * @param {unknown} [data] the outcome's data, if any
   */
  constructor(taskId, message, data = null) {
    super(message);
    this.taskId = taskId;
    this.data = data;
  }
}

/** The agent reported failure (or left for good); `error` is its message. */
export class TaskFailed extends TaskError {
  static code = "failed";
  /**
   * @param {string} taskId
   * @param {string | null} error
   * @param {unknown} [data]
   */
  constructor(taskId, error, data = null) {
    super(taskId, error || "the task failed", data);
    /** @type {string | null} */
    this.error = error ?? null;
  }
}

/** The task's TTL ran out before it finished. */
export class TaskTimeout extends TaskError { static code = "timeout"; }

/** The task was cancelled (by its requester, or because the requester left). */
export class TaskCancelled extends TaskError { static code = "cancelled"; }

/** The hub restarted (or forgot this client) and no longer knows this task. */
export class HubRestarted extends TaskError { static code = "hub_restarted"; }

// --- the connection -------------------------------------------------------------------

/**
 * The connection dropped before the hub answered this request: it may or may not have
 * been carried out. The client reconnects on its own.
 */
export class ConnectionLost extends AgentMeshError { static code = "connection_lost"; }

/** The hub could not be reached within `backoff.maxAttempts` attempts in a row. */
export class HubUnavailable extends AgentMeshError { static code = "hub_unavailable"; }

/** The hub refused the token (HTTP 401 at the handshake). Not retried. */
export class Unauthorized extends AgentMeshError { static code = "unauthorized"; }

/** The client was closed (`client.close()`, or its `signal` aborted) before this finished. */
export class ClientClosed extends AgentMeshError { static code = "client_closed"; }

/**
 * The error that a finished task's outcome payload stands for, or null for success.
 * @param {{task_id: string, state: string, error?: string | null, data?: unknown}} outcome
 * @returns {TaskError | null}
 */
export function outcomeError(outcome) {
  const { task_id: taskId, state, error = null, data = null } = outcome;
  switch (state) {
    case "completed":
      return null;
    case "timeout":
      return new TaskTimeout(taskId, error || "the task timed out", data);
    case "cancelled":
      return new TaskCancelled(taskId, error || "the task was cancelled", data);
    default:
      return new TaskFailed(taskId, error, data);
  }
}
