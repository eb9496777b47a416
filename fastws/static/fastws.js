// fastws browser client — an ES module, no build step, no dependencies.
//
//   import { FastWS } from "/fastws.js";
//   const c = new FastWS("ws://host/ws", { token });
//   const sub = c.subscribe("market:0x*", (e, meta) => console.log(e.channel, e.data, e.offset,
//                                                                 meta.recovered));
//   c.on("state", s => ...);            // "connecting" | "connected" | "disconnected" | "closed"
//   await c.publish("chat:room", {text: "hi"});
//   sub.unsubscribe(); c.close();
//
// A token function whose JWT has `exp` is called again shortly before it, and the new
// token goes to the server in an `auth` request on the live connection (no reconnect).
//
// Where a WebSocket cannot open (a proxy strips Upgrade, or WebSocket is missing) it moves
// to Server-Sent Events plus HTTP calls, then to long-poll; `c.transport` names the one in
// use ("websocket" | "sse" | "poll"); the API, events and recovery are the same.
//
// Offline outbox (protocol §13): `publish()` while not connected queues the publication
// (`{outbox: "indexeddb"}` keeps the queue across page reloads) and sends it, in order,
// with an idempotency key made at the call, once connected; at most 1,000 wait.
//
// Protocol: docs/protocol.md, sections 4, 6, 10 and 13.

const DEFAULTS = {
  token: null,            // string, or () => string | Promise<string>, read before each attempt
  timeout: 10000,         // ms before a request's promise rejects
  minDelay: 500,          // backoff base (ms): attempt n waits U[0, min(maxDelay, minDelay * 2^n)]
  maxDelay: 20000,        // backoff cap (ms)
  pingInterval: 25000,    // ms of silence before an application ping (0 = never)
  pongTimeout: 10000,     // ms to wait for that pong before dropping the connection
  stableAfter: 5000,      // a connection up this long resets the failed-attempt counter
  dedupeLimit: 10000,     // (channel → last offset) entries kept per subscription
  WebSocket: null,        // WebSocket implementation (default: globalThis.WebSocket)
  transports: ["websocket", "sse", "poll"], // tried in this order (protocol §10)
  EventSource: null,      // EventSource implementation (default: globalThis.EventSource)
  fetch: null,            // fetch implementation (default: globalThis.fetch)
  retryWebSocketAfter: 300000, // ms on a fallback transport before WebSocket is tried again
  pollTimeout: 25,        // seconds a long-poll waits on the server
  random: Math.random,    // injectable for tests
  tokenRefresh: true,     // a token function's JWT is refreshed before its exp, live
  tokenRefreshMargin: 10000, // ms before exp (at most a fifth of the time left)
  outbox: "memory",       // "memory" | "indexeddb": where unsent publications wait (§13)
  outboxLimit: 1000,      // publications waiting at most; one more is rejected
  indexedDB: null,        // IndexedDB implementation (default: globalThis.indexedDB)
};

const REFRESH_SPREAD_CAP = 60000; // ms: the most a refresh is moved earlier by jitter

// ---------------------------------------------------------------------------
// Redis glob matching (PSUBSCRIBE semantics, a port of Redis' stringmatchlen):
// `*` any run (including ':'), `?` one char, `[abc]`, `[^a]`, `[a-z]`, `\x` literal.

