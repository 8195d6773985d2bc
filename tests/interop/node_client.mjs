// An interop driver: Node's built-in WebSocket (undici) as a hub client.
//
// tests/test_interop.py runs it as a subprocess and drives it with JSON lines on
// stdin; it reports what its WebSockets see as JSON lines on stdout, in the line
// protocol described in ws_client.py. Node's WebSocket cannot pause its reading and
// cannot send a text frame that is not valid UTF-8: "pause", "resume" and
// "send_invalid_utf8" answer "unsupported" (the test stops the whole process instead).
import { createInterface } from "node:readline";

const SHOWN = 65536;
const socks = new Map();

function emit(event) {
  process.stdout.write(JSON.stringify(event) + "\n");
}

function open(name, url) {
  const ws = new WebSocket(url);
  socks.set(name, ws);
  ws.addEventListener("open", () => emit({ ev: "open", sock: name }));
  ws.addEventListener("message", (e) => {
    const data = typeof e.data === "string" ? e.data : "";
    const event = { ev: "message", sock: name, len: data.length };
    if (data.length <= SHOWN) event.data = data;
    emit(event);
  });
  ws.addEventListener("error", (e) =>
    emit({ ev: "error", sock: name, message: String(e.message ?? e.error ?? "error") }),
  );
  ws.addEventListener("close", (e) =>
    emit({ ev: "close", sock: name, code: e.code, reason: e.reason, clean: e.wasClean }),
  );
}

const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
  const command = JSON.parse(line);
  const name = command.sock ?? "";
  try {
    if (command.op === "open") {
      open(name, command.url);
    } else if (command.op === "send") {
      socks.get(name).send(command.text.repeat(command.repeat ?? 1));
    } else if (command.op === "close") {
      socks.get(name).close(command.code ?? 1000, command.reason ?? "");
    } else {
      emit({ ev: "unsupported", sock: name, op: command.op });
    }
  } catch (err) {
    emit({ ev: "error", sock: name, message: `${command.op}: ${err}` });
  }
});
lines.on("close", () => {
  for (const ws of socks.values()) ws.close();
  // Exit even if a socket never finishes closing.
  setTimeout(() => process.exit(0), 1000).unref();
});
