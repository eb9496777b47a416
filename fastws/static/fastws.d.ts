// Type declarations for /fastws.js, the fastws browser client (protocol v1).

export type State = "connecting" | "connected" | "disconnected" | "closed";

/** Position in a channel's history, as carried by events and used for `since`. */
export interface StreamPosition {
  offset: number;
  epoch: string;
  /** For a pattern: the channel of the event at this position (the server finds it in
   *  the namespace's log and replays what the pattern matches after it). */
  channel?: string;
}

/** The `event` push: one publication. `offset`/`epoch` are absent for publications without history. */
export interface FastWSEvent<T = unknown> {
  type: "event";
  channel: string;
  data: T;
  offset?: number;
  epoch?: string;
  /** A client's publication: who sent it (protocol §13); absent for the API, CLI, Redis. */
  from?: { user: string | null; client: string };
  /** An ephemeral publication (no offset, kept nowhere). */
  ephemeral?: true;
}

/** Second argument of an `onEvent` handler. */
export interface EventMeta {
  /** The subscription (channel or pattern) this delivery is for. */
  subscription: string;
  /** True for an event the server replayed on a resubscription (missed while disconnected). */
  recovered: boolean;
}

export interface PublishedReply {
  id: number;
  type: "published";
  offset: number;
  epoch: string;
}

export interface HistoryReply<T = unknown> {
  id: number;
  type: "history";
  /** `from`: the sender of a client's publication (protocol §13), as on its push. */
  publications: Array<{ offset: number; data: T; from?: { user: string | null; client: string };
    [key: string]: unknown }>;
  offset: number;
  epoch: string;
}

export interface PresenceReply {
  id: number;
  type: "presence";
  clients: Array<{ client: string; user: string | null; [key: string]: unknown }>;
}

export interface AuthedReply {
  id: number;
  type: "authed";
  user: string;
}

export interface SubscribedReply {
  id: number;
  type: "subscribed";
  channel: string;
  recovered?: boolean;
}

export interface SubscribedInfo {
  channel: string;
  /** Present when the subscribe carried `since`: false means a gap that history no longer holds. */
  recovered?: boolean;
  /** Events replayed between the subscribe request and its reply. */
  replayed: number;
  /** True when this is a re-subscription after a reconnect. */
  resubscribe: boolean;
}

export interface PresencePush {
  type: "join" | "leave";
  channel: string;
  client: string;
  user: string | null;
}

export interface DisconnectInfo {
  code: number;
  reason: string;
  reconnect: boolean;
  after_ms: number;
  wasClean?: boolean;
  /** True for the server's `disconnect` push (before the close itself). */
  pushed?: boolean;
  /** True when the token expired (4501) and a token function will give the next attempt a new one. */
  refresh?: boolean;
}

/** `online`, `offline` and `visible` events (the browser's network and page visibility). */
export interface NetworkInfo {
  /** The client's state when the browser event came. */
  state: State;
}

/** `refresh` event: a live token refresh (token function + JWT `exp`) succeeded or failed. */
export interface RefreshInfo {
  ok: boolean;
  /** 1 for the first try for the token in force, then 2, 3, … while it keeps failing. */
  attempt: number;
  /** On success: ms until the new token expires (null without `exp`). */
  expiresIn?: number | null;
  /** On failure: what the token function threw, or the server's `error` reply as a FastWSError. */
  error?: unknown;
  /** On failure: ms until the next try, or null when it would come after `exp` (the server
   *  will close 4501 "token expired" and the client reconnects with a new token). */
  retryIn?: number | null;
}

export interface ClosedInfo {
  code: number;
  reason: string;
  fromServer: boolean;
}

export interface EventMap {
  state: State;
  connected: { reconnect: boolean; reconnects: number };
  disconnect: DisconnectInfo;
  /** `offline`: the browser is offline; the attempt waits for `online` (at most `delay`). */
  reconnecting: { attempt: number; delay: number; offline: boolean };
  subscribed: SubscribedInfo;
  unsubscribed: { channel: string };
  join: PresencePush;
  leave: PresencePush;
  error: FastWSError | Error;
  closed: ClosedInfo;
  message: Record<string, unknown>;
  online: NetworkInfo;
  offline: NetworkInfo;
  visible: NetworkInfo;
  refresh: RefreshInfo;
  /** The client moved to another transport (protocol §10). */
  transport: TransportChange;
  /** An outbox publication was answered (also one an earlier page left in IndexedDB). */
  published: { msg: Record<string, unknown>; reply: Record<string, unknown> };
}