/** True when a subscription name is a pattern (holds `*`, `?`, `[` or `\`). */
export function isPattern(name) {
  return /[*?[\\]/.test(name);
}

/** Redis glob match of `str` against `pattern`. */
export function globMatch(pattern, str) {
  return matchAt(pattern, 0, str, 0, { skip: false }, 0);
}

function matchAt(p, pi, s, si, state, nesting) {
  if (nesting > 1000) return false;
  const plen = p.length;
  const slen = s.length;
  while (pi < plen && si < slen) {
    const pc = p[pi];
    if (pc === "*") {
      while (pi + 1 < plen && p[pi + 1] === "*") pi++;
      if (pi + 1 === plen) return true;
      while (si < slen) {
        if (matchAt(p, pi + 1, s, si, state, nesting + 1)) return true;
        if (state.skip) return false;
        si++;
      }
      state.skip = true;
      return false;
    } else if (pc === "?") {
      si++;
    } else if (pc === "[") {
      pi++;
      const not = p[pi] === "^";
      if (not) pi++;
      let match = false;
      const c = s.charCodeAt(si);
      for (;;) {
        if (p[pi] === "\\" && plen - pi >= 2) {
          pi++;
          if (p.charCodeAt(pi) === c) match = true;
        } else if (p[pi] === "]") {
          break;
        } else if (pi >= plen) {
          pi--; // unterminated class: the pattern ends here
          break;
        } else if (plen - pi >= 3 && p[pi + 1] === "-") {
          let start = p.charCodeAt(pi);
          let end = p.charCodeAt(pi + 2);
          if (start > end) [start, end] = [end, start];
          pi += 2;
          if (c >= start && c <= end) match = true;
        } else if (p.charCodeAt(pi) === c) {
          match = true;
        }
        pi++;
      }
      if (not) match = !match;
      if (!match) return false;
      si++;
    } else {
      if (pc === "\\" && plen - pi >= 2) pi++;
      if (p[pi] !== s[si]) return false;
      si++;
    }
    pi++;
    if (si === slen) {
      while (pi < plen && p[pi] === "*") pi++;
      break;
    }
  }
  return pi >= plen && si === slen;
}

/** The name the server uses for a channel or pattern: `wallet:` names are 0x addresses,
 *  lower-cased by the server, patterns included (protocol §5). */
export function normalizeChannel(name) {
  return name.startsWith("wallet:") ? name.toLowerCase() : name;
}

/** Whether a client should reconnect after a close with `code`: every code but 4500–4999. */
export function shouldReconnect(code) {
  return !(code >= 4500 && code <= 4999);
}

/** Full-jitter backoff: delay (ms) after the n-th failed attempt in a row (n = 0, 1, …). */
export function backoffDelay(n, { minDelay = 500, maxDelay = 20000, random = Math.random } = {}) {
  const cap = Math.min(maxDelay, minDelay * Math.pow(2, Math.min(n, 30)));
  return random() * cap;
}

/** The claims of a JWT, decoded *without* verifying it (only to time its refresh; the
 *  server verifies tokens), or null when `token` is not a JWT (e.g. an opaque token). */
export function tokenClaims(token) {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    let b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    b64 += "=".repeat((4 - (b64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
    return claims && typeof claims === "object" && !Array.isArray(claims) ? claims : null;
  } catch {
    return null;
  }
}

function claimNumber(v) {
  return typeof v === "number" && Number.isFinite(v) ? v : null;
}

/** Milliseconds until a JWT expires by its `exp` claim, or null without one. The client's
 *  clock (`Date.now()`, or `now`) is used, checked against `iat` when the token has one:
 *  a token issued "in the future" (this clock is behind the issuer's) or already past
 *  `exp` (this clock is ahead: the server has just accepted it) is taken to have its
 *  whole lifetime, `exp - iat`, left. A fast clock otherwise only makes the refresh
 *  early. Null also when the token has expired by every measure. */
export function tokenExpiresIn(token, now = Date.now()) {
  const claims = tokenClaims(token);
  if (!claims) return null;
  const exp = claimNumber(claims.exp);
  if (exp === null) return null;
  let left = exp * 1000 - now;
  const iat = claimNumber(claims.iat);
  if (iat !== null && exp > iat) {
    const lifetime = (exp - iat) * 1000;
    if (left > lifetime || left <= 0) left = lifetime; // the clocks disagree: the token's span
  }
  return left > 0 ? left : null;
}

/** Delay (ms) before refreshing a token that expires in `remaining` ms: `min(margin,
 *  remaining / 5)` before expiry, moved earlier by a random jitter of up to
 *  `min(remaining / 10, 60 s)` so that clients whose tokens expire together spread out. */
export function refreshDelay(remaining, { margin = 10000, random = Math.random } = {}) {
  if (!(remaining > 0)) return 0;
  const lead = Math.min(margin, remaining / 5);
  const jitter = random() * Math.min(remaining / 10, REFRESH_SPREAD_CAP);
  return Math.max(0, remaining - lead - jitter);
}

// ---------------------------------------------------------------------------

/** Error of a request: a server `error` reply (kind "server"), a timeout, or a lost connection. */
export class FastWSError extends Error {
  constructor(message, { code = 0, kind = "server", reply = null } = {}) {
    super(message);
    this.name = "FastWSError";
    this.code = code;
    this.kind = kind;
    this.reply = reply;
  }
}


class Subscription {
  constructor(client, record, handler) {
    this._client = client;
    this._record = record;
    this._handler = handler;
    this.channel = record.channel;
    this.ready = record.ready;
    this.active = true;
  }

  /** Stop delivering to this handle; the server subscription ends with its last handle. */
  unsubscribe() {
    if (!this.active) return;
    this.active = false;
    this._client._dropHandle(this._record, this);
  }
}

export class FastWS {
  constructor(url, options = {}) {
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    this.state = "disconnected";
    this._listeners = new Map();
    this._subs = new Map();       // channel/pattern → record
    this._pending = new Map();    // id → {resolve, reject, timer, msg, sent}
    this._subIds = new Map();     // id of an in-flight subscribe → record
    this._outbox = [];            // requests made while not connected
    this._nextId = 1;
    this._ws = null;
    this._failures = 0;           // failed attempts in a row
    this._notBefore = 0;          // no attempt before this time (server's after_ms)
    this._timer = null;
    this._pingTimer = null;
    this._pongTimer = null;
    this._lastRecv = 0;
    this._openedAt = 0;
    this._disconnectPush = null;
    this._closed = false;
    this._lastToken = null;       // the token the current/last attempt used
    this._expiredToken = null;    // the last token the server closed as expired
    this._refreshTimer = null;    // the next live token refresh (token function + JWT exp)
    this._refreshExpires = 0;     // when the token in force expires (Date.now() ms)
    this._refreshFailures = 0;    // failed refreshes in a row for that token
    this.reconnects = 0;
    this.tokenRefreshes = 0;      // tokens replaced on a live connection
    this.transport = null;        // "websocket" | "sse" | "poll": the one in use (or tried)
    this._tIndex = 0;             // index in the available transports
    this._tFails = 0;             // attempts of that transport failed before open, in a row
    this._wsRetryTimer = null;    // on a fallback: the next WebSocket probe
    this._everOpened = new Set(); // transports that opened at least once
    this._pubs = new Outbox(this);  // publications not yet answered (protocol §13)
    this._installWindowHooks();
    // Connect at once, but let the caller attach listeners first (same tick).
    queueMicrotask(() => this._connect());
  }

  // ----- events ------------------------------------------------------------

  /** Listen to "state", "connected", "disconnect", "reconnecting", "subscribed",
   *  "unsubscribed", "join", "leave", "error", "closed", "message", "online", "offline",
   *  "visible", "refresh", "transport".
   *  Returns an off() function. */
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    const set = this._listeners.get(event);
    if (set) set.delete(fn);
  }

  _emit(event, arg) {
    const set = this._listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(arg);
      } catch (err) {
        reportError(err);
      }
    }
  }

  _setState(s) {
    if (this.state === s) return;
    this.state = s;
    this._emit("state", s);
  }

  // ----- public API --------------------------------------------------------

  /** Subscribe to a channel or Redis glob pattern. `onEvent(e)` gets every matching event. */
  subscribe(channel, onEvent, opts = {}) {
    if (typeof channel !== "string" || channel === "") throw new TypeError("channel must be a non-empty string");
    if (this._closed) throw new FastWSError("client is closed", { kind: "closed" });
    const key = normalizeChannel(channel);
    let record = this._subs.get(key);
    if (!record) {
      record = {
        channel: key,
        pattern: isPattern(key),
        handles: new Set(),
        last: opts.since ? { offset: opts.since.offset, epoch: opts.since.epoch, channel: opts.since.channel } : null,
        lastN: opts.last || 0, // `last` N: the newest N publications first (no position yet)
        seen: new Map(),
        status: "new",       // new | pending | subscribed
        replayed: 0,
        everSubscribed: false,
        ready: null,
        _resolve: null,
        _reject: null,
      };
      record.ready = new Promise((resolve, reject) => {
        record._resolve = resolve;
        record._reject = reject;
      });
      record.ready.catch(() => {}); // a failure is also reported through "error"
      this._subs.set(key, record);
      if (this.state === "connected") this._sendSubscribe(record);
    }
    const handle = new Subscription(this, record, { onEvent, ...opts });
    record.handles.add(handle);
    return handle;
  }

  /** Drop every local subscription on a channel or pattern. */
  unsubscribe(channel) {
    const record = this._subs.get(normalizeChannel(channel));
    if (!record) return;
    for (const h of [...record.handles]) h.unsubscribe();
  }

  /** Publish through the connection (allowed only where the namespace lets clients publish).
   *  Resolves with the `published` reply ({offset, epoch}). While not connected the
   *  publication waits in the outbox and goes out, in order, once connected, with an
   *  idempotency key made here (published once even if a reply was lost). Options:
   *  `{ephemeral: true}` (live subscribers only), `{echo: false}` (not to this client),
   *  `{idempotencyKey}`. Rejects (kind "outbox") when `outboxLimit` already wait. */
  publish(channel, data, opts = {}) {
    if (this._closed) return Promise.reject(new FastWSError("client is closed", { kind: "closed" }));
    const msg = { type: "publish", channel: normalizeChannel(channel), data,
      idempotency_key: opts.idempotencyKey || newKey() };
    if (opts.ephemeral) msg.ephemeral = true;
    if (opts.echo === false) msg.echo = false;
    return this._pubs.add(msg);
  }

  /** Publications waiting for their reply (queued or sent). */
  get outboxSize() {
    return this._pubs.size;
  }

  /** Channel history: `history(channel, {limit, since})` → reply {publications, offset, epoch}. */
  history(channel, opts = {}) {
    const msg = { type: "history", channel: normalizeChannel(channel) };
    if (typeof opts === "number") opts = { limit: opts };
    if (opts.limit != null) msg.limit = opts.limit;
    if (opts.since) msg.since = { offset: opts.since.offset, epoch: opts.since.epoch };
    return this._request(msg);
  }

  /** Presence of a channel → reply {clients: [{client, user}]}. */
  presence(channel) {
    return this._request({ type: "presence", channel: normalizeChannel(channel) });
  }

  /** Authenticate the live connection (also used for every later reconnect, so a token
   *  function given to the constructor is no longer called). */
  auth(token) {
    if (typeof token !== "string" || token === "") throw new TypeError("token must be a non-empty string");
    this.options.token = token;
    this._disarmRefresh();
    return this._request({ type: "auth", token });
  }

  ping() {
    return this._request({ type: "ping" });
  }

  /** Close for good: no reconnect; pending requests reject. */
  close(code = 1000, reason = "client closed") {
    if (this._closed) return;
    this._terminate(code, reason, false);
  }

  subscriptions() {
    return [...this._subs.keys()];
  }

  // ----- requests ----------------------------------------------------------

  _request(msg, timeout = this.options.timeout) {
    if (this._closed) return Promise.reject(new FastWSError("client is closed", { kind: "closed" }));
    return new Promise((resolve, reject) => {
      const id = this._nextId++;
      const entry = { id, msg: { id, ...msg }, resolve, reject, timer: null, sent: false };
      entry.timer = setTimeout(() => {
        this._pending.delete(id);
        const i = this._outbox.indexOf(entry);
        if (i >= 0) this._outbox.splice(i, 1);
        reject(new FastWSError(`${msg.type} timed out after ${timeout} ms`, { kind: "timeout", code: 0 }));
      }, timeout);
      this._pending.set(id, entry);
      if (this.state === "connected") this._sendEntry(entry);
      else this._outbox.push(entry);
    });
  }

  _sendEntry(entry) {
    entry.sent = true;
    this._send(entry.msg);
  }

  _send(obj) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(obj));
    return true;
  }

  _sendSubscribe(record) {
    const id = this._nextId++;
    const msg = { id, type: "subscribe", channel: record.channel };
    if (record.last && record.last.offset != null && record.last.epoch != null) {
      msg.since = { offset: record.last.offset, epoch: record.last.epoch };
      // a pattern's position is its last event, looked up in the namespace's log
      if (record.pattern && record.last.channel) msg.since.channel = record.last.channel;
    } else {
      msg.positioned = true; // the reply says where the stream is: recover from there
      if (record.lastN) msg.last = record.lastN;
    }
    record.status = "pending";
    record.replayed = 0;
    record.recovering = !!msg.since;
    this._subIds.set(id, record);
    this._send(msg);
  }

  _dropHandle(record, handle) {
    record.handles.delete(handle);
    if (record.handles.size > 0 || this._subs.get(record.channel) !== record) return;
    this._subs.delete(record.channel);
    for (const [id, r] of this._subIds) if (r === record) this._subIds.delete(id);
    if (record.status !== "new" && this.state === "connected") {
      this._send({ id: this._nextId++, type: "unsubscribe", channel: record.channel });
    }
    record.status = "gone";
    this._emit("unsubscribed", { channel: record.channel });
  }

  // ----- connection --------------------------------------------------------

  async _connect() {
    if (this._closed || this._ws) return;
    clearTimeout(this._timer);
    this._timer = null;
    this._setState("connecting");
    let url = this.url;
    let token = this.options.token;
    try {
      if (typeof token === "function") token = await token();
    } catch (err) {
      this._emit("error", err);
      token = null;
    }
    if (this._closed || this.state !== "connecting") return;
    this._lastToken = token || null;
    const transports = this._availableTransports();
    if (this._tIndex >= transports.length) this._tIndex = Math.max(0, transports.length - 1);
    this.transport = transports[this._tIndex] || "websocket";
    if (token) url += (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
    const WS = this.options.WebSocket || globalThis.WebSocket;
    let ws;
    try {
      if (this.transport === "websocket") ws = new WS(url);
      else {
        const Kind = this.transport === "sse" ? SseSocket : PollSocket;
        ws = new Kind(httpBase(this.url), token || null, () => this._positions(), this.options);
      }
    } catch (err) {
      this._emit("error", err);
      this._failures++;
      this._setState("disconnected");
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    this._openedAt = 0;
    this._disconnectPush = null;
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (ev) => this._onMessage(ws, ev);
    ws.onclose = (ev) => this._onClose(ws, ev.code, ev.reason, ev.wasClean);
    ws.onerror = () => {}; // a close event always follows
  }

  _onOpen(ws) {
    if (ws !== this._ws) return;
    this._openedAt = Date.now();
    this._lastRecv = Date.now();
    this._everOpened.add(this.transport);
    const reconnect = this._everConnected === true;
    this._everConnected = true;
    if (reconnect) this.reconnects++;
    this._setState("connected");
    this._emit("connected", { reconnect, reconnects: this.reconnects });
    if (this.state !== "connected" || ws !== this._ws) return; // a listener closed us
    for (const record of this._subs.values()) this._sendSubscribe(record);
    const outbox = this._outbox;
    this._outbox = [];
    for (const entry of outbox) if (this._pending.has(entry.id)) this._sendEntry(entry);
    this._pubs.flush();
    this._armPing();
    this._refreshFailures = 0;
    this._armRefresh(ws);
  }

  _onMessage(ws, ev) {
    if (ws !== this._ws) return;
    this._lastRecv = Date.now();
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (!msg || typeof msg !== "object") return;
    const id = msg.id;
    if (id != null) {
      const record = this._subIds.get(id);
      if (record) {
        this._subIds.delete(id);
        this._onSubscribeReply(record, msg);
        return;
      }
      if (this._pubs.onReply(id, msg)) return;
      const entry = this._pending.get(id);
      if (entry) {
        this._pending.delete(id);
        clearTimeout(entry.timer);
        if (msg.type === "error") {
          entry.reject(new FastWSError(msg.message || `error ${msg.code}`, { code: msg.code, reply: msg }));
        } else {
          entry.resolve(msg);
        }
        return;
      }
      if (msg.type === "error") this._emit("error", new FastWSError(msg.message || "error", { code: msg.code, reply: msg }));
      return;
    }
    switch (msg.type) {
      case "event":
        this._route(msg);
        break;
      case "join":
      case "leave":
        this._emit(msg.type, msg);
        break;
      case "disconnect":
        this._disconnectPush = msg;
        this._emit("disconnect", { ...msg, pushed: true });
        break;
      case "error":
        this._emit("error", new FastWSError(msg.message || "error", { code: msg.code, reply: msg }));
        break;
      default:
        this._emit("message", msg);
    }
  }

  _onSubscribeReply(record, msg) {
    if (this._subs.get(record.channel) !== record) return; // unsubscribed meanwhile
    const resubscribe = record.everSubscribed;
    if (msg.type === "error") {
      // 409: the server still has it (e.g. subscribed twice in one connection): treat as live.
      if (msg.code === 409) {
        record.status = "subscribed";
        record.everSubscribed = true;
        record._resolve(msg);
        return;
      }
      // Transient (rate limited, server trouble): ask again a little later on this connection.
      if (msg.code === 429 || msg.code >= 500) {
        record.status = "new";
        const ws = this._ws;
        setTimeout(() => {
          if (ws === this._ws && this.state === "connected" && record.status === "new" &&
              this._subs.get(record.channel) === record) this._sendSubscribe(record);
        }, 1000 + this.options.random() * 4000);
        this._emit("error", new FastWSError(msg.message || `subscribe failed (${msg.code})`, { code: msg.code, reply: msg }));
        return;
      }
      const err = new FastWSError(msg.message || `subscribe failed (${msg.code})`, { code: msg.code, reply: msg });
      err.channel = record.channel;
      this._subs.delete(record.channel);
      record.status = "gone";
      record._reject(err);
      for (const h of record.handles) {
        h.active = false;
        if (h._handler.onError) h._handler.onError(err);
      }
      this._emit("error", err);
      return;
    }
    record.status = "subscribed";
    record.everSubscribed = true;
    // where the stream was (a pattern's: in the namespace log), unless events since say more
    if (typeof msg.offset === "number" && msg.recovered !== true && (!record.last ||
        (record.pattern ? !record.last.channel : record.last.epoch !== msg.epoch))) {
      record.last = { offset: msg.offset, epoch: msg.epoch };
    }
    const info = { channel: record.channel, recovered: msg.recovered, replayed: record.replayed, resubscribe };
    record.recovering = false;
    record._resolve(msg);
    for (const h of record.handles) if (h._handler.onSubscribed) h._handler.onSubscribed(info);
    this._emit("subscribed", info);
  }

  _route(e) {
    const channel = e.channel;
    if (typeof channel !== "string") return;
    const hasPos = typeof e.offset === "number" && e.epoch != null && e.epoch !== "";
    for (const record of this._subs.values()) {
      if (record.pattern ? !globMatch(record.channel, channel) : record.channel !== channel) continue;
      if (hasPos) {
        const seen = record.seen.get(channel);
        if (seen && seen.epoch === e.epoch && e.offset <= seen.offset) continue; // duplicate
        record.seen.delete(channel);
        record.seen.set(channel, { offset: e.offset, epoch: e.epoch });
        if (record.seen.size > this.options.dedupeLimit) record.seen.delete(record.seen.keys().next().value);
        record.last = { offset: e.offset, epoch: e.epoch, channel }; // a pattern's names its channel
      }
      // Between a subscribe carrying `since` and its reply come the missed events.
      const recovered = record.status === "pending" && record.recovering === true;
      if (record.status === "pending") record.replayed++;
      const meta = { subscription: record.channel, recovered };
      for (const h of [...record.handles]) {
        if (!h.active || !h._handler.onEvent) continue;
        try {
          h._handler.onEvent(e, meta);
        } catch (err) {
          reportError(err);
        }
      }
    }
  }

  _onClose(ws, code, reason, wasClean) {
    if (ws !== this._ws) return;
    this._ws = null;
    this._disarmPing();
    this._disarmRefresh();
    const push = this._disconnectPush;
    this._disconnectPush = null;
    const opened = this._openedAt > 0;
    if (opened && Date.now() - this._openedAt >= this.options.stableAfter) this._failures = 0;
    else if (!opened) {
      this._failures++;
      this._transportFailed();
    }
    if (opened) this._tFails = 0;
    // Requests in flight are lost with the connection; queued ones wait for the next.
    for (const [id, entry] of this._pending) {
      if (!entry.sent) continue;
      this._pending.delete(id);
      clearTimeout(entry.timer);
      entry.reject(new FastWSError(`connection lost (${code})`, { kind: "disconnected", code: 0 }));
    }
    this._subIds.clear();
    this._pubs.lost(); // sent publications wait for the next connection (same keys)
    for (const record of this._subs.values()) if (record.status === "pending") record.status = "new";
    const info = {
      code,
      reason: reason || (push && push.reason) || "",
      wasClean: !!wasClean,
      reconnect: true,
      after_ms: push && typeof push.after_ms === "number" ? push.after_ms : 0,
    };
    let fatal = !shouldReconnect(code) || (push && push.reconnect === false);
    // A token that expired is refreshed: a token function gives the next attempt a new
    // one (the same token given back again stops the client, like any rejected token).
    if (code === 4501 && info.reason === "token expired" && typeof this.options.token === "function" &&
        this._lastToken !== this._expiredToken) {
      this._expiredToken = this._lastToken;
      fatal = false;
      info.after_ms = 0;
      info.refresh = true;
    }
    if (fatal) {
      info.reconnect = false;
      this._emit("disconnect", info);
      const err = new FastWSError(`connection closed for good: ${code} ${info.reason}`.trim(), { code, kind: "closed" });
      this._emit("error", err);
      this._terminate(code, info.reason, true);
      return;
    }
    if (info.after_ms > 0) this._notBefore = Math.max(this._notBefore, Date.now() + info.after_ms);
    this._setState("disconnected");
    this._emit("disconnect", info);
    this._scheduleReconnect();
  }

  _scheduleReconnect(now = false) {
    if (this._closed || this._ws) return;
    clearTimeout(this._timer);
    let delay = now ? 0 : backoffDelay(this._failures, this.options);
    delay = Math.max(delay, this._notBefore - Date.now(), 0);
    const offline = typeof navigator !== "undefined" && navigator.onLine === false;
    // Offline: no point in trying; the "online" event tries at once. Should it never
    // come (a wrong navigator.onLine), an attempt is still made after maxDelay.
    if (offline) delay = Math.max(delay, this.options.maxDelay);
    this._emit("reconnecting", { attempt: this._failures, delay, offline });
    this._timer = setTimeout(() => {
      this._timer = null;
      this._connect();
    }, delay);
  }

  /** Try now (if disconnected), honouring the server's after_ms. */
  reconnectNow() {
    if (this._closed || this._ws || this.state === "connecting") return;
    this._scheduleReconnect(true);
  }

  _terminate(code, reason, fromServer) {
    this._closed = true;
    clearTimeout(this._timer);
    this._timer = null;
    clearTimeout(this._wsRetryTimer);
    this._wsRetryTimer = null;
    this._disarmPing();
    this._disarmRefresh();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      try {
        ws.close(code >= 4000 && code <= 4999 ? code : 1000, reason);
      } catch {
        try { ws.close(); } catch { /* ignore */ }
      }
    }
    const err = new FastWSError(`client closed (${code}${reason ? " " + reason : ""})`, { code: fromServer ? code : 0, kind: "closed" });
    for (const entry of this._pending.values()) {
      clearTimeout(entry.timer);
      entry.reject(err);
    }
    this._pending.clear();
    this._outbox = [];
    this._pubs.fail(err);
    for (const record of this._subs.values()) if (!record.everSubscribed) record._reject(err);
    this._removeWindowHooks();
    this._setState("closed");
    this._emit("closed", { code, reason, fromServer });
  }

  // ----- transports --------------------------------------------------------

  /** The transports of `options.transports` this environment has, in order. */
  _availableTransports() {
    const o = this.options;
    const has = {
      websocket: !!(o.WebSocket || globalThis.WebSocket),
      sse: !!(o.EventSource || globalThis.EventSource) && !!(o.fetch || globalThis.fetch),
      poll: !!(o.fetch || globalThis.fetch),
    };
    const list = (o.transports || DEFAULTS.transports).filter((t) => has[t]);
    return list.length ? list : ["websocket"];
  }

  /** An attempt failed before open: after two in a row, move to the next transport,
   *  unless this one has opened before (then the server is down, not the transport). */
  _transportFailed() {
    const list = this._availableTransports();
    if (this._everOpened.has(list[this._tIndex])) return;
    this._tFails++;
    if (this._tFails < 2 || this._tIndex >= list.length - 1) return;
    const from = list[this._tIndex];
    this._tIndex++;
    this._tFails = 0;
    this._failures = 0;
    this._emit("transport", { from, to: list[this._tIndex] });
    this._armWebSocketRetry();
  }

  /** On a fallback, try a WebSocket again every `retryWebSocketAfter` ms; when one opens,
   *  switch back to it (positions carry over, as on any reconnect). */
  _armWebSocketRetry() {
    clearTimeout(this._wsRetryTimer);
    this._wsRetryTimer = null;
    const list = this._availableTransports();
    if (this._closed || list[0] !== "websocket" || this._tIndex === 0) return;
    this._wsRetryTimer = setTimeout(() => {
      this._wsRetryTimer = null;
      if (this._closed || this._tIndex === 0) return;
      const WS = this.options.WebSocket || globalThis.WebSocket;
      let probe;
      try {
        probe = new WS(this.url);
      } catch {
        this._armWebSocketRetry();
        return;
      }
      probe.onopen = () => {
        try { probe.close(1000, "probe"); } catch { /* ignore */ }
        if (this._closed) return;
        const from = this.transport;
        this._tIndex = 0;
        this._tFails = 0;
        this._emit("transport", { from, to: "websocket" });
        const cur = this._ws;
        if (cur) {
          try { cur.close(1000, "switching to websocket"); } catch { /* ignore */ }
          this._onClose(cur, 1000, "switching to websocket", true);
        }
        this._scheduleReconnect(true);
      };
      probe.onerror = () => {};
      probe.onclose = () => {
        if (this._tIndex !== 0 && !this._wsRetryTimer) this._armWebSocketRetry();
      };
    }, this.options.retryWebSocketAfter);
  }

  /** Each subscription's position, for a fallback transport's cursor (protocol §10). */
  _positions() {
    const out = {};
    for (const [name, record] of this._subs) {
      const last = record.last;
      if (!last || last.offset == null || last.epoch == null) out[name] = null;
      else if (record.pattern && last.channel) out[name] = [last.offset, last.epoch, last.channel];
      else out[name] = [last.offset, last.epoch];
    }
    return out;
  }

  // ----- token refresh -----------------------------------------------------

  /** With a token function and a JWT carrying `exp`, plan its refresh on this connection. */
  _armRefresh(ws) {
    this._disarmRefresh();
    if (!this.options.tokenRefresh || typeof this.options.token !== "function") return;
    const left = tokenExpiresIn(this._lastToken);
    if (left === null) return; // no exp, or not a JWT: only reconnects ask for a token
    this._refreshExpires = Date.now() + left;
    const delay = refreshDelay(left, { margin: this.options.tokenRefreshMargin, random: this.options.random });
    this._refreshTimer = setTimeout(() => this._refresh(ws), delay);
  }

  _disarmRefresh() {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
  }

  /** Ask the token function for a new token and send it in an `auth` request; on failure
   *  retry with the reconnect backoff while the next try comes before `exp` (then the
   *  server closes 4501 "token expired" and the reconnect path gets a new token). */
  async _refresh(ws) {
    this._refreshTimer = null;
    const live = () => ws === this._ws && this.state === "connected" && typeof this.options.token === "function";
    if (!live()) return;
    const current = this._lastToken;
    const attempt = this._refreshFailures + 1;
    let token = null;
    try {
      token = await this.options.token();
      if (!live()) return;
      if (typeof token !== "string" || token === "") throw new Error("the token function gave no token");
      if (token === current) throw new Error("the token function gave back the current token");
      await this._request({ type: "auth", token });
    } catch (err) {
      if (!live() || this._refreshTimer) return;
      this._refreshFailures++;
      const delay = backoffDelay(this._refreshFailures - 1, this.options);
      const retry = Date.now() + delay < this._refreshExpires;
      this._emit("refresh", { ok: false, attempt, error: err, retryIn: retry ? delay : null });
      if (retry) this._refreshTimer = setTimeout(() => this._refresh(ws), delay);
      return;
    }
    if (ws !== this._ws) return;
    this._lastToken = token;
    this._refreshFailures = 0;
    this.tokenRefreshes++;
    this._emit("refresh", { ok: true, attempt, expiresIn: tokenExpiresIn(token) });
    if (live()) this._armRefresh(ws);
  }

  // ----- liveness ----------------------------------------------------------

  _armPing() {
    this._disarmPing();
    const every = this.options.pingInterval;
    if (!every) return;
    this._pingTimer = setInterval(() => this._probe(false), Math.max(1000, Math.floor(every / 2)));
  }

  _disarmPing() {
    clearInterval(this._pingTimer);
    clearTimeout(this._pongTimer);
    this._pingTimer = null;
    this._pongTimer = null;
  }

  /** Send an application ping when the line has been quiet; drop the connection if no answer. */
  _probe(force) {
    if (this.state !== "connected" || this._pongTimer) return;
    if (!force && Date.now() - this._lastRecv < this.options.pingInterval) return;
    const ws = this._ws;
    this._pongTimer = setTimeout(() => {
      this._pongTimer = null;
      if (ws === this._ws && Date.now() - this._lastRecv >= this.options.pongTimeout) {
        this._forceDrop(ws, 4000, "no pong");
      }
    }, this.options.pongTimeout);
    this._request({ type: "ping" }, this.options.pongTimeout + 1000).catch(() => {});
  }

  _forceDrop(ws, code, reason) {
    try { ws.close(code, reason); } catch { /* ignore */ }
    // Do not wait for a close handshake that may never come on a dead link.
    this._onClose(ws, 1006, reason, false);
  }

  // ----- browser hooks -----------------------------------------------------

  _installWindowHooks() {
    const w = typeof window !== "undefined" ? window : null;
    const d = typeof document !== "undefined" ? document : null;
    this._hooks = [];
    if (w && w.addEventListener) {
      const online = () => {
        this._failures = 0;
        this._emit("online", { state: this.state });
        if (this.state === "connected") this._probe(true);
        else this.reconnectNow();
      };
      const offline = () => {
        this._emit("offline", { state: this.state });
        this._probe(true); // a live connection answers; a dead one is dropped after pongTimeout
      };
      w.addEventListener("online", online);
      w.addEventListener("offline", offline);
      this._hooks.push([w, "online", online], [w, "offline", offline]);
    }
    if (d && d.addEventListener) {
      // Visibility-aware: a page coming back to the foreground checks its connection
      // (a quiet one gets a ping) or, when disconnected, tries at once instead of
      // waiting out a backoff that grew while it was hidden.
      const visible = () => {
        if (d.visibilityState !== "visible") return;
        this._emit("visible", { state: this.state });
        if (this.state === "connected") this._probe(false);
        else {
          this._failures = 0;
          this.reconnectNow();
        }
      };
      d.addEventListener("visibilitychange", visible);
      this._hooks.push([d, "visibilitychange", visible]);
    }
  }

  _removeWindowHooks() {
    for (const [target, name, fn] of this._hooks || []) target.removeEventListener(name, fn);
    this._hooks = [];
  }
}

