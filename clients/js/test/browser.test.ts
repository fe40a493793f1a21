// The same package in a real browser: the protocol vectors' handshake and frames in
// headless Chromium (Debian's `chromium`, as .ci installs it), with the browser's own
// WebCrypto doing RSA-OAEP (opened again there with the node's key) and HKDF. The SDK is
// bundled for the browser by esbuild (pinned) exactly as an application would bundle it.
// Skipped where no Chromium is installed.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const CHROMIUM = [process.env["CHROMIUM"], "/usr/bin/chromium", "/usr/bin/chromium-browser"].find(
  (path): path is string => !!path && existsSync(path),
);
const dist = fileURLToPath(new URL("../src/", import.meta.url));
const vectorsPath = fileURLToPath(new URL("../../../../tests/vectors/protocol.json", import.meta.url));

const ENTRY = `
import { fromBinary, fromJson } from "@bufbuild/protobuf";
import vectors from ${JSON.stringify(vectorsPath)};
import { ClientHandshake, encodeFrame, pb } from ${JSON.stringify(join(dist, "index.js"))};
import { ESTABLISHED_OUTBOUND } from ${JSON.stringify(join(dist, "protocol", "frames.js"))};
import { fromHex, toHex } from ${JSON.stringify(join(dist, "protocol", "bytes.js"))};

async function run() {
  const out = [];
  const s = vectors.sessions[0];
  const queue = [fromHex(vectors.inputs.client_nonce), fromHex(vectors.inputs.secret)];
  const handshake = await ClientHandshake.create({
    serverKey: fromHex(vectors.server_key), token: vectors.inputs.token, device: vectors.inputs.device,
    suite: s.suite, offered: s.offered_suites, nowMs: vectors.inputs.timestamp_ms, random: () => queue.shift(),
  });
  const pem = vectors.node_key_pem.replace(/-----[^-]+-----/g, "").replace(/\\s+/g, "");
  const der = Uint8Array.from(atob(pem), (c) => c.charCodeAt(0));
  const key = await crypto.subtle.importKey("pkcs8", der, { name: "RSA-OAEP", hash: "SHA-256" }, false, ["decrypt"]);
  const hello = fromBinary(pb.ClientHelloSchema, handshake.helloBody.subarray(1));
  const opened = new Uint8Array(await crypto.subtle.decrypt({ name: "RSA-OAEP" }, key, hello.sealedKey));
  out.push("keymaterial:" + (toHex(opened) === s.key_material));
  const { sealer, opener, loginResult } = await handshake.finish(fromHex(s.reply_body));
  out.push("login:" + loginResult.user);
  let same = 0;
  for (const f of s.frames) {
    if (f.direction === "client_to_node") {
      const schema = ESTABLISHED_OUTBOUND.get(f.type_number);
      if (toHex(sealer.seal(encodeFrame(f.type_number, schema, fromJson(schema, f.json)))) === f.body) same++;
    } else if (toHex(opener.open(fromHex(f.body))) === f.plaintext) same++;
  }
  out.push("frames:" + same + "/" + s.frames.length);
  document.body.textContent = "RESULT " + out.join(" ");
}
run().catch((error) => { document.body.textContent = "RESULT error " + error; });
`;

function dumpDom(url: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(CHROMIUM!, ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom", url]);
    let out = "";
    child.stdout.on("data", (chunk) => (out += String(chunk)));
    const timer = setTimeout(() => child.kill("SIGKILL"), 60_000);
    child.on("error", reject);
    child.on("exit", () => {
      clearTimeout(timer);
      resolve(out);
    });
  });
}

test("the handshake and frames in headless Chromium, byte for byte", { skip: CHROMIUM ? false : "no Chromium installed" }, async () => {
  const workdir = mkdtempSync(join(tmpdir(), "cim-js-browser-"));
  const server = createServer((request, response) => {
    const name = request.url === "/smoke.js" ? "smoke.js" : "index.html";
    response.writeHead(200, { "Content-Type": name.endsWith(".js") ? "text/javascript" : "text/html" });
    response.end(readFileSync(join(workdir, name)));
  });
  try {
    writeFileSync(join(workdir, "entry.mjs"), ENTRY);
    writeFileSync(join(workdir, "index.html"), '<!doctype html><body>pending<script type="module" src="/smoke.js"></script>');
    const bundled = await build({
      entryPoints: [join(workdir, "entry.mjs")],
      bundle: true,
      platform: "browser",
      format: "esm",
      outfile: join(workdir, "smoke.js"),
      nodePaths: [fileURLToPath(new URL("../../node_modules", import.meta.url))],
      logLevel: "silent",
    });
    assert.deepEqual(bundled.errors, []);
    assert.doesNotMatch(readFileSync(join(workdir, "smoke.js"), "utf8"), /from "ws"|require\("ws"\)/, "ws stays out of a browser bundle");
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const { port } = server.address() as { port: number };
    const dom = await dumpDom(`http://127.0.0.1:${port}/`);
    const frames = JSON.parse(readFileSync(vectorsPath, "utf8")).sessions[0].frames.length;
    assert.match(dom, new RegExp(`RESULT keymaterial:true login:alice frames:${frames}/${frames}`), dom.slice(0, 500));
  } finally {
    server.close();
    rmSync(workdir, { recursive: true, force: true });
  }
});