export type TokenSource = string | null | (() => string | null | Promise<string | null>);

/** How the client talks to the server (protocol §10). */
export type Transport = "websocket" | "sse" | "poll";

/** A transport change: `from` could not open, `to` is tried next (or WebSocket again). */
export interface TransportChange {
  from: Transport;
  to: Transport;
}

/** `ws(s)://host[:port]/…` → `http(s)://host[:port]` (where /sse, /poll, /call live). */
export declare function httpBase(url: string): string;
/** The cursor of `{name: [offset, epoch(, channel)] | null}` positions (protocol §10). */
export declare function encodeCursor(positions: Record<string, [number, string] | [number, string, string] | null>): string;

export interface FastWSOptions {
  /** Sent as `?token=` on every connection attempt; a function is called before each attempt,
   *  and also shortly before its JWT's `exp` to refresh the live connection (`tokenRefresh`). */
  token?: TokenSource;
  /** With a token function and a JWT carrying `exp`: send a new token in an `auth` request
   *  before `exp`, keeping the connection (default true). */
  tokenRefresh?: boolean;
  /** How long (ms) before `exp` to refresh, at most a fifth of the time left, plus a random
   *  jitter of up to a tenth of it, 60 s at most (default 10000). */
  tokenRefreshMargin?: number;
  /** Request timeout in ms (default 10000). */
  timeout?: number;
  /** Backoff base in ms (default 500): after the n-th failed attempt wait U[0, min(maxDelay, minDelay·2^n)]. */
  minDelay?: number;
  /** Backoff cap in ms (default 20000). */
  maxDelay?: number;
  /** Silence (ms) before an application ping is sent (default 25000, 0 = never). */
  pingInterval?: number;
  /** Time (ms) to wait for that pong before dropping the connection (default 10000). */
  pongTimeout?: number;
  /** A connection up this long (ms) resets the failed-attempt counter (default 5000). */
  stableAfter?: number;
  /** Per-subscription cap of remembered (channel → offset) pairs for de-duplication (default 10000). */
  dedupeLimit?: number;
  /** WebSocket implementation (default globalThis.WebSocket). */
  WebSocket?: { new (url: string): WebSocket };
  /** Transports in the order tried (default `["websocket", "sse", "poll"]`): after two
   *  attempts in a row fail before opening (or when the browser lacks one) the next is used;
   *  WebSocket is tried again every `retryWebSocketAfter` ms. */
  transports?: Transport[];
  /** EventSource implementation (default globalThis.EventSource). */
  EventSource?: { new (url: string): EventSource };
  /** fetch implementation for `/call` and `/poll` (default globalThis.fetch). */
  fetch?: typeof fetch;
  /** ms on a fallback transport before a WebSocket is tried again (default 300000). */
  retryWebSocketAfter?: number;
  /** Seconds a long-poll waits on the server (1–60, default 25). */
  pollTimeout?: number;
  /** Random source in [0, 1) (default Math.random). */
  random?: () => number;
  /** Where unsent publications wait (protocol §13): "memory" (default) or "indexeddb"
   *  (kept across page reloads, per origin and url). */
  outbox?: "memory" | "indexeddb";
  /** Publications waiting at most (default 1000); one more is rejected (kind "outbox"). */
  outboxLimit?: number;
  /** IndexedDB implementation (default globalThis.indexedDB). */
  indexedDB?: IDBFactory | null;
}

export interface PublishOptions {
  /** To current subscribers only: no history, no offset (protocol §13). */
  ephemeral?: boolean;
  /** false: this client does not receive its own publication. */
  echo?: boolean;
  /** Made at the call when not given: a retried publication is published once. */
  idempotencyKey?: string;
}

