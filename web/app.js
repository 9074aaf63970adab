/* chatd browser client: plain JavaScript, no framework, no build step.
 *
 * Two channels with the same small interface (open, join, leave, send,
 * history, close) speak chatd's two browser protocols:
 *   - WsChannel: chatd's JSON WebSocket protocol (see chatd/websocket.py);
 *   - SignalRChannel: the ASP.NET Core SignalR JSON hub protocol over
 *     WebSockets (negotiate, handshake, 0x1E-terminated records).
 * The page learns where they listen from /config.json. Everything a user
 * typed is put into the page with textContent, never as HTML.
 *
 * When /config.json says "auth": true the server wants a token (a JWT whose
 * "sub" is the user name): the page takes it from its URL's #token= (then
 * drops it from the address bar) or from the Token field, and sends it as
 * ?token= on the WebSocket URL, and for SignalR as its official client's
 * accessTokenFactory does: "Authorization: Bearer" on negotiate and
 * access_token= on the WebSocket URL (browsers cannot set headers there).
 */
"use strict";

const RS = "\u001e";
const PROTOCOL_NAMES = { websocket: "WebSocket", signalr: "SignalR", grpc: "gRPC" };
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 15000, 30000];
const MAX_KEPT = 500; // messages kept per room in the page
const STATS_EVERY_MS = 5000;
// chatd's SignalR hub puts each new connection into this room (docs/signalr.md).
const SIGNALR_DEFAULT_ROOM = "general";

/* ------------------------------------------------------------------ */
/* Channels                                                             */
/* ------------------------------------------------------------------ */

class ChannelError extends Error {
  /** ``refused``: the server said no (a bad name, say); trying again would not help. */
  constructor(message, refused = false) {
    super(message);
    this.refused = refused;
  }
}

/** Common plumbing: request/response correlation and event callbacks. */
class Channel {
  constructor(user, events, token) {
    this.user = user;
    this.token = token || ""; // empty: the server asks for none
    this.events = events; // {message, presence, error, closed}
    this.pending = new Map();
    this.nextId = 1;
    this.closedByUs = false;
    this.finished = false;
  }

  expect(id) {
    return new Promise((resolve, reject) => this.pending.set(String(id), { resolve, reject }));
  }

  settle(id, error, value) {
    const waiter = this.pending.get(String(id));
    if (!waiter) return false;
    this.pending.delete(String(id));
    if (error) waiter.reject(new ChannelError(error));
    else waiter.resolve(value);
    return true;
  }

  finish(info) {
    if (this.finished) return;
    this.finished = true;
    for (const waiter of this.pending.values()) waiter.reject(new ChannelError("connection closed"));
    this.pending.clear();
    this.events.closed(Object.assign({ byUs: this.closedByUs }, info));
  }

  close() {
    this.closedByUs = true;
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) this.socket.close(1000, "bye");
  }
}

/** chatd's JSON WebSocket protocol. */
class WsChannel extends Channel {
  constructor(url, user, events, token) {
    super(user, events, token);
    this.url = url;
  }

  open() {
    return new Promise((resolve, reject) => {
      const url = new URL(this.url);
      if (this.token) url.searchParams.set("token", this.token);
      const socket = new WebSocket(url);
      this.socket = socket;
      let opened = false;
      socket.onopen = () => {
        opened = true;
        resolve();
      };
      socket.onmessage = (e) => this.receive(e.data);
      socket.onclose = (e) => {
        if (!opened) reject(new ChannelError("could not connect to " + this.url));
        // 4000: an operator closed this connection; coming back would be rude.
        // 4001: the token expired; the same one would be refused.
        this.finish({ code: e.code, reason: e.reason, retry: e.code !== 4000 && e.code !== 4001, expired: e.code === 4001 });
      };
      socket.onerror = () => {}; // onclose follows with the details
    });
  }

  receive(data) {
    let body;
    try {
      body = JSON.parse(data);
    } catch (err) {
      return;
    }
    if (body === null || typeof body !== "object") return;
    switch (body.type) {
      case "message":
        this.events.message(normalizeMessage(body));
        return;
      case "presence":
        this.events.presence(String(body.room), String(body.user), body.action === "join");
        return;
      case "error":
        if (body.ref === undefined || !this.settle(body.ref, String(body.error))) {
          this.events.error(String(body.error));
        }
        return;
      default:
        if (body.ref !== undefined) this.settle(body.ref, null, body);
    }
  }

