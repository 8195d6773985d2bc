// Types of @agentmesh/client (hand-written; the package runs from src/*.js as it is).

// --- records (the hub's payloads, in camelCase) -------------------------------------

export interface CapabilitySpec {
  name: string;
  description?: string;
  /** JSON Schema of the task params; the agent checks params against it. */
  paramsSchema?: Record<string, unknown> | null;
  /**
   * How many tasks of this capability the agent runs at once (at least 1), within its
   * own limit; the hub holds the rest. null, undefined or Infinity: no limit of its own.
   */
  maxConcurrency?: number | null;
}

export interface CapabilityInfo {
  name: string;
  description: string;
  paramsSchema: Record<string, unknown> | null;
  /** Present only when the capability has a limit of its own. */
  maxConcurrency?: number;
}

/** Why a discover with a keyword found an agent (protocol §4.4). */
export interface DiscoverMatch {
  /**
   * "exact": a capability has exactly the keyword's words, in order; "name": a
   * capability's name holds them in that order; "text": they are spread over its text.
   */
  reason: "exact" | "name" | "text";
  /** 3 (exact), 2 (name), 1 (text). */
  score: number;
  /** The capability that matched; null if none holds any of the words. */
  capability: string | null;
}

export interface AgentInfo {
  agentId: string;
  name: string;
  description: string;
  capabilities: CapabilityInfo[];
  online: boolean;
  metadata: Record<string, unknown>;
  /** As registered ([] when it has none). */
  tags: string[];
  /** How many tasks it runs at once, in all; present only when it registered a limit. */
  maxConcurrency?: number;
  /** Present in the results of a discover with a keyword: why it matched. */
  match?: DiscoverMatch;
  /** Only in watch events, for hidden agents. */
  hidden?: true;
  /** In a cluster (docs/cluster.md): the name of the hub that holds the agent, when it is
   * not the hub this client is connected to. */
  hub?: string;
}

export type TaskState = "pending" | "in_progress" | "completed" | "failed" | "timeout" | "cancelled";

export interface TaskInfo {
  taskId: string;
  state: TaskState;
  capability: string;
  requester: string;
  assignee: string;
  createdAt: number;
  updatedAt: number;
  ttl: number;
  success: boolean | null;
  data: unknown;
  error: string | null;
  truncated?: boolean;
  /** The delegate's priority; present only when not 0. */
  priority?: number;
  /**
   * Present only while the task waits in the hub's queue for a free agent (state
   * "pending", assignee ""): its place, 1 being next, if nothing of a higher priority
   * arrives meanwhile.
   */
  queuePosition?: number;
}

export interface HubSummary {
  agents: number;
  online: number;
  tasks: Record<TaskState, number>;
  uptime: number;
  counters: Record<string, number>;
  version: string;
  protocol: number;
}

export interface ProgressUpdate {
  taskId: string;
  progress: number | null;
  message: string | null;
  data: unknown;
}

export interface Outcome {
  taskId: string;
  state: TaskState;
  success: boolean;
  data: unknown;
  error: string | null;
}

export interface BroadcastMessage {
  /** The sending agent's ID. */
  sender: string;
  message: string;
  data: unknown;
}

export type EventKind =
  | "agent_registered"
  | "agent_online"
  | "agent_offline"
  | "agent_left"
  | "task_state"
  | "task_progress"
  | "broadcast";

export interface WatchEvent {
  kind: EventKind;
  seq: number;
  time: number;
  /** Events of watched kinds skipped just before this one (0 if none). */
  missed: number;
  agent?: AgentInfo;
  reason?: string;
  task?: TaskInfo;
  duration?: number;
  progress?: { taskId: string; progress: number | null; message: string | null };
  broadcast?: { sender: string; message: string; recipients: number };
}

// --- options ------------------------------------------------------------------------

export interface BackoffOptions {
  /** Seconds; the first delay is random(0, base). Default 0.5. */
  base?: number;
  /** Seconds; no delay is longer. Default 30. */
  cap?: number;
  /**
   * Failed attempts in a row (every hub URL's, with several) before giving up with
   * HubUnavailable; null (default) never.
   */
  maxAttempts?: number | null;
}