export interface SubscribeOptions {
  /** Start from this position (the server replays what came after it). */
  since?: StreamPosition;
  /** Without a position: the newest `last` (1–100) publications first (protocol §13). */
  last?: number;
  onSubscribed?: (info: SubscribedInfo) => void;
  onError?: (err: FastWSError) => void;
}

export declare class Subscription<T = unknown> {
  readonly channel: string;
  /** Resolves on the first `subscribed` reply; rejects on an `error` reply or close. */
  readonly ready: Promise<SubscribedReply>;
  active: boolean;
  unsubscribe(): void;
}

export declare class FastWSError extends Error {
  /** The server's error code (400, 401, 403, 404, 409, 413, 429, 500), the close code, or 0. */
  code: number;
  kind: "server" | "timeout" | "disconnected" | "closed" | "outbox";
  reply: Record<string, unknown> | null;
  channel?: string;
  constructor(message: string, init?: { code?: number; kind?: FastWSError["kind"]; reply?: Record<string, unknown> | null });
}

export declare class FastWS {
  constructor(url: string, options?: FastWSOptions);
  readonly url: string;
  /** The options in effect (defaults filled in); may be changed on a live client. */
  options: Required<Omit<FastWSOptions, "token" | "WebSocket">> & Pick<FastWSOptions, "token" | "WebSocket">;
  readonly state: State;
  /** The transport in use (or being tried); null before the first attempt. */
  readonly transport: Transport | null;
  /** Successful reconnects so far. */
  readonly reconnects: number;
  /** Tokens replaced on a live connection by the token refresh. */
  readonly tokenRefreshes: number;

  on<K extends keyof EventMap>(event: K, fn: (arg: EventMap[K]) => void): () => void;
  off<K extends keyof EventMap>(event: K, fn: (arg: EventMap[K]) => void): void;

  subscribe<T = unknown>(channel: string, onEvent?: (e: FastWSEvent<T>, meta: EventMeta) => void, options?: SubscribeOptions): Subscription<T>;
  unsubscribe(channel: string): void;
  subscriptions(): string[];

  /** Through the offline outbox: waits while disconnected, sent in order once connected. */
  publish(channel: string, data: unknown, options?: PublishOptions): Promise<PublishedReply>;
  /** Publications waiting for their reply (queued or sent). */
  readonly outboxSize: number;
  history<T = unknown>(channel: string, options?: number | { limit?: number; since?: StreamPosition }): Promise<HistoryReply<T>>;
  presence(channel: string): Promise<PresenceReply>;
  /** Authenticate the live connection with `token`, also used for every later reconnect
   *  (a token function given before is no longer called). */
  auth(token: string): Promise<AuthedReply>;
  ping(): Promise<{ id: number; type: "pong" }>;
  /** Try to connect now when disconnected (still honours a server's after_ms). */
  reconnectNow(): void;
  close(code?: number, reason?: string): void;
}

/** Redis PSUBSCRIBE glob matching: `*`, `?`, `[abc]`, `[^a]`, `[a-z]`, `\x`. */
export declare function globMatch(pattern: string, str: string): boolean;
/** True when a name holds `*`, `?`, `[` or `\`. */
export declare function isPattern(name: string): boolean;
/** The name the server uses: `wallet:` names (and patterns) are lower-cased. */
export declare function normalizeChannel(name: string): string;
/** Whether a client should reconnect after a close with this code (every code but 4500–4999). */
export declare function shouldReconnect(code: number): boolean;
/** The claims of a JWT, decoded without verifying it; null when `token` is not a JWT. */
export declare function tokenClaims(token: string): Record<string, unknown> | null;
/** Milliseconds until a JWT's `exp` by this clock, checked against `iat`; null without `exp`. */
export declare function tokenExpiresIn(token: string, now?: number): number | null;
/** Delay in ms before refreshing a token that expires in `remaining` ms (margin and jitter). */
export declare function refreshDelay(remaining: number, options?: { margin?: number; random?: () => number }): number;
/** Full-jitter delay in ms after the n-th failed attempt in a row. */
export declare function backoffDelay(n: number, options?: { minDelay?: number; maxDelay?: number; random?: () => number }): number;

export default FastWS;
