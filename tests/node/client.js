// A scriptable @microsoft/signalr client for the interop tests.
//
// Commands arrive on stdin, one JSON object a line; events leave on stdout,
// one JSON object a line. The Python side (tests/test_signalr_interop.py)
// waits for the events it expects, so nothing here sleeps.
//
//   {"op":"start","url","transport","protocol","skipNegotiation","statefulReconnect",
//    "automaticReconnect","serverTimeoutMs","keepAliveMs","logLevel","methods":[...],"accessToken"}
//        -> {"event":"started","connectionId"} | {"event":"startFailed","error"}
//        With "accessToken" the connection gets an accessTokenFactory returning the
//        current token ({"event":"tokenAsked"} each time it is called).
//   {"op":"token","token"}                -> {"event":"tokenSet"}: what the factory returns from now on
//   {"op":"invoke","id","method","args"}  -> {"event":"result","id","result"|"error"}
//   {"op":"send","id","method","args"}    -> {"event":"sent","id"} | {"event":"result","id","error"}
//   {"op":"stream","id","method","args"}  -> {"event":"item","id","item"}..., {"event":"complete","id","error"?}
//   {"op":"cancel","id"}                  -> (the stream's subscription is disposed)
//   {"op":"upload","id","method","args","items"} -> {"event":"result","id",...}
//   {"op":"stop"}                         -> {"event":"closed"}, then the process exits
// Server calls to registered methods -> {"event":"call","target","args"}
// Connection events -> {"event":"closed","error"?} | {"event":"reconnecting"} | {"event":"reconnected"}
"use strict";

const readline = require("readline");
const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

let connection = null;
let accessToken = null;
const subscriptions = new Map();

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

// Client logs go to stderr: stdout carries only the JSON events.
function stderrLogger(minimum) {
  return {
    log(level, message) {
      if (level >= minimum) process.stderr.write(`[${new Date().toISOString()}] ${level}: ${message}\n`);
    },
  };
}

function errorText(e) {
  return e && e.message ? e.message : String(e);
}

// Dates and binary values from MessagePack are made JSON-friendly.
function plain(value) {
  if (value instanceof Uint8Array) return Array.from(value);
  return value;
}

async function start(cmd) {
  const options = {
    transport: signalR.HttpTransportType[cmd.transport],
    skipNegotiation: !!cmd.skipNegotiation,
  };
  if (cmd.accessToken !== undefined) {
    accessToken = cmd.accessToken;
    options.accessTokenFactory = () => {
      emit({ event: "tokenAsked" });
      return accessToken;
    };
  }
  let builder = new signalR.HubConnectionBuilder()
    .withUrl(cmd.url, options)
    .configureLogging(stderrLogger(cmd.logLevel === undefined ? signalR.LogLevel.None : cmd.logLevel));
  if (cmd.protocol === "messagepack") builder = builder.withHubProtocol(new MessagePackHubProtocol());
  if (cmd.statefulReconnect) builder = builder.withStatefulReconnect();
  if (cmd.automaticReconnect) builder = builder.withAutomaticReconnect([0, 100, 1000]);
  if (cmd.serverTimeoutMs) builder = builder.withServerTimeout(cmd.serverTimeoutMs);
  if (cmd.keepAliveMs) builder = builder.withKeepAliveInterval(cmd.keepAliveMs);
  connection = builder.build();
  for (const method of cmd.methods || []) {
    connection.on(method, (...args) => emit({ event: "call", target: method, args: args.map(plain) }));
  }
  connection.onclose((e) => emit({ event: "closed", error: e ? errorText(e) : null }));
  connection.onreconnecting(() => emit({ event: "reconnecting" }));
  connection.onreconnected(() => emit({ event: "reconnected" }));
  try {
    await connection.start();
    emit({ event: "started", connectionId: connection.connectionId });
  } catch (e) {
    emit({ event: "startFailed", error: errorText(e) });
  }
}

async function handle(cmd) {
  switch (cmd.op) {
    case "start":
      return start(cmd);
    case "token":
      accessToken = cmd.token;
      emit({ event: "tokenSet" });
      return;
    case "invoke":
      try {
        const result = await connection.invoke(cmd.method, ...(cmd.args || []));
        emit({ event: "result", id: cmd.id, result: result === undefined ? null : result });
      } catch (e) {
        emit({ event: "result", id: cmd.id, error: errorText(e) });
      }
      return;
    case "send":
      try {
        await connection.send(cmd.method, ...(cmd.args || []));
        emit({ event: "sent", id: cmd.id });
      } catch (e) {
        emit({ event: "result", id: cmd.id, error: errorText(e) });
      }
      return;
    case "stream": {
      const sub = connection.stream(cmd.method, ...(cmd.args || [])).subscribe({
        next: (item) => emit({ event: "item", id: cmd.id, item }),
        complete: () => emit({ event: "complete", id: cmd.id }),
        error: (e) => emit({ event: "complete", id: cmd.id, error: errorText(e) }),
      });
      subscriptions.set(cmd.id, sub);
      emit({ event: "subscribed", id: cmd.id });
      return;
    }
    case "cancel": {
      const sub = subscriptions.get(cmd.id);
      if (sub) sub.dispose();
      emit({ event: "cancelled", id: cmd.id });
      return;
    }
    case "upload": {
      const subject = new signalR.Subject();
      const pending = connection.invoke(cmd.method, ...(cmd.args || []), subject);
      for (const item of cmd.items) subject.next(item);
      subject.complete();
      try {
        const result = await pending;
        emit({ event: "result", id: cmd.id, result: result === undefined ? null : result });
      } catch (e) {
        emit({ event: "result", id: cmd.id, error: errorText(e) });
      }
      return;
    }
    case "stop":
      if (connection) await connection.stop();
      emit({ event: "stopped" });
      process.exit(0);
      return;
    default:
      emit({ event: "error", error: "unknown op " + cmd.op });
  }
}

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  if (!line.trim()) return;
  handle(JSON.parse(line)).catch((e) => emit({ event: "error", error: errorText(e) }));
});
rl.on("close", () => process.exit(0));