export interface WebSocketLike {
  readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: any) => void) | null;
}

export type WebSocketConstructor = new (url: string, options?: any) => WebSocketLike;

export interface ClientOptions {
  /** Display name (default "client"). */
  name?: string;
  description?: string;
  capabilities?: Array<string | CapabilitySpec>;
  metadata?: Record<string, unknown>;
  /** Words to be found by: discover matches them, and filters on them (at most 32). */
  tags?: string[];
  /**
   * How many tasks this client runs at once as an agent, registered with the hub, which
   * holds the rest in its queue (default: no limit; `Agent` registers its own).
   */
  maxConcurrency?: number | null;
  /** A bearer token for a hub with tokens. */
  token?: string;
  /**
   * How the token travels: "query" (default: `?token=` in the URL, works everywhere,
   * browsers included) or "header" (`Authorization: Bearer`, for runtimes whose
   * WebSocket takes `{headers}`: Node's built-in one, Bun, the `ws` package).
   */
  tokenIn?: "query" | "header";
  /** A tool rather than a worker: left out of discover and broadcasts. */
  hidden?: boolean;
  /** false: only look (discover, status, listTasks, watch); never an agent. */
  register?: boolean;
  backoff?: Backoff | BackoffOptions;
  /** Aborting it closes the client (and rejects a connect still in progress). */
  signal?: AbortSignal;
  /** A WebSocket constructor (e.g. from the `ws` package); default the global one. */
  WebSocket?: WebSocketConstructor;
  /** Seconds for one connection to open and register (default 10). */
  connectTimeout?: number;
  /** Broadcasts that wait unread per reader (default 256). */
  broadcastBuffer?: number;
}

export interface DelegateOptions {
  /** An agent ID: delegate to that agent (it must offer the capability). */
  to?: string;
  /** Seconds the task may live (default: the hub's default_ttl, 300 s). */
  ttl?: number;
  /** Aborting it cancels the task at the hub and in the agent. */
  signal?: AbortSignal;
  onProgress?: (update: ProgressUpdate) => void;
  traceparent?: string;
  tracestate?: string;
  /**
   * -100 to 100 (default 0): when every capable agent is busy and the task waits in
   * the hub's queue, a higher priority goes first.
   */
  priority?: number;
}

export interface ListTasksOptions {
  state?: TaskState;
  requester?: string;
  assignee?: string;
  limit?: number;
  cursor?: string | null;
}

export interface PageOptions {
  limit?: number;
  cursor?: string | null;
  signal?: AbortSignal;
}

export interface DiscoverOptions extends PageOptions {
  /** Only the agents online now (default false: offline ones that may resume too). */
  online?: boolean;
  /** Only the agents with every one of these tags (whole, any case). */
  tags?: string[];
}

export interface ConnectEvent {
  agentId: string | null;
  resumed: boolean;
  session: number;
}

export interface DisconnectEvent {
  code: number;
  reason: string;
}

export interface ClientEvents {
  connect: ConnectEvent;
  disconnect: DisconnectEvent;
  broadcast: BroadcastMessage;
  warning: Error;
}

// --- the client ---------------------------------------------------------------------

/**
 * A ws:// or wss:// URL, or several (the hubs of a cluster): the client stays on one
 * and moves to the next only when it cannot have a session there.
 */
export type HubUrls = string | readonly string[];

export function connect(url: HubUrls, options?: ClientOptions): Promise<Client>;

export class Client {
  /** Throws a TypeError for an empty array or a URL that is not ws:// or wss://. */
  constructor(url: HubUrls, options?: ClientOptions);
  /** The hub it is connected to, or tries next. */
  readonly url: string;
  /** Every hub URL it was given, in the order they are tried. */
  readonly urls: readonly string[];
  readonly agentId: string | null;
  readonly online: boolean;
  /** Registrations so far: 1 + reconnections. */
  readonly sessions: number;
  /** Connection attempts, successful or not. */
  readonly attempts: number;
  readonly heartbeatInterval: number | null;
  readonly maxFrameSize: number;
  /** Resolves once first registered (connected, with register: false). */
  readonly ready: Promise<Client>;
  /** Resolves once the client has stopped for good. */
  readonly closed: Promise<void>;

