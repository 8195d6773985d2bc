// @agentmesh/client: a JavaScript client for agentmesh hubs (docs/protocol.md).
// Requesters: `connect(url, options)`; agents: `new Agent(name)`. See README.md.

export { Agent } from "./agent.js";
export { Client, TaskHandle, Watch, connect } from "./client.js";
export {
  AgentMeshError,
  AlreadyRegistered,
  ClientClosed,
  ConnectionLost,
  Forbidden,
  HubError,
  HubRestarted,
  HubUnavailable,
  InternalHubError,
  InvalidMessage,
  LimitExceeded,
  NoCapableAgent,
  NotRegistered,
  RateLimited,
  StoreUnavailable,
  TaskCancelled,
  TaskError,
  TaskFailed,
  TaskFinished,
  TaskTimeout,
  TooLarge,
  Unauthorized,
  UnknownAgent,
  UnknownTask,
  UnknownType,
  hubError,
} from "./errors.js";
export { checkParams } from "./schema.js";
export { Backoff } from "./util.js";

/** The wire protocol version this client speaks. */
export const PROTOCOL_VERSION = 1;
/** The event kinds any client may watch (protocol §4.16). */
export const AGENT_EVENT_KINDS = Object.freeze(["agent_registered", "agent_online", "agent_offline", "agent_left"]);
