// The chat example's page: rooms with presence, typing indicators and read receipts
// (ephemeral publications), a per-user inbox (`user:NAME`), offline sending (the
// client's IndexedDB outbox) and, where WebSocket is missing, SSE or long-poll.
import { FastWS } from "/fastws.js";

const $ = (sel) => document.querySelector(sel);
const TYPING_EVERY = 2000;   // ms between two "typing" signals while typing
const TYPING_IDLE = 3000;    // ms without a key before "stopped typing"
const TYPING_SHOWN = 6000;   // ms a "typing" is shown without news

let me = null;
let client = null;
let room = null;             // "room:general"
let roomSub = null;
let maxText = 500;
const typing = new Map();    // user → timer that clears the indicator
const receipts = new Map();  // offset → Set of readers (of my messages)
let typingSentAt = 0;
let typingStop = null;
let localSeq = 0;

// ----- login --------------------------------------------------------------

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const res = await fetch("/login", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ name: $("#name").value.trim() }) });
  const body = await res.json();
  if (!res.ok) {
    $("#login-error").textContent = body.error;
    return;
  }
  start(body);
});

function start({ name, token, ws, max_text }) {
  me = name;
  maxText = max_text || maxText;
  $("#me").textContent = me;
  $("#text").placeholder = `a message (${maxText} characters at most)`;
  $("#login-form").style.display = "none";
  $("#chat").classList.add("on");
  // token: our opaque session token. fastws cannot read it; it asks the backend (its
  // connect proxy) who we are, on every transport (WebSocket, /sse, /poll, /call).
  client = new FastWS(ws, { token, outbox: "indexeddb" });
  window.chat = { client, get me() { return me; } }; // for tests and the console
  client.on("state", (s) => {
    $("#state").textContent = s;
    $("#transport").textContent = client.transport || "-";
    showPending();
    if (s === "connected" && room) refreshPresence();
  });
  client.on("transport", () => { $("#transport").textContent = client.transport; });
  client.on("published", showPending);
  client.on("join", (e) => { if (e.channel === room) refreshPresence(); });
  client.on("leave", (e) => { if (e.channel === room) refreshPresence(); });
  client.subscribe(`user:${me}`, onInbox, { last: 50 });
  for (const b of document.querySelectorAll("[data-room]")) {
    b.addEventListener("click", () => joinRoom(b.dataset.room));
  }
  joinRoom("general");
}

// ----- rooms --------------------------------------------------------------

function joinRoom(name) {
  if (room === `room:${name}`) return;
  if (roomSub) roomSub.unsubscribe();
  room = `room:${name}`;
  $("#room-name").textContent = `#${name}`;
  for (const b of document.querySelectorAll("[data-room]")) {
    b.classList.toggle("current", b.dataset.room === name);
  }
  $("#messages").replaceChildren();
  $("#people").replaceChildren();
  receipts.clear();
  clearAllTyping();
  roomSub = client.subscribe(room, onRoomEvent, { last: 50 });
  roomSub.ready.then(refreshPresence, () => {});
}

async function refreshPresence() {
  const channel = room;
  try {
    const reply = await client.presence(channel);
    if (channel !== room) return;
    const users = [...new Set(reply.clients.map((c) => c.user).filter(Boolean))].sort();
    $("#people").replaceChildren(...users.map((u) => li(u, "person")));
  } catch { /* not connected: refreshed on the next "connected" */ }
}

function senderOf(e) {
  return (e.from && e.from.user) || (e.data && e.data.name) || "?";
}

function onRoomEvent(e) {
  if (e.channel !== room) return;
  const who = senderOf(e);
  const d = e.data || {};
  if (e.ephemeral) {
    if (who === me) return; // (a fallback session may hear its own)
    if ("typing" in d) showTyping(who, d.typing === true);
    if ("read" in d) markRead(d.read, who);
    return;
  }
  if (typeof d.text !== "string") return;
  showTyping(who, false);
  const row = (d.local && who === me && document.querySelector(`[data-local="${d.local}"]`)) ||
    addRow(who, d.text);
  row.classList.remove("pending");
  row.dataset.offset = e.offset;
  for (const reader of receipts.get(e.offset) || []) markRead(e.offset, reader);
  if (who !== me && client.state === "connected") {
    client.publish(room, { read: e.offset }, { ephemeral: true, echo: false }).catch(() => {});
  }
}