// ---------------------------------------------------------------------------
// Fallback transports (protocol §10): objects with a WebSocket's interface (readyState,
// send, close, onopen/onmessage/onclose), so FastWS drives them exactly as a WebSocket.

/** `ws(s)://host[:port]/…` → `http(s)://host[:port]`. */
export function httpBase(url) {
  const u = new URL(url, typeof location !== "undefined" ? location.href : undefined);
  const scheme = u.protocol === "wss:" || u.protocol === "https:" ? "https:" : "http:";
  return `${scheme}//${u.host}`;
}

/** The cursor naming `positions` ({name: [offset, epoch(, channel)] | null}): base64url
 *  of its JSON, unpadded (the server's format, protocol §10). */
export function encodeCursor(positions) {
  const bytes = new TextEncoder().encode(JSON.stringify(positions));
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

class FallbackSocket {
  constructor(base, token, positions, options) {
    this.base = base;
    this.token = token;
    this.positions = positions;     // () => {name: position | null}: FastWS's records
    this.options = options;
    this.readyState = 0;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    this.names = [];                // the channels of the stream or poll in flight
    this.subIds = new Map();        // name → id of the client's subscribe awaiting a reply
    this.closed = false;
    this.pushed = null;             // the disconnect message, when one came
    this.refused = new Map();       // channels the server refused: name → {code, message}
    this._restartQueued = false;
    setTimeout(() => this._begin(), 0);
  }

  _fetch(...args) {
    const f = this.options.fetch || globalThis.fetch;
    return f(...args);
  }

  _query(extra) {
    const q = new URLSearchParams();
    for (const n of this.names) q.append("channel", n);
    const pos = this.positions();
    const cur = {};
    let any = false;
    for (const n of this.names) {
      cur[n] = pos[n] === undefined ? null : pos[n];
      if (cur[n] !== null) any = true;
    }
    if (any) q.set("cursor", encodeCursor(cur));
    for (const [k, v] of Object.entries(extra || {})) q.set(k, v);
    return { query: q.toString(), cursor: any };
  }

  _begin() {
    if (this.closed) return;
    this.names = Object.keys(this.positions()).filter((n) => !this.refused.has(n));
    if (this.names.length === 0) this._opened();  // nothing to stream yet: calls only
    else this._start(true);
  }

  _opened() {
    if (this.readyState !== 0 || this.closed) return;
    this.readyState = 1;
    if (this.onopen) this.onopen({});
  }

  _deliver(msg) {
    if (this.closed) return;
    if (msg && msg.type === "disconnect") this.pushed = msg;
    if (this.onmessage) this.onmessage({ data: typeof msg === "string" ? msg : JSON.stringify(msg) });
  }

  /** A reply of the server's own subscribe (ids 1…n in the order of `names`, the
   *  request's channels) → the reply to the client's subscribe. */
  _subscribeReply(msg, names) {
    const name = msg.type === "subscribed" ? msg.channel : names[msg.id - 1];
    const id = this.subIds.get(name);
    if (id === undefined) return; // a re-subscription after a restart: nothing waits for it
    this.subIds.delete(name);
    this._deliver({ ...msg, id });
  }

  send(text) {
    if (this.readyState !== 1) throw new Error("not open");
    const msg = JSON.parse(text);
    if (msg.type === "subscribe" && this.refused.has(msg.channel)) {
      const err = this.refused.get(msg.channel);
      this.refused.delete(msg.channel);
      setTimeout(() => this._deliver({ id: msg.id, type: "error", ...err }), 0);
    } else if (msg.type === "subscribe") {
      if (this.names.includes(msg.channel) && this._live) {
        this.subIds.set(msg.channel, msg.id);
        if (!this._answering) this._answerRecovered();
      } else {
        this.subIds.set(msg.channel, msg.id);
        if (!this.names.includes(msg.channel)) this.names.push(msg.channel);
        this._queueRestart();
      }
    } else if (msg.type === "unsubscribe") {
      this.subIds.delete(msg.channel);
      const i = this.names.indexOf(msg.channel);
      if (i >= 0) {
        this.names.splice(i, 1);
        this._queueRestart();
      }
    } else {
      this._call(msg);
    }
  }

  _queueRestart() {
    if (this._restartQueued) return;
    this._restartQueued = true;
    setTimeout(() => {
      this._restartQueued = false;
      if (!this.closed) this._restart();
    }, 0);
  }

  _answerRecovered() {}

  async _call(msg) {
    const headers = { "Content-Type": "application/json" };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    let reply;
    try {
      const res = await this._fetch(this.base + "/call", { method: "POST", headers, body: JSON.stringify(msg) });
      reply = await res.json();
    } catch (err) {
      reply = { id: msg.id, type: "error", code: 503, message: `call failed: ${err && err.message}` };
    }
    if (msg.type === "auth" && reply.type === "authed") {
      this.token = msg.token; // later streams and calls carry the new token
      if (this.names.length) this._queueRestart();
    }
    this._deliver(reply);
  }

  /** A stream or poll refused with HTTP `status`. Before it opened: a refused token stops
   *  the client (4501, as a WebSocket close would); a refused channel (400, 401, 403) is
   *  found by asking for each channel alone, left out, and answered with the server's
   *  error when the client subscribes to it (as over a WebSocket); anything else is
   *  retried (1006). After it opened: 4501 for a refused token, else 1006. */
  async _refusedWith(status) {
    if (status === 401 && this.token) return this._fail(4501, "invalid token");
    if (this.readyState !== 0 || ![400, 401, 403].includes(status)) {
      return this._fail(1006, status ? `refused (${status})` : "unreachable");
    }
    const headers = this.token ? { Authorization: `Bearer ${this.token}` } : {};
    let found = 0;
    for (const name of this.names) {
      try {
        const q = new URLSearchParams({ channel: name, timeout: "1" });
        const res = await this._fetch(`${this.base}/poll?${q}`, { headers });
        const body = await res.json().catch(() => ({}));
        if ([400, 401, 403].includes(res.status)) {
          this.refused.set(name, { code: res.status, message: body.message || `refused (${res.status})` });
          found++;
        }
      } catch {
        return this._fail(1006, "unreachable");
      }
    }
    if (this.closed) return;
    if (!found) return this._fail(1006, `refused (${status})`);
    this.names = this.names.filter((n) => !this.refused.has(n));
    if (this.names.length) this._start(true);
    else this._opened();
  }

  /** End as a WebSocket close would: the disconnect message's code, else 1006. */
  _fail(code, reason) {
    if (this.closed) return;
    this._stop();
    this.closed = true;
    const push = this.pushed;
    this.readyState = 3;
    const c = push ? push.code : code || 1006;
    if (this.onclose) this.onclose({ code: c, reason: push ? push.reason : reason || "", wasClean: !!push });
  }

  close() {
    if (this.closed) return;
    this._stop();
    this.closed = true;
    this.readyState = 3;
  }
}

/** Server-Sent Events for receiving, `POST /call` for requests. */
class SseSocket extends FallbackSocket {
  _start(first) {
    const ES = this.options.EventSource || globalThis.EventSource;
    const extra = this.token ? { token: this.token } : {};
    const { query } = this._query(extra);
    this._stop();
    const es = (this.es = new ES(`${this.base}/sse?${query}`));
    this._live = false;
    const names = this.names.slice();
    es.onopen = () => {
      if (es !== this.es) return;
      this._live = true;
      if (first) this._opened();
    };
    es.onmessage = (ev) => {
      if (es !== this.es) return;
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (msg.id != null && (msg.type === "subscribed" || msg.type === "error")) {
        this._subscribeReply(msg, names);
      } else this._deliver(msg);
    };
    es.onerror = () => {
      if (es !== this.es) return;
      // The stream ended (a disconnect message came first, or the connection broke): the
      // client's own reconnect (backoff, since) takes over, not EventSource's.
      const opened = this._live;
      this._stop();
      if (!opened) this._refused();
      else this._fail(1006, "stream lost");
    };
  }

  /** The stream did not open: learn why from the same request as a long-poll
   *  (EventSource does not say), then as `_refusedWith`. */
  async _refused() {
    let status = 0;
    try {
      const { query } = this._query({ timeout: "1" });
      const headers = this.token ? { Authorization: `Bearer ${this.token}` } : {};
      const res = await this._fetch(`${this.base}/poll?${query}`, { headers });
      status = res.status;
    } catch { /* unreachable: 1006 */ }
    if (!this.closed) this._refusedWith(status === 200 ? 0 : status);
  }

  _restart() {
    if (this.names.length) this._start(false);
    else this._stop();
  }

  _stop() {
    if (this.es) {
      this.es.onopen = this.es.onmessage = this.es.onerror = null;
      this.es.close();
      this.es = null;
    }
  }
}

/** Long-poll: `GET /poll` in a loop, `POST /call` for requests. */
class PollSocket extends FallbackSocket {
  _start(first) {
    this._stop();
    const ctl = (this.ctl = typeof AbortController !== "undefined" ? new AbortController() : null);
    const names = this.names.slice();
    // the first poll after opening answers within a second (it opens the socket)
    const quick = first || !this._cursor || this._namesChanged;
    const extra = { timeout: String(quick ? 1 : this.options.pollTimeout || 25) };
    let query;
    if (this._cursor && !first && !this._namesChanged) {
      const q = new URLSearchParams();
      for (const n of names) q.append("channel", n);
      q.set("cursor", this._cursor);
      for (const [k, v] of Object.entries(extra)) q.set(k, v);
      query = q.toString();
    } else {
      query = this._query(extra).query;
    }
    this._namesChanged = false;
    const headers = this.token ? { Authorization: `Bearer ${this.token}` } : {};
    this._fetch(`${this.base}/poll?${query}`, { headers, signal: ctl ? ctl.signal : undefined })
      .then(async (res) => {
        if (ctl !== this.ctl || this.closed) return;
        if (res.status !== 200) {
          this._refusedWith(res.status);
          return;
        }
        const body = await res.json();
        if (ctl !== this.ctl || this.closed) return;
        this._live = true;
        this._answering = true; // the client's subscribes (sent on open) wait for the messages
        if (first) this._opened();
        this._cursor = body.cursor;
        for (const msg of body.messages || []) {
          if (msg.id != null && (msg.type === "subscribed" || msg.type === "error")) {
            this._subscribeReply(msg, names);
          } else this._deliver(msg);
        }
        this._answering = false;
        this._answerRecovered();
        if (this.pushed) {
          this._fail();
          return;
        }
        if (!this.closed) this._start(false);
      })
      .catch(() => {
        if (ctl !== this.ctl || this.closed) return;
        this._fail(1006, "poll failed");
      });
  }

  /** Subscriptions resumed from a cursor get no `subscribed` message in a poll's answer
   *  (nothing was lost): answer the client's subscribe as recovered. */
  _answerRecovered() {
    if (!this._live) return;
    for (const [name, id] of [...this.subIds]) {
      if (!this.names.includes(name)) continue;
      const pos = this.positions()[name];
      if (pos == null) continue; // a new subscription: its `subscribed` comes from the server
      this.subIds.delete(name);
      this._deliver({ id, type: "subscribed", channel: name, recovered: true });
    }
  }

  _restart() {
    this._namesChanged = true;
    if (this.names.length) this._start(false);
    else this._stop();
  }

  _stop() {
    if (this.ctl) {
      const ctl = this.ctl;
      this.ctl = null;
      try { ctl.abort(); } catch { /* ignore */ }
    }
  }
}

// ---------------------------------------------------------------------------
// The offline outbox (protocol §13).

const OUTBOX_DB = "fastws-outbox";

function newKey() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  let s = "";
  for (let i = 0; i < 4; i++) s += Math.floor(Math.random() * 2 ** 32).toString(16).padStart(8, "0");
  return s;
}