  request(body) {
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) {
      return Promise.reject(new ChannelError("not connected"));
    }
    const ref = this.nextId++;
    const done = this.expect(ref);
    this.socket.send(JSON.stringify(Object.assign({ ref }, body)));
    return done;
  }

  async join(room) {
    const reply = await this.request({ type: "join", room, user: this.user });
    return Array.isArray(reply.members) ? reply.members.map(String) : [];
  }

  async leave(room) {
    await this.request({ type: "leave", room });
  }

  send(room, text) {
    // Acknowledged with {"type": "sent", ref} once stored; an error echoes the ref.
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) throw new ChannelError("not connected");
    this.request({ type: "message", room, message: text }).catch((err) => {
      if (!this.finished) this.events.error(err.message);
    });
  }

  async history(room, limit) {
    const reply = await this.request({ type: "history", room, limit });
    return Array.isArray(reply.messages) ? reply.messages.map(normalizeMessage) : [];
  }
}

/** The ASP.NET Core SignalR JSON hub protocol over WebSockets, just what the page needs. */
class SignalRChannel extends Channel {
  constructor(url, user, events, token) {
    super(user, events, token);
    this.url = url; // http(s)://host:port/signalr
    this.handshaken = false;
    this.buffer = "";
    this.pingTimer = null;
    this.quietTimer = null;
    this.closeInfo = null;
    this.streams = new Map(); // stream invocation id -> room
    this.plain = new Set(); // rooms whose StreamRoom was refused
  }

  async open() {
    const negotiateUrl = new URL(this.url + "/negotiate");
    negotiateUrl.searchParams.set("negotiateVersion", "1");
    negotiateUrl.searchParams.set("user", this.user);
    let info;
    let response;
    const headers = this.token ? { Authorization: "Bearer " + this.token } : {};
    try {
      response = await fetch(negotiateUrl, { method: "POST", cache: "no-store", credentials: "omit", headers });
    } catch (err) {
      throw new ChannelError("could not negotiate with " + this.url);
    }
    if (response.status === 401) {
      const why = (await response.text().catch(() => "")) || "token refused";
      throw new ChannelError("the server refused the token: " + why, true);
    }
    try {
      info = await response.json();
    } catch (err) {
      throw new ChannelError("could not negotiate with " + this.url);
    }
    if (info.error) throw new ChannelError(String(info.error), true);
    const transports = Array.isArray(info.availableTransports) ? info.availableTransports : [];
    if (!transports.some((t) => t && t.transport === "WebSockets")) {
      throw new ChannelError("the SignalR server offers no WebSockets transport");
    }
    const wsUrl = new URL(this.url);
    wsUrl.protocol = wsUrl.protocol === "https:" ? "wss:" : "ws:";
    wsUrl.searchParams.set("id", info.connectionToken || info.connectionId);
    if (this.token) wsUrl.searchParams.set("access_token", this.token);

    await new Promise((resolve, reject) => {
      const socket = new WebSocket(wsUrl);
      this.socket = socket;
      this.handshakeDone = { resolve, reject };
      socket.onopen = () => socket.send(JSON.stringify({ protocol: "json", version: 1 }) + RS);
      socket.onmessage = (e) => this.receive(e.data);
      socket.onclose = (e) => {
        this.stopTimers();
        if (!this.handshaken) reject(new ChannelError("could not connect to " + this.url));
        // A Close message ends the connection for good unless it allows a
        // reconnect (a server going away does); a dropped socket is retried.
        const close = this.closeInfo;
        this.finish({
          code: e.code,
          reason: (close && close.error) || e.reason,
          retry: !close || close.allowReconnect === true,
        });
      };
      socket.onerror = () => {};
    });
    // Keep-alive both ways, as the official clients do: ping every 15 s, and
    // give up on a server silent for 30 s (it pings every 15 s).
    this.pingTimer = setInterval(() => this.write({ type: 6 }), 15000);
    this.heard();
  }

  heard() {
    clearTimeout(this.quietTimer);
    this.quietTimer = setTimeout(() => {
      if (this.socket) this.socket.close(4001, "server timeout");
    }, 30000);
  }

