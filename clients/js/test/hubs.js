// Hubs of a test's own, for the tests that stop a hub and start it again (the hubs in
// helpers.js live as long as the whole run). Each is a real Python hub, test/hub.py, in
// a subprocess of this node process: it stops (gracefully, 1001 to every connection)
// when its stdin closes, so it never outlives the node process, even one that is killed.
// The Python that runs it: $AGENTMESH_TEST_PYTHON, else the virtual environment's
// ($VIRTUAL_ENV, as nox sets it), else the repository's .nox/tests, else python3.

import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after } from "node:test";
import { fileURLToPath } from "node:url";

import { WAIT, within } from "./helpers.js";

const HUB_SCRIPT = fileURLToPath(new URL("./hub.py", import.meta.url));
const REPO = fileURLToPath(new URL("../../../", import.meta.url));

/** The Python with agentmesh installed. */
function python() {
  const bin = process.platform === "win32" ? join("Scripts", "python.exe") : join("bin", "python");
  const candidates = [
    process.env.AGENTMESH_TEST_PYTHON,
    process.env.VIRTUAL_ENV && join(process.env.VIRTUAL_ENV, bin),
    join(REPO, ".nox", "tests", bin),
  ];
  return candidates.find((path) => path && existsSync(path)) ?? "python3";
}

/** @type {Set<Hub>} */
const running = new Set();
after(() => Promise.allSettled([...running].map((hub) => hub.stop())));

export class Hub {
  /**
   * @param {import("node:child_process").ChildProcess} process
   * @param {string} url
   * @param {string | null} dir
   */
  constructor(process, url, dir) {
    this.process = process;
    this.url = url;
    this.port = Number(new URL(url).port);
    this._dir = dir;
    this._exited = new Promise((resolve) => process.once("exit", resolve));
  }

  /** Stop it gracefully (its stdin closes) and wait until its process has exited. */
  async stop() {
    running.delete(this);
    if (this.process.exitCode === null && this.process.signalCode === null) {
      this.process.stdin?.end();
      try {
        await within(this._exited, `the hub at ${this.url} stopping`);
      } catch (error) {
        this.process.kill("SIGKILL");
        throw error;
      }
    }
    if (this._dir) rmSync(this._dir, { recursive: true, force: true });
  }
}

/**
 * Start a hub (in memory) on `port` (0: a free one) and resolve once it accepts
 * connections. With `sick: true` its disk fails every write, and it refuses every
 * registration with `store_unavailable` (test/hub.py).
 * @param {{port?: number, sick?: boolean}} [options]
 * @returns {Promise<Hub>}
 */
export async function startHub({ port = 0, sick = false } = {}) {
  const dir = sick ? mkdtempSync(join(tmpdir(), "agentmesh-js-")) : null;
  const args = [HUB_SCRIPT, String(port), ...(dir ? ["--sick", dir] : [])];
  const child = spawn(python(), args, { stdio: ["pipe", "pipe", "pipe"] });
  let output = "";
  child.stderr.on("data", (chunk) => {
    output += chunk;
  });
  const url = new Promise((resolve, reject) => {
    let line = "";
    child.stdout.on("data", (chunk) => {
      line += chunk;
      const found = /^(ws:\/\/\S+)\n/.exec(line);
      if (found) resolve(found[1]);
    });
    child.once("error", reject);
    child.once("exit", (code, signal) => reject(new Error(`the hub exited (${code ?? signal}) before serving:\n${output}`)));
  });
  try {
    const hub = new Hub(child, await within(url, `a hub starting (${python()} ${args.join(" ")})`, 2 * WAIT), dir);
    running.add(hub);
    return hub;
  } catch (error) {
    child.kill("SIGKILL");
    if (dir) rmSync(dir, { recursive: true, force: true });
    throw error;
  }
}

/** A port on which nobody listens: bound, noted, closed. */
export function deadPort() {
  return new Promise((resolve, reject) => {
    const server = createServer().listen(0, "127.0.0.1", () => {
      const { port } = /** @type {import("node:net").AddressInfo} */ (server.address());
      server.close(() => resolve(port));
    });
    server.once("error", reject);
  });
}
