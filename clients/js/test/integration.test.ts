// Acceptance 2: Node <-> Python chat through a real daemon with the WebSocket gateway.
// alice is this SDK in Node; bob is the Python library (cim-client), driven by
// tests/integration/support/js_peer.py, which also starts the daemon with
// `[ws] enabled = true` and the file service. Both ways, alice's own message from her
// other device (cim-client) shown as hers, her devices online, read receipts both ways,
// catch-up after an offline period with its unread count, and a file uploaded from JS
// that downloads byte-identical in Python.
//
// Skipped while the daemon has no WebSocket gateway: cim/config must know a `ws`
// section (the gateway is issue #18's other half, built on its own branch).
import assert from "node:assert/strict";
import { execFileSync, spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { test } from "node:test";
import { FileClient, type UploadProgress } from "../src/api/files.js";
import { ChatClient, type ChatEvents } from "../src/session/client.js";
import { conversationKey } from "../src/session/reads.js";

const ROOT = fileURLToPath(new URL("../../../../", import.meta.url));

/** Whether the daemon's configuration knows a [ws] section (the gateway exists). */
function gatewayPresent(): boolean {
  const configDir = join(ROOT, "cim", "config");
  return readdirSync(configDir)
    .filter((name) => name.endsWith(".py"))
    .some((name) => /section:\s*ClassVar\[str\]\s*=\s*["']ws["']/.test(readFileSync(join(configDir, name), "utf8")));
}

/** The main checkout of this repository (a git worktree shares its virtualenv). */
function mainCheckout(): string | undefined {
  try {
    const common = execFileSync("git", ["rev-parse", "--path-format=absolute", "--git-common-dir"], { cwd: ROOT, encoding: "utf8" }).trim();
    return dirname(common);
  } catch {
    return undefined;
  }
}

function python(): string {
  const main = mainCheckout();
  const candidates = [
    process.env["CIM_PYTHON"],
    join(ROOT, ".venv", "bin", "python"),
    main === undefined ? undefined : join(main, ".venv", "bin", "python"),
  ].filter(Boolean) as string[];
  const found = candidates.find((path) => existsSync(path));
  if (found === undefined) throw new Error(`no Python for the peer: set CIM_PYTHON (tried ${candidates.join(", ")})`);
  return found;
}

/** The Python peer: one JSON command in, one JSON answer out. */
class Peer {
  private readonly lines: string[] = [];
  private readonly waiters: ((line: string) => void)[] = [];
  private readonly child: ChildProcessWithoutNullStreams;
  stderr = "";

  constructor(workdir: string) {
    this.child = spawn(python(), ["-m", "tests.integration.support.js_peer", workdir], {
      cwd: ROOT,
      env: { ...process.env, PYTHONPATH: ROOT }, // this checkout's cim, whatever the venv points at
    });
    this.child.stderr.on("data", (chunk) => (this.stderr += String(chunk)));
    createInterface({ input: this.child.stdout }).on("line", (line) => {
      const waiter = this.waiters.shift();
      if (waiter) waiter(line);
      else this.lines.push(line);
    });
  }

  next(timeoutMs = 120_000): Promise<Record<string, any>> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the Python peer said nothing in ${timeoutMs} ms: ${this.stderr}`)), timeoutMs);
      const take = (line: string) => {
        clearTimeout(timer);
        const answer = JSON.parse(line);
        if (answer.error) reject(new Error(`the Python peer: ${answer.error}`));
        else resolve(answer);
      };
      const queued = this.lines.shift();
      if (queued !== undefined) take(queued);
      else this.waiters.push(take);
    });
  }

  ask(command: Record<string, unknown>): Promise<Record<string, any>> {
    this.child.stdin.write(JSON.stringify(command) + "\n");
    return this.next();
  }

  async stop(): Promise<void> {
    if (this.child.exitCode !== null) return;
    const exited = new Promise((resolve) => this.child.once("exit", resolve));
    this.child.stdin.end(JSON.stringify({ cmd: "stop" }) + "\n");
    const timer = setTimeout(() => this.child.kill("SIGTERM"), 60_000);
    await exited;
    clearTimeout(timer);
  }
}

/** Resolves with the first event value that satisfies `predicate` (bounded). */
function waitFor<K extends keyof ChatEvents>(
  client: ChatClient,
  event: K,
  predicate: (value: ChatEvents[K]) => boolean,
  what: string,
  timeoutMs = 60_000,
): Promise<ChatEvents[K]> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${what} in ${timeoutMs} ms`));
    }, timeoutMs);
    const off = client.on(event, (value) => {
      if (!predicate(value)) return;
      clearTimeout(timer);
      off();
      resolve(value);
    });
  });
}

/** An outcome for an assertion's message (its ids are bigints). */
function show(value: unknown): string {
  return JSON.stringify(value, (_key, v) => (typeof v === "bigint" ? v.toString() : v));
}

const skip = gatewayPresent() ? false : "the daemon has no WebSocket gateway yet: cim/config knows no [ws] section";