  stopTimers() {
    clearInterval(this.pingTimer);
    clearTimeout(this.quietTimer);
  }

  write(message) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(message) + RS);
    }
  }

  receive(data) {
    if (typeof data !== "string") return;
    this.heard();
    this.buffer += data;
    let end;
    while ((end = this.buffer.indexOf(RS)) >= 0) {
      const record = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 1);
      let message;
      try {
        message = JSON.parse(record);
      } catch (err) {
        continue;
      }
      if (!this.handshaken) {
        if (message && message.error) {
          this.handshakeDone.reject(new ChannelError(String(message.error), true));
          this.socket.close();
          return;
        }
        this.handshaken = true;
        this.handshakeDone.resolve();
        continue;
      }
      this.dispatch(message);
    }
  }

  dispatch(message) {
    if (!message || typeof message !== "object") return;
    switch (message.type) {
      case 1: // Invocation
        this.invoked(String(message.target), Array.isArray(message.arguments) ? message.arguments : []);
        return;
      case 2: {
        // StreamItem: a message of a room this page streams (see join).
        const room = this.streams.get(String(message.invocationId));
        if (room !== undefined) this.events.message(normalizeMessage(Object.assign({ room }, message.item)));
        return;
      }
      case 3: // Completion (of a call, or the end of a room's stream)
        if (this.streams.has(String(message.invocationId))) {
          // A server without StreamRoom: fall back to ReceiveMessage for that room.
          if (message.error) this.plain.add(this.streams.get(String(message.invocationId)));
          this.streams.delete(String(message.invocationId));
          return;
        }
        this.settle(message.invocationId, message.error ? String(message.error) : null, message.result);
        return;
      case 7: // Close
        this.closeInfo = { error: message.error ? String(message.error) : "", allowReconnect: message.allowReconnect };
        this.socket.close(1000);
        return;
      default: // Ping (6) and anything newer: nothing to do
    }
  }

  invoked(target, args) {
    switch (target.toLowerCase()) {
      case "receivemessage": {
        // ReceiveMessage(user, message, room) carries no id, time or origin:
        // the page's rooms get the full message from StreamRoom instead.
        const [user, text, room] = args;
        if (this.plain.has(String(room))) this.events.message(normalizeMessage({ user, message: text, room }));
        return;
      }
      case "userjoined":
        this.events.presence(String(args[1]), String(args[0]), true);
        return;
      case "userleft":
        this.events.presence(String(args[1]), String(args[0]), false);
        return;
      default:
    }
  }

  invoke(target, ...args) {
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) {
      return Promise.reject(new ChannelError("not connected"));
    }
    const invocationId = String(this.nextId++);
    const done = this.expect(invocationId);
    this.write({ type: 1, invocationId, target, arguments: args });
    return done;
  }

  async join(room) {
    const users = await this.invoke("JoinRoom", room);
    // StreamRoom delivers each new message of the room as the full message
    // (id, seq, timestamp, origin protocol), which ReceiveMessage lacks.
    const invocationId = String(this.nextId++);
    this.streams.set(invocationId, room);
    this.write({ type: 4, invocationId, target: "StreamRoom", arguments: [room] });
    return Array.isArray(users) ? users.map(String) : [];
  }

  async leave(room) {
    for (const [id, streamed] of this.streams) {
      if (streamed === room) {
        this.streams.delete(id);
        this.write({ type: 5, invocationId: id });
      }
    }
    this.plain.delete(room);
    await this.invoke("LeaveRoom", room);
  }

  /** The server puts every new connection in its default room; leave it unless asked for. */
  async leaveDefaultRoom(wanted) {
    if (wanted.includes(SIGNALR_DEFAULT_ROOM)) return;
    try {
      await this.invoke("LeaveRoom", SIGNALR_DEFAULT_ROOM);
    } catch (err) {
      /* not in it: nothing to leave */
    }
  }

  send(room, text) {
    this.invoke("SendToRoom", room, this.user, text).catch((err) => {
      if (!this.finished) this.events.error(err.message);
    });
  }

  async history(room, limit) {
    const list = await this.invoke("GetHistory", room, limit);
    return Array.isArray(list) ? list.map(normalizeMessage) : [];
  }
}