  /** Registered tags. */
  readonly tags: string[];
  /** Registered limit of tasks at once (null: none). */
  readonly maxConcurrency: number | null;

  on<K extends keyof ClientEvents>(event: K, listener: (value: ClientEvents[K]) => void): () => void;

  /** Agents the keyword's words match, best first (each with its `match`). */
  discover(capability?: string, options?: DiscoverOptions): Promise<AgentInfo[]>;
  discoverPage(capability?: string, options?: DiscoverOptions): Promise<{ agents: AgentInfo[]; nextCursor: string | null }>;
  submit(capability: string, params?: Record<string, unknown>, options?: DelegateOptions): Promise<TaskHandle>;
  delegate<T = unknown>(capability: string, params?: Record<string, unknown>, options?: DelegateOptions): Promise<T>;
  cancel(taskId: string, reason?: string): Promise<{ taskId: string; state: "cancelled" }>;
  status(): Promise<HubSummary>;
  status(taskId: string): Promise<TaskInfo>;
  listTasks(options?: ListTasksOptions): Promise<TaskInfo[]>;
  listTasksPage(options?: ListTasksOptions): Promise<{ tasks: TaskInfo[]; nextCursor: string | null }>;
  broadcast(message: string, data?: unknown): Promise<number>;
  broadcasts(): AsyncIterableIterator<BroadcastMessage>;
  watch(kinds?: EventKind[], options?: { buffer?: number }): Watch;
  close(options?: { deregister?: boolean }): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

export class TaskHandle {
  readonly taskId: string;
  /**
   * The assignee's agent ID: "" while the task waits in the hub's queue (state
   * "pending"), set when an agent takes it.
   */
  readonly agentId: string;
  readonly capability: string;
  state: TaskState;
  readonly done: boolean;
  readonly outcome: Outcome | null;
  onProgress: ((update: ProgressUpdate) => void) | null;
  wait<T = unknown>(): Promise<T>;
  progress(): AsyncIterableIterator<ProgressUpdate>;
  cancel(reason?: string): Promise<{ taskId: string; state: "cancelled" }>;
}

export class Watch implements AsyncIterableIterator<WatchEvent> {
  readonly kinds: EventKind[];
  /** The kinds the hub watches for us, once it answered. */
  readonly watching: EventKind[] | null;
  /** Resolves once the hub answered the watch; rejects with its refusal (Forbidden, ...). */
  readonly ready: Promise<void>;
  next(): Promise<IteratorResult<WatchEvent>>;
  return(): Promise<IteratorResult<WatchEvent>>;
  [Symbol.asyncIterator](): Watch;
}

// --- agents -------------------------------------------------------------------------

export interface TaskContext {
  taskId: string;
  /** The requester's agent ID. */
  requester: string;
  /** The capability, as this agent spells it. */
  capability: string;
  /** When the task's TTL runs out, in milliseconds since the epoch. */
  deadline: number | null;
  /** Aborted on the hub's cancel or the TTL deadline; `signal.reason` says which. */
  signal: AbortSignal;
  traceparent: string | null;
  /** Report progress to the requester (advisory: dropped while offline). */
  progress(fraction?: number | null, message?: string | null, data?: unknown): Promise<void>;
}

export type Handler<P = any, R = unknown> = (params: P, ctx: TaskContext) => R | Promise<R>;

export interface AgentOptions {
  description?: string;
  metadata?: Record<string, unknown>;
  /**
   * Handlers that run at once. Given, the agent registers it, and the hub holds later
   * tasks in its queue, where whichever capable agent frees a slot first takes them.
   * Left out: 16 at once, the hub not told (as older hubs expect).
   */
  maxConcurrency?: number | null;
  /** Words to be found by: discover matches them, and filters on them (at most 32). */
  tags?: string[];
  /** Seconds running tasks get to finish on stop() (default 10). */
  shutdownGrace?: number;
}

export interface CapabilityOptions {
  description?: string;
  /** JSON Schema of the params, checked before the handler runs. */
  paramsSchema?: Record<string, unknown> | null;
  /** This capability's tasks at once, within the agent's (default: no bound of its own). */
  maxConcurrency?: number | null;
}

export interface AgentEvents {
  task: { taskId: string; capability: string; requester: string };
  done: { taskId: string; success: boolean; error: string | null };
  cancel: { taskId: string; reason: string | null };
  duplicate: { taskId: string; resent: boolean };
}

export class Agent {
  constructor(name: string, options?: AgentOptions);
  readonly name: string;
  readonly agentId: string | null;
  readonly client: Client | null;
  readonly tags: string[];
  /** Registered with the hub; null: no bound. */
  readonly maxConcurrency: number | null;
  /** Resolves once the agent has stopped. */
  readonly closed: Promise<void>;
  readonly stats: { started: number; duplicates: number; resent: number };
  on<K extends keyof AgentEvents>(event: K, listener: (value: AgentEvents[K]) => void): () => void;
  capability<P = any, R = unknown>(
    name: string,
    handler: Handler<P, R>,
    options?: CapabilityOptions,
  ): this;
  /** Connect, register and serve; resolves once registered. */
  run(url: HubUrls, options?: ClientOptions): Promise<this>;
  stop(options?: { grace?: number }): Promise<void>;
}

// --- utilities ----------------------------------------------------------------------

export class Backoff {
  constructor(options?: BackoffOptions);
  readonly base: number;
  readonly cap: number;
  readonly maxAttempts: number | null;
  /** Seconds to wait after `attempt` failures in a row. */
  delay(attempt: number, random?: () => number): number;
}

/** What is wrong with params against a JSON Schema (the subset agents check), or null. */
export function checkParams(schema: Record<string, unknown> | null | undefined, params: unknown): string | null;

export const PROTOCOL_VERSION: 1;
export const AGENT_EVENT_KINDS: readonly ["agent_registered", "agent_online", "agent_offline", "agent_left"];

// --- errors -------------------------------------------------------------------------

export class AgentMeshError extends Error {
  constructor(message: string, options?: { code?: string | null; cause?: unknown });
  /** The protocol's error code (or the SDK's: "failed", "timeout", "unauthorized", ...). */
  code: string | null;
}

export class HubError extends AgentMeshError {
  constructor(message: string, options?: { code?: string | null; details?: Record<string, unknown> | null });
  details: Record<string, unknown> | null;
}
export class InvalidMessage extends HubError {}
export class UnknownType extends HubError {}
export class NotRegistered extends HubError {}
export class AlreadyRegistered extends HubError {}
export class UnknownAgent extends HubError {}
export class UnknownTask extends HubError {}
export class NoCapableAgent extends HubError {}
export class Forbidden extends HubError {}
export class TaskFinished extends HubError {}
export class TooLarge extends HubError {}
export class LimitExceeded extends HubError {}
export class RateLimited extends HubError {}
export class InternalHubError extends HubError {}
export class StoreUnavailable extends HubError {}
export function hubError(payload: { code: string; message?: string; details?: Record<string, unknown> | null }): HubError;

export class TaskError extends AgentMeshError {
  constructor(taskId: string, message: string, data?: unknown);
  taskId: string;
  data: unknown;
}
export class TaskFailed extends TaskError {
  constructor(taskId: string, error: string | null, data?: unknown);
  /** The agent's error message. */
  error: string | null;
}
export class TaskTimeout extends TaskError {}
export class TaskCancelled extends TaskError {}
export class HubRestarted extends TaskError {}
export class ConnectionLost extends AgentMeshError {}
export class HubUnavailable extends AgentMeshError {}
export class Unauthorized extends AgentMeshError {}
export class ClientClosed extends AgentMeshError {}