/** Publications of one client not yet answered, in call order. Each is sent when the
 *  client is connected, again (same idempotency key) after a lost connection, and
 *  settled by its reply; its timeout runs only while it is sent. With
 *  `{outbox: "indexeddb"}` each is also stored (per origin and url) until answered, and
 *  what an earlier page left is sent first by the next FastWS of the same url. */
class Outbox {
  constructor(client) {
    this.client = client;
    this.entries = [];
    this.byId = new Map();
    this.seq = 0;
    this.db = null;
    this.scope = `${typeof location !== "undefined" ? location.origin : ""} ${client.url}`;
    this.ready = client.options.outbox === "indexeddb" ? this._load() : null;
  }

  get size() {
    return this.entries.length;
  }

  add(msg) {
    const limit = this.client.options.outboxLimit;
    if (this.entries.length >= limit) {
      return Promise.reject(new FastWSError(
        `outbox full: ${limit} publications are waiting to be sent (the limit is ${limit})`,
        { kind: "outbox", code: 0 }));
    }
    return new Promise((resolve, reject) => {
      const entry = { msg, resolve, reject, id: null, timer: null,
        n: Date.now() * 1000 + (this.seq++ % 1000) };
      this.entries.push(entry);
      this._store(entry);
      if (this.ready === null) this._send(entry);
    });
  }