function normalizeMessage(raw) {
  const m = raw && typeof raw === "object" ? raw : {};
  return {
    id: m.id === undefined || m.id === null ? null : String(m.id),
    seq: typeof m.seq === "number" ? m.seq : null,
    room: String(m.room ?? ""),
    user: String(m.user ?? ""),
    text: String(m.message ?? m.text ?? ""),
    timestamp: typeof m.timestamp === "string" ? m.timestamp : new Date().toISOString(),
    protocol: typeof m.protocol === "string" ? m.protocol : "",
  };
}

/* ------------------------------------------------------------------ */
/* Page state                                                           */
/* ------------------------------------------------------------------ */

const $ = (id) => document.getElementById(id);

const ui = {
  connectForm: $("connect-form"),
  name: $("name"),
  room: $("room"),
  tokenField: $("token-field"),
  token: $("token"),
  protocol: $("protocol"),
  connectButton: $("connect-button"),
  status: $("status"),
  statusText: $("status-text"),
  retry: $("retry-button"),
  notice: $("notice"),
  roomList: $("room-list"),
  joinForm: $("join-form"),
  joinRoom: $("join-room"),
  roomTitle: $("room-title"),
  roomSub: $("room-sub"),
  leave: $("leave-button"),
  messages: $("messages"),
  empty: $("empty"),
  sendForm: $("send-form"),
  message: $("message"),
  members: $("members"),
  memberCount: $("member-count"),
  stats: $("stats"),
  statsNote: $("stats-note"),
};

const state = {
  config: null,
  channel: null,
  token: "", // from #token= or the Token field; sent only when the server asks for tokens
  user: "",
  protocol: "websocket",
  wanted: false, // the user asked to be connected
  attempt: 0,
  retryTimer: null,
  rooms: new Map(), // name -> {name, messages: [], ids: Set, members: Set, unread}
  current: null,
};

const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const dayTimeFormat = new Intl.DateTimeFormat(undefined, {
  month: "short",
  day: "numeric",
  hour: "2-digit",
  minute: "2-digit",
});
const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(kind, text, detail) {
  ui.status.dataset.state = kind;
  ui.statusText.textContent = text;
  ui.status.title = detail || "";
  ui.retry.hidden = kind !== "reconnecting";
}

function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = !text;
}

function protocolName(p) {
  return PROTOCOL_NAMES[p] || p || "?";
}

/* ------------------------------------------------------------------ */
/* Rendering                                                            */
/* ------------------------------------------------------------------ */

function renderMessage(m) {
  const li = el("li", "msg");
  if (m.user === state.user) li.classList.add("own");
  if (m.id) li.dataset.id = m.id;
  const meta = el("div", "meta");
  meta.append(el("span", "user", m.user));
  const proto = el("span", "proto", protocolName(m.protocol));
  proto.dataset.protocol = PROTOCOL_NAMES[m.protocol] ? m.protocol : "other";
  proto.title = "sent over " + protocolName(m.protocol);
  meta.append(proto);
  const when = new Date(m.timestamp);
  const today = new Date().toDateString() === when.toDateString();
  const time = el("time", "", isNaN(when) ? "" : (today ? timeFormat : dayTimeFormat).format(when));
  if (!isNaN(when)) {
    time.dateTime = when.toISOString();
    time.title = fullFormat.format(when);
  }
  meta.append(time);
  li.append(meta, el("p", "text", m.text));
  return li;
}

function renderEvent(e) {
  const li = el("li", "event", e.text);
  return li;
}

function renderItem(item) {
  return item.kind === "event" ? renderEvent(item) : renderMessage(item);
}