function addRow(who, text) {
  const row = document.createElement("li");
  row.className = "msg";
  row.append(li(who, "sender", "span"), li(text, "text", "span"), li("", "receipt", "span"));
  $("#messages").append(row);
  row.scrollIntoView({ block: "end" });
  return row;
}

function markRead(offset, reader) {
  if (!receipts.has(offset)) receipts.set(offset, new Set());
  receipts.get(offset).add(reader);
  const row = document.querySelector(`#messages [data-offset="${offset}"]`);
  if (!row || row.querySelector(".sender").textContent !== me) return;
  row.querySelector(".receipt").textContent = `read by ${[...receipts.get(offset)].sort().join(", ")}`;
}

// ----- typing -------------------------------------------------------------

function showTyping(who, on) {
  clearTimeout(typing.get(who));
  typing.delete(who);
  if (on) typing.set(who, setTimeout(() => showTyping(who, false), TYPING_SHOWN));
  const names = [...typing.keys()].sort();
  $("#typing").textContent = names.length ? `${names.join(", ")} ${names.length > 1 ? "are" : "is"} typing…` : "";
}

function clearAllTyping() {
  for (const t of typing.values()) clearTimeout(t);
  typing.clear();
  $("#typing").textContent = "";
}

function signalTyping(on) {
  if (!room || client.state !== "connected") return; // stale by the time we are back
  client.publish(room, { typing: on }, { ephemeral: true, echo: false }).catch(() => {});
}

$("#text").addEventListener("input", () => {
  const now = Date.now();
  if (now - typingSentAt > TYPING_EVERY) {
    typingSentAt = now;
    signalTyping(true);
  }
  clearTimeout(typingStop);
  typingStop = setTimeout(stopTyping, TYPING_IDLE);
});

function stopTyping() {
  clearTimeout(typingStop);
  if (!typingSentAt) return;
  typingSentAt = 0;
  signalTyping(false);
}

// ----- sending ------------------------------------------------------------

$("#compose").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("#text").value.trim();
  if (!text) return;
  // (no length check here: the backend's publish proxy refuses a text over maxText,
  // and its error comes back as this publish's rejection)
  $("#error").textContent = "";
  $("#text").value = "";
  stopTyping();
  const local = `${Date.now().toString(36)}-${localSeq++}`;
  const row = addRow(me, text);
  row.classList.add("pending");
  row.dataset.local = local;
  // offline: queued in the outbox (IndexedDB) and sent once we are back
  client.publish(room, { text, name: me, local })
    .then((r) => { row.classList.remove("pending"); row.dataset.offset = r.offset; })
    .catch((err) => { $("#error").textContent = err.message; row.remove(); })
    .finally(showPending);
  showPending();
});

function showPending() {
  $("#pending").textContent = String(client ? client.outboxSize : 0);
}

// ----- inbox --------------------------------------------------------------

function onInbox(e) {
  const d = e.data || {};
  if (typeof d.text === "string") $("#inbox").append(li(`${senderOf(e)}: ${d.text}`, "dm"));
}

$("#dm-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const to = $("#dm-to").value.trim();
  const text = $("#dm-text").value.trim();
  if (!to || !text) return;
  $("#dm-text").value = "";
  client.publish(`user:${to}`, { text, name: me })
    .then(() => $("#inbox").append(li(`→ ${to}: ${text}`, "dm sent")))
    .catch((err) => { $("#error").textContent = err.message; });
});

function li(text, cls, tag = "li") {
  const el = document.createElement(tag);
  el.className = cls;
  el.textContent = text;
  return el;
}