  /** Connected: send everything unanswered, in order (after the stored queue loads). */
  flush() {
    if (this.ready !== null) return;
    for (const entry of this.entries) if (entry.id === null) this._send(entry);
  }

  _send(entry) {
    const client = this.client;
    if (client.state !== "connected" || entry.id !== null) return;
    const id = client._nextId++;
    if (!client._send({ id, ...entry.msg })) return;
    entry.id = id;
    this.byId.set(id, entry);
    const timeout = client.options.timeout;
    entry.timer = setTimeout(() => {
      this._settle(entry);
      entry.reject(new FastWSError(`publish timed out after ${timeout} ms`, { kind: "timeout", code: 0 }));
    }, timeout);
  }

  onReply(id, msg) {
    const entry = this.byId.get(id);
    if (!entry) return false;
    this._settle(entry);
    if (msg.type === "error") entry.reject(new FastWSError(msg.message || `error ${msg.code}`, { code: msg.code, reply: msg }));
    else entry.resolve(msg);
    this.client._emit("published", { msg: entry.msg, reply: msg });
    return true;
  }

  lost() {
    for (const entry of this.byId.values()) {
      clearTimeout(entry.timer);
      entry.id = null;
    }
    this.byId.clear();
  }

  fail(err) {
    const entries = this.entries;
    this.entries = [];
    this.byId.clear();
    for (const entry of entries) {
      clearTimeout(entry.timer);
      this._unstore(entry);
      entry.reject(err);
    }
  }