function nearBottom() {
  const box = ui.messages;
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function scrollToEnd() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function renderRoom() {
  const room = state.rooms.get(state.current);
  ui.messages.replaceChildren();
  if (!room) {
    ui.roomTitle.textContent = state.channel ? "No room" : "Not connected";
    ui.roomSub.textContent = "";
    ui.empty.hidden = false;
    ui.empty.textContent = state.channel ? "Join a room to start chatting." : "Pick a name and a room, then connect.";
    renderMembers();
    renderRoomList();
    updateControls();
    return;
  }
  room.unread = 0;
  ui.roomTitle.textContent = "#" + room.name;
  ui.roomSub.textContent = "as " + state.user + " over " + protocolName(state.protocol);
  ui.message.placeholder = "Message #" + room.name;
  const fragment = document.createDocumentFragment();
  for (const item of room.messages) fragment.append(renderItem(item));
  ui.messages.append(fragment);
  ui.empty.hidden = room.messages.length > 0;
  ui.empty.textContent = "No messages yet. Say hello!";
  scrollToEnd();
  renderMembers();
  renderRoomList();
  updateControls();
}

function renderRoomList() {
  const items = [];
  for (const room of state.rooms.values()) {
    const li = el("li");
    const button = el("button");
    button.type = "button";
    button.append(el("span", "room-name", "#" + room.name));
    if (room.unread > 0 && room.name !== state.current) {
      button.append(el("span", "badge", String(room.unread)), el("span", "sr-only", " unread"));
    }
    if (room.name === state.current) button.setAttribute("aria-current", "true");
    button.addEventListener("click", () => switchRoom(room.name));
    li.append(button);
    items.push(li);
  }
  ui.roomList.replaceChildren(...items);
  const unread = [...state.rooms.values()].reduce((n, r) => n + (r.name === state.current ? 0 : r.unread), 0);
  document.title = unread ? "(" + unread + ") chatd" : "chatd";
}

function renderMembers() {
  const room = state.rooms.get(state.current);
  const names = room ? [...room.members].sort((a, b) => a.localeCompare(b)) : [];
  ui.members.replaceChildren(
    ...names.map((name) => {
      const li = el("li", name === state.user ? "me" : "", name);
      if (name === state.user) li.append(el("span", "muted small", "(you)"));
      return li;
    })
  );
  ui.memberCount.textContent = room ? "(" + names.length + ")" : "";
}

function updateControls() {
  const online = !!state.channel && ui.status.dataset.state === "online";
  const connected = state.wanted;
  document.body.dataset.connected = String(connected);
  ui.connectButton.textContent = connected ? "Disconnect" : "Connect";
  ui.connectButton.classList.toggle("primary", !connected);
  ui.name.disabled = connected;
  ui.token.disabled = connected;
  ui.room.disabled = connected;
  ui.protocol.disabled = connected;
  ui.joinRoom.disabled = !online;
  ui.joinForm.querySelector("button").disabled = !online;
  const current = state.rooms.get(state.current);
  const inRoom = online && !!current && current.joined;
  ui.message.disabled = !inRoom;
  ui.sendForm.querySelector("button").disabled = !inRoom;
  ui.leave.disabled = !inRoom;
}

/* ------------------------------------------------------------------ */
/* Rooms and messages                                                   */
/* ------------------------------------------------------------------ */

function roomState(name) {
  let room = state.rooms.get(name);
  if (!room) {
    room = { name, messages: [], ids: new Set(), members: new Set(), unread: 0, joined: false };
    state.rooms.set(name, room);
  }
  return room;
}

function trim(room) {
  if (room.messages.length > MAX_KEPT) {
    for (const old of room.messages.splice(0, room.messages.length - MAX_KEPT)) {
      if (old.id) room.ids.delete(old.id);
    }
  }
}

function addItem(room, item) {
  room.messages.push(item);
  trim(room);
  if (room.name === state.current) {
    const stick = nearBottom();
    ui.messages.append(renderItem(item));
    ui.empty.hidden = true;
    if (stick || item.user === state.user) scrollToEnd();
  } else if (item.kind !== "event") {
    room.unread += 1;
    renderRoomList();
  }
}

function onMessage(m) {
  const room = state.rooms.get(m.room);
  if (!room) return;
  statsSoon();
  if (m.id) {
    if (room.ids.has(m.id)) return;
    room.ids.add(m.id);
  }
  addItem(room, m);
  if (document.hidden && room.name === state.current && m.user !== state.user) {
    room.unread += 1;
    renderRoomList();
  }
}

function onPresence(roomName, user, joined) {
  const room = state.rooms.get(roomName);
  if (!room) return;
  statsSoon();
  const had = room.members.has(user);
  if (joined) room.members.add(user);
  else room.members.delete(user);
  if (roomName === state.current) renderMembers();
  if (had !== joined && user !== state.user) {
    addItem(room, { kind: "event", text: user + (joined ? " joined" : " left") });
  }
}

/** Merge history into what the page already shows: no duplicates, oldest first. */
function mergeHistory(room, messages) {
  let added = false;
  for (const m of messages) {
    if (m.id && room.ids.has(m.id)) continue;
    if (m.id) room.ids.add(m.id);
    room.messages.push(m);
    added = true;
  }
  if (!added) return;
  const key = (item) => (item.kind === "event" ? null : item.timestamp);
  // Stable sort on time, then seq; presence lines keep their place after what preceded them.
  const decorated = room.messages.map((item, i) => ({ item, i }));
  let last = "";
  for (const d of decorated) {
    const k = key(d.item);
    if (k !== null) last = k;
    d.t = k === null ? last : k;
  }
  decorated.sort((a, b) => {
    if (a.t !== b.t) return a.t < b.t ? -1 : 1;
    const sa = a.item.seq ?? 0;
    const sb = b.item.seq ?? 0;
    if (a.item.kind !== "event" && b.item.kind !== "event" && sa !== sb) return sa - sb;
    return a.i - b.i;
  });
  room.messages = decorated.map((d) => d.item);
  trim(room);
}

async function enterRoom(name, focus) {
  const channel = state.channel;
  const room = roomState(name);
  room.joined = false;
  if (!state.current || focus) state.current = name;
  renderRoom();
  const members = await channel.join(name);
  if (channel !== state.channel) return;
  room.joined = true;
  updateControls();
  room.members = new Set(members);
  if (!room.members.has(state.user)) room.members.add(state.user);
  if (state.current === name) renderMembers();
  const limit = (state.config && state.config.historyLimit) || 50;
  const history = await channel.history(name, limit);
  if (channel !== state.channel) return;
  mergeHistory(room, history);
  if (state.current === name) renderRoom();
}

function switchRoom(name) {
  if (!state.rooms.has(name)) return;
  state.current = name;
  renderRoom();
  ui.message.focus();
}

async function joinAnother(name) {
  if (state.rooms.has(name)) {
    switchRoom(name);
    return;
  }
  try {
    await enterRoom(name, true);
    showNotice("");
    ui.message.focus();
  } catch (err) {
    state.rooms.delete(name);
    if (state.current === name) state.current = state.rooms.keys().next().value || null;
    renderRoom();
    showNotice("Could not join " + name + ": " + err.message);
  }
}

async function leaveCurrent() {
  const name = state.current;
  if (!name || !state.channel) return;
  try {
    await state.channel.leave(name);
  } catch (err) {
    showNotice("Could not leave " + name + ": " + err.message);
    return;
  }
  state.rooms.delete(name);
  state.current = state.rooms.keys().next().value || null;
  renderRoom();
}

/* ------------------------------------------------------------------ */
/* Connection lifecycle                                                 */
/* ------------------------------------------------------------------ */

function channelFor(protocol, user) {
  const url = state.config && state.config[protocol];
  if (!url) throw new ChannelError(protocolName(protocol) + " is not enabled on this server");
  const events = {
    message: (m) => state.channel === channel && onMessage(m),
    presence: (room, user, joined) => state.channel === channel && onPresence(room, user, joined),
    error: (text) => state.channel === channel && showNotice(text),
    closed: (info) => channelClosed(channel, info),
  };
  const token = state.config.auth ? state.token : "";
  const Kind = protocol === "signalr" ? SignalRChannel : WsChannel;
  const channel = new Kind(url, user, events, token);
  return channel;
}

async function connect() {
  clearTimeout(state.retryTimer);
  const reconnecting = state.attempt > 0;
  setStatus(reconnecting ? "reconnecting" : "connecting", reconnecting ? "Reconnecting…" : "Connecting…");
  ui.retry.hidden = true;
  let channel;
  try {
    channel = channelFor(state.protocol, state.user);
  } catch (err) {
    fail(err.message);
    return;
  }
  state.channel = channel;
  try {
    await channel.open();
  } catch (err) {
    if (state.channel !== channel) return;
    state.channel = null;
    if (err.refused) fail("Could not connect: " + err.message);
    else scheduleReconnect(err.message);
    return;
  }
  if (state.channel !== channel || !state.wanted) return;
  const wasReconnect = state.attempt > 0;
  setStatus("online", "Connected · " + protocolName(state.protocol));
  showNotice("");
  statsSoon();
  updateControls();
  const names = state.rooms.size ? [...state.rooms.keys()] : [ui.room.value.trim()];
  const current = state.current || names[0];
  if (channel.leaveDefaultRoom) channel.leaveDefaultRoom(names);
  for (const name of names) {
    try {
      await enterRoom(name, name === current);
    } catch (err) {
      if (state.channel !== channel) return;
      if (!wasReconnect && state.rooms.size <= 1) {
        // The first join failed (a bad name or room): nothing to retry.
        fail("Could not join " + name + ": " + err.message);
        return;
      }
      showNotice("Could not join " + name + ": " + err.message);
    }
  }
  if (state.channel !== channel) return;
  // Only a connection that got as far as its rooms resets the backoff: a
  // server that accepts and at once closes (full, say) is not hammered.
  state.attempt = 0;
  // Focus the message box on the first connect, or after a reconnect if nothing else has focus.
  if (!wasReconnect || document.activeElement === document.body) ui.message.focus();
}

function channelClosed(channel, info) {
  if (state.channel !== channel) return;
  state.channel = null;
  if (!state.wanted) return;
  if (info.expired) {
    fail("Your token expired: paste a new one and connect again.");
    ui.token.value = "";
    return;
  }
  if (!info.retry) {
    fail("Disconnected by the server" + (info.reason ? ": " + info.reason : ""));
    return;
  }
  scheduleReconnect(info.reason || "connection lost");
}

function scheduleReconnect(why) {
  if (!state.wanted) return;
  const base = BACKOFF_MS[Math.min(state.attempt, BACKOFF_MS.length - 1)];
  const delay = Math.round(base * (0.75 + Math.random() * 0.5));
  state.attempt += 1;
  setStatus("reconnecting", "Reconnecting in " + Math.max(1, Math.round(delay / 1000)) + " s…", why);
  updateControls();
  clearTimeout(state.retryTimer);
  state.retryTimer = setTimeout(connect, delay);
}

function fail(text) {
  disconnect();
  setStatus("error", "Not connected");
  showNotice(text);
}

function disconnect() {
  state.wanted = false;
  clearTimeout(state.retryTimer);
  const channel = state.channel;
  state.channel = null;
  state.attempt = 0;
  if (channel) channel.close();
  state.rooms.clear();
  state.current = null;
  setStatus("offline", "Offline");
  renderRoom();
}

function startFromForm() {
  if (state.config && state.config.auth) {
    useToken(ui.token.value.trim());
    if (!state.token) {
      showNotice("This server needs a token: paste yours, or open the page with #token=… in its address.");
      ui.token.focus();
      return;
    }
  }
  const user = ui.name.value.trim();
  const room = ui.room.value.trim();
  if (!user) {
    showNotice("Please enter a name.");
    ui.name.focus();
    return;
  }
  if (!/^[A-Za-z0-9_.\-]{1,64}$/.test(room)) {
    showNotice("A room name is 1-64 characters of A-Z a-z 0-9 _ . -");
    ui.room.focus();
    return;
  }
  showNotice("");
  state.user = user;
  state.protocol = ui.protocol.value;
  state.wanted = true;
  state.attempt = 0;
  try {
    localStorage.setItem("chatd.form", JSON.stringify({ user, room, protocol: state.protocol }));
  } catch (err) {
    /* private mode: nothing to remember */
  }
  updateControls();
  connect();
}

/* ------------------------------------------------------------------ */
/* Stats                                                                */
/* ------------------------------------------------------------------ */

function formatUptime(seconds) {
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (d) return d + "d " + h + "h";
  if (h) return h + "h " + m + "m";
  if (m) return m + "m " + (s % 60) + "s";
  return s + "s";
}

let statsTimer = null;

/** Refresh the stats soon after something changed, at most a few times a second. */
function statsSoon() {
  if (statsTimer === null) {
    statsTimer = setTimeout(() => {
      statsTimer = null;
      refreshStats();
    }, 400);
  }
}

async function refreshStats() {
  if (document.hidden || !state.config) return;
  try {
    const response = await fetch(state.config.stats || "stats", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const stats = await response.json();
    for (const dd of ui.stats.querySelectorAll("dd[data-stat]")) {
      let value = stats;
      for (const part of dd.dataset.stat.split(".")) value = value == null ? undefined : value[part];
      if (dd.dataset.stat === "uptime" && typeof value === "number") value = formatUptime(value);
      dd.textContent = value === undefined ? "–" : String(value);
    }
    ui.statsNote.textContent = "Updated " + timeFormat.format(new Date());
  } catch (err) {
    ui.statsNote.textContent = "Stats unavailable";
  }
}

/* ------------------------------------------------------------------ */
/* Wiring                                                               */
/* ------------------------------------------------------------------ */

/** The user name a token claims (its "sub"), read without checking it: the server checks. */
function tokenUser(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = decodeURIComponent(
      [...atob(payload)].map((c) => "%" + c.charCodeAt(0).toString(16).padStart(2, "0")).join("")
    );
    const sub = JSON.parse(json).sub;
    return typeof sub === "string" ? sub : "";
  } catch (err) {
    return "";
  }
}

/** Take a token: the name is then the token's, and cannot be edited. */
function useToken(token) {
  state.token = token;
  ui.token.value = token;
  const user = token ? tokenUser(token) : "";
  if (user) ui.name.value = user;
  ui.name.readOnly = !!user;
}

/** A token handed over in the page's URL (#token=…), taken out of the address bar and history. */
function tokenFromUrl() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (!token) return "";
  history.replaceState(null, "", location.pathname + location.search);
  return token.trim();
}

