// Type-checks fastws.d.ts against the uses shown in docs/clients.md:
// `npm run check-types` (tsc --noEmit, strict). Nothing here runs.
import FastWSDefault, {
  FastWS, FastWSError, backoffDelay, encodeCursor, globMatch, httpBase, isPattern,
  normalizeChannel, refreshDelay, shouldReconnect, tokenClaims, tokenExpiresIn,
  type EventMeta, type FastWSEvent, type RefreshInfo, type State, type SubscribedInfo,
  type Transport,
} from "../fastws.js";

interface Bet { market: string; amount: string }

const c = new FastWS(`wss://example.invalid/ws`, {
  token: async () => "jwt",
  minDelay: 500,
  maxDelay: 20_000,
  pingInterval: 25_000,
  tokenRefresh: true,
  tokenRefreshMargin: 10_000,
});
const d: FastWS = new FastWSDefault("ws://127.0.0.1:8765/ws", { token: "t" });
d.close(1000, "bye");
const e = new FastWS("wss://example.invalid/ws", { transports: ["sse", "poll"],
                                                    retryWebSocketAfter: 60_000, pollTimeout: 25 });
const used: Transport | null = e.transport;
e.on("transport", (t) => console.log(t.from, t.to, used));
const base: string = httpBase("wss://example.invalid/ws");
const cur: string = encodeCursor({ "events:a": [42, "e1"], "events:*": [7, "e1", "events:b"],
                                   "chat:x": null });
console.log(base, cur);

const off = c.on("state", (s: State) => console.log(s));
off();
c.on("online", (i) => console.log(i.state));
c.on("offline", (i) => console.log(i.state));
c.on("visible", (i) => console.log(i.state));
c.on("reconnecting", ({ attempt, delay, offline }) => console.log(attempt, delay, offline));
c.on("disconnect", (i) => console.log(i.code, i.reason, i.after_ms, i.reconnect, i.refresh));
c.on("subscribed", (i: SubscribedInfo) => console.log(i.channel, i.recovered, i.replayed));
c.on("error", (err) => console.log(err.message));
c.on("refresh", (i: RefreshInfo) => console.log(i.ok, i.attempt, i.expiresIn, i.retryIn, i.error));

const sub = c.subscribe<Bet>("events:*", (e: FastWSEvent<Bet>, meta: EventMeta) => {
  const amount: string = e.data.amount;
  const offset: number | undefined = e.offset;
  console.log(e.channel, amount, offset, meta.recovered, meta.subscription);
});
c.subscribe("market:0xabc", (e) => console.log(e.data), {
  since: { offset: 41, epoch: "e" },
  onSubscribed: (i) => console.log(i.resubscribe),
  onError: (err: FastWSError) => console.log(err.code, err.kind),
});
c.subscribe("wallet:0xAbC");
c.subscribe("market:0x*", undefined, { since: { channel: "market:0xab", offset: 7, epoch: "e" } });

async function main(): Promise<void> {
  const reply = await sub.ready;
  console.log(reply.recovered);
  const pub = await c.publish("chat:lobby", { text: "hi" });
  const n: number = pub.offset;
  const h = await c.history<Bet>("events:bet_placed", { limit: 50 });
  for (const p of h.publications) console.log(p.offset, p.data.amount);
  const h2 = await c.history("events:x", 10);
  console.log(n, h2.epoch);
  const p = await c.presence("chat:lobby");
  console.log(p.clients.map((x) => x.user));
  const a = await c.auth("jwt");
  console.log(a.user, (await c.ping()).type);
  c.options.maxDelay = 300;
  c.reconnectNow();
  console.log(c.state, c.reconnects, c.tokenRefreshes, c.subscriptions(), c.url);
  sub.unsubscribe();
  c.unsubscribe("market:0xabc");
}
void main();

const ms: number = backoffDelay(3, { minDelay: 500, maxDelay: 20_000, random: Math.random });
const m: boolean = globMatch("events:*", "events:bet_placed") && isPattern("market:0x*");
const w: string = normalizeChannel("wallet:0xAbC*");
const again: boolean = shouldReconnect(4001) && !shouldReconnect(4501);
console.log(ms, m, w, again);
const claims: Record<string, unknown> | null = tokenClaims("a.b.c");
const left: number | null = tokenExpiresIn("a.b.c", Date.now());
const wait: number = refreshDelay(left ?? 0, { margin: 10_000, random: Math.random });
console.log(claims?.exp, wait);