  _settle(entry) {
    clearTimeout(entry.timer);
    if (entry.id !== null) this.byId.delete(entry.id);
    const i = this.entries.indexOf(entry);
    if (i >= 0) this.entries.splice(i, 1);
    this._unstore(entry);
  }

  // ----- IndexedDB

  _fallback(why) {
    console.warn(`fastws: IndexedDB is not available (${why}); the outbox is kept in memory only`);
    this.db = null;
  }

  async _load() {
    try {
      const idb = this.client.options.indexedDB || globalThis.indexedDB;
      if (!idb) throw new Error("no indexedDB");
      this.db = await new Promise((resolve, reject) => {
        const req = idb.open(OUTBOX_DB, 1);
        req.onupgradeneeded = () => {
          const store = req.result.createObjectStore("queue", { keyPath: "key" });
          store.createIndex("scope", "scope");
        };
        req.onsuccess = () => resolve(req.result);
        req.onerror = () => reject(req.error || new Error("open failed"));
        req.onblocked = () => reject(new Error("blocked"));
      });
      const stored = await new Promise((resolve, reject) => {
        const req = this.db.transaction("queue").objectStore("queue").index("scope").getAll(this.scope);
        req.onsuccess = () => resolve(req.result || []);
        req.onerror = () => reject(req.error || new Error("read failed"));
      });
      stored.sort((a, b) => a.n - b.n);
      // what an earlier page left goes first; nobody awaits it ("published" events say)
      const earlier = stored.map(r => ({ msg: r.msg, resolve: () => {}, reject: () => {},
        id: null, timer: null, n: r.n, stored: true }));
      const known = new Set(this.entries.map(e => e.msg.idempotency_key));
      this.entries = [...earlier.filter(e => !known.has(e.msg.idempotency_key)), ...this.entries];
      for (const e of this.entries) if (!e.stored) this._store(e);
    } catch (err) {
      this._fallback(err && err.message ? err.message : String(err));
    }
    this.ready = null;
    this.flush();
  }

  _store(entry) {
    if (!this.db || entry.stored) return;
    entry.stored = true;
    try {
      this.db.transaction("queue", "readwrite").objectStore("queue")
        .put({ key: entry.msg.idempotency_key, scope: this.scope, n: entry.n, msg: entry.msg });
    } catch (err) {
      this._fallback(err.message);
    }
  }

  _unstore(entry) {
    if (!this.db || !entry.stored) return;
    try {
      this.db.transaction("queue", "readwrite").objectStore("queue").delete(entry.msg.idempotency_key);
    } catch { /* gone with the database */ }
  }
}

function reportError(err) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(err);
  else setTimeout(() => { throw err; });
}

export default FastWS;