function restoreForm() {
  try {
    const saved = JSON.parse(localStorage.getItem("chatd.form") || "null");
    if (saved && typeof saved === "object") {
      if (typeof saved.user === "string") ui.name.value = saved.user;
      if (typeof saved.room === "string") ui.room.value = saved.room;
      if (saved.protocol === "websocket" || saved.protocol === "signalr") ui.protocol.value = saved.protocol;
    }
  } catch (err) {
    /* nothing remembered */
  }
}

function wire() {
  ui.connectForm.addEventListener("submit", (e) => {
    e.preventDefault();
    if (state.wanted) disconnect();
    else startFromForm();
  });
  ui.retry.addEventListener("click", () => {
    if (state.wanted && !state.channel) connect();
  });
  ui.joinForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const name = ui.joinRoom.value.trim();
    if (!/^[A-Za-z0-9_.\-]{1,64}$/.test(name)) {
      showNotice("A room name is 1-64 characters of A-Z a-z 0-9 _ . -");
      return;
    }
    ui.joinRoom.value = "";
    joinAnother(name);
  });
  ui.leave.addEventListener("click", leaveCurrent);
  ui.sendForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = ui.message.value;
    if (!text.trim() || !state.channel || !state.current) return;
    try {
      state.channel.send(state.current, text);
    } catch (err) {
      showNotice(err.message);
      return;
    }
    ui.message.value = "";
    autosize();
  });
  ui.message.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      ui.sendForm.requestSubmit();
    }
  });
  ui.message.addEventListener("input", autosize);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) {
      const room = state.rooms.get(state.current);
      if (room) room.unread = 0;
      renderRoomList();
      refreshStats();
    }
  });
}