test("Node (alice, this SDK) and Python (bob, cim-client) chat through a real daemon", { skip, timeout: 600_000 }, async () => {
  const workdir = mkdtempSync(join(tmpdir(), "cim-js-e2e-"));
  const peer = new Peer(workdir);
  const clients: ChatClient[] = [];
  try {
    const ready = await peer.next();
    const login = (ordered = false) => {
      const client = new ChatClient({
        // The first router is down: the SDK moves on to the one that answers.
        routers: ["http://127.0.0.1:9", ready.router],
        user: "alice",
        password: ready.password,
        device: "node-1",
        ordered,
      });
      clients.push(client);
      return client;
    };

    // Python -> Node, live.
    const alice = login();
    const firstCatchUp = waitFor(alice, "caughtUp", () => true, "the login's catch-up");
    await alice.start(30_000);
    await firstCatchUp;
    const live = waitFor(alice, "message", (m) => m.message.text === "hello alice, from python", "bob's message");
    const bobSent = await peer.ask({ cmd: "send", to: "alice", text: "hello alice, from python" });
    assert.ok(["delivered", "stored"].includes(bobSent.outcome.status), show(bobSent));
    const got = await live;
    assert.equal(got.message.from, "bob");
    assert.equal(got.live, true);
    assert.equal(got.own, false);
    const key = conversationKey("alice", "bob");
    assert.equal(got.message.conversation, key);
    assert.equal(alice.reads.unread(key), 1);
    const mark = await alice.markRead(key);
    assert.deepEqual([mark.seq, mark.moved, alice.reads.unread(key)], [got.message.seq, true, 0]);

    // Node -> Python.
    const outcome = await alice.sendText("bob", "hello bob, from node");
    assert.ok(["delivered", "stored"].includes(outcome.status), show(outcome));
    const heard = await peer.ask({ cmd: "listen", from: "alice", count: 1 });
    assert.equal(heard.messages[0].text, "hello bob, from node");
    assert.equal(heard.messages[0].from, "alice");

    // Bob (Python) reads: alice's device hears it (✓✓ on her message).
    const bobRead = waitFor(alice, "read", (r) => r.reader === "bob", "bob's read");
    const bobMark = await peer.ask({ cmd: "read", with: "alice" });
    const notice = await bobRead;
    assert.deepEqual([notice.own, notice.conversation, notice.seq], [false, key, BigInt(bobMark.mark.seq)]);
    assert.equal(alice.reads.peerRead(key), alice.reads.newest(key), "her newest message is read");

    // Alice sends from her other device (cim-client): this one shows it as hers, once.
    const mine = waitFor(alice, "message", (m) => m.message.text === "from my other device", "her own copy");
    const otherSent = await peer.ask({ cmd: "send", as: "alice", to: "bob", text: "from my other device" });
    assert.ok(["delivered", "stored"].includes(otherSent.outcome.status), show(otherSent));
    const bobGot = await peer.ask({ cmd: "listen", from: "alice", count: 1 });
    assert.equal(bobGot.messages[0].text, "from my other device");
    const copy = await mine;
    assert.deepEqual([copy.own, copy.message.from, copy.message.to, copy.live], [true, "alice", "bob", true]);
    assert.notEqual(copy.message.device, "node-1");
    assert.equal(alice.reads.unread(key), 0, "her own message is not unread");
    const devices = await alice.devices();
    assert.deepEqual(devices.filter((d) => d.thisDevice).map((d) => d.device), ["node-1"]);

    // Catch-up after an offline period: three messages while alice is away.
    await alice.stop(false);
    for (const n of [1, 2, 3]) await peer.ask({ cmd: "send", to: "alice", text: `while you were away ${n}` });
    const back = login(true);
    const received: string[] = [];
    // Her own earlier message may come back too (this device's cursor had not passed
    // it): a restarted device gets its conversation whole. Bob's three are the point.
    back.on("message", (m) => m.message.from === "bob" && received.push(m.message.text));
    const caughtUp = waitFor(back, "caughtUp", (r) => r.handed >= 3, "the catch-up of three");
    await back.start(30_000);
    await caughtUp;
    assert.deepEqual(received, ["while you were away 1", "while you were away 2", "while you were away 3"]);
    // The summary's count and what came: three unread, until she reads them.
    assert.equal(back.reads.unread(key), 3);
    assert.equal(back.reads.peerRead(key) > 0n, true, "bob's read mark came with the summary");
    await back.markRead(key);
    assert.equal(back.reads.unread(key), 0);

    // A file from JS (chunked: 64 KiB chunks), byte-identical in Python.
    const bytes = randomBytes(200_000);
    const progress: UploadProgress[] = [];
    const files = new FileClient(ready.files, () => back.token, "alice");
    const report = await files.upload(bytes, { name: "data.bin", mime: "application/octet-stream", onProgress: (p) => progress.push(p) });
    assert.equal(report.chunkCount, 4);
    assert.equal(progress.at(-1)!.fraction, 1);
    const sent = await back.sendFile("bob", report.file);
    assert.ok(["delivered", "stored"].includes(sent.status), show(sent));
    const fileMessage = await peer.ask({ cmd: "listen", from: "alice", count: 1 });
    const url = fileMessage.messages[0].media.url;
    const downloaded = await peer.ask({ cmd: "download", url });
    assert.equal(downloaded.sha256, createHash("sha256").update(bytes).digest("hex"));
  } finally {
    for (const client of clients) await client.stop().catch(() => undefined);
    await peer.stop();
    rmSync(workdir, { recursive: true, force: true });
  }
});