function autosize() {
  ui.message.style.height = "auto";
  ui.message.style.height = Math.min(ui.message.scrollHeight + 2, 144) + "px";
}

async function main() {
  restoreForm();
  wire();
  renderRoom();
  try {
    const response = await fetch("config.json", { cache: "no-store" });
    state.config = await response.json();
  } catch (err) {
    setStatus("error", "No server config");
    showNotice("Could not load the server's configuration: " + err.message);
    return;
  }
  const offered = new Set(state.config.protocols || []);
  for (const option of ui.protocol.options) {
    option.disabled = !offered.has(option.value);
    if (option.disabled) option.textContent = protocolName(option.value) + " (not enabled)";
  }
  if (ui.protocol.selectedOptions[0] && ui.protocol.selectedOptions[0].disabled) {
    const first = [...ui.protocol.options].find((o) => !o.disabled);
    if (first) ui.protocol.value = first.value;
  }
  if (state.config.maxMessageLength) ui.message.maxLength = state.config.maxMessageLength;
  const token = tokenFromUrl();
  if (state.config.auth) {
    ui.tokenField.hidden = false;
    if (token) useToken(token);
    ui.token.addEventListener("change", () => useToken(ui.token.value.trim()));
  }
  document.documentElement.dataset.ready = "true";
  refreshStats();
  setInterval(refreshStats, STATS_EVERY_MS);
  if (!ui.name.value) ui.name.focus();
}

main();
