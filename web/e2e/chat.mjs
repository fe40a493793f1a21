// Acceptance 3 of issue #18, in a real browser: Debian's headless Chromium driven by
// playwright-core (no browser download), against a real daemon that
// tests/integration/test_web_app.py starts and describes in the environment:
//
//   CIM_WEB_URL     the app, served by [web]      CIM_ROUTER, CIM_LOGIC, CIM_FILES
//   CIM_PASSWORD    alice's and bob's password     CIM_SHOTS  where screenshots go
//   CIM_CHROMIUM    the browser (default /usr/bin/chromium)
//   CIM_CLIENT      the Python CLI, cim-client (alice's other device)
//
// Each step prints "ok <step>" or "skip <step>: why"; any failure prints
// "FAILED <step>: why" and exits 1. Console errors and page errors fail the run.
import { chromium } from "playwright-core";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";
import { deflateSync } from "node:zlib";

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};
const WEB = env("CIM_WEB_URL");
const PASSWORD = env("CIM_PASSWORD");
const SHOTS = env("CIM_SHOTS");
const query = new URLSearchParams({ router: env("CIM_ROUTER"), logic: env("CIM_LOGIC"), files: env("CIM_FILES") });
const APP = `${WEB}/?${query}`;
const STEP_TIMEOUT = 20_000;

let step = "start";
const consoleErrors = [];

function ok(name, detail = "") {
  console.log(`ok ${name}${detail ? `: ${detail}` : ""}`);
}

// --- a PNG made here (an image the file service can thumbnail) -----------------------

function crc32(bytes) {
  let crc = ~0;
  for (const byte of bytes) {
    crc ^= byte;
    for (let k = 0; k < 8; k++) crc = (crc >>> 1) ^ (0xedb88320 & -(crc & 1));
  }
  return ~crc >>> 0;
}

function chunk(type, data) {
  const out = Buffer.alloc(12 + data.length);
  out.writeUInt32BE(data.length, 0);
  out.write(type, 4, "ascii");
  data.copy(out, 8);
  out.writeUInt32BE(crc32(out.subarray(4, 8 + data.length)), 8 + data.length);
  return out;
}

function png(width, height) {
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header.set([8, 2, 0, 0, 0], 8); // 8-bit RGB
  const rows = Buffer.alloc((width * 3 + 1) * height);
  for (let y = 0; y < height; y++) {
    const row = y * (width * 3 + 1);
    for (let x = 0; x < width; x++) {
      const at = row + 1 + x * 3;
      rows[at] = (x * 255) / width;
      rows[at + 1] = (y * 255) / height;
      rows[at + 2] = 180;
    }
  }
  const signature = Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]);
  return Buffer.concat([signature, chunk("IHDR", header), chunk("IDAT", deflateSync(rows)), chunk("IEND", Buffer.alloc(0))]);
}

// --- the pages -----------------------------------------------------------------------

function observed(page, who) {
  page.on("console", (message) => {
    if (message.type() === "error") consoleErrors.push(`${who}: console: ${message.text()}`);
  });
  page.on("pageerror", (error) => consoleErrors.push(`${who}: page error: ${error.message}`));
  page.setDefaultTimeout(STEP_TIMEOUT);
  return page;
}

/**
 * Log in with the keyboard alone: type, Tab, type, Enter; `register`: Tab on past
 * "Log in" to "Register" and press Enter there (a new account, then the login).
 */
async function logIn(page, user, register = false) {
  await page.goto(APP);
  await page.locator("#login-user").waitFor();
  await page.keyboard.type(user); // the user field has the focus when the page opens
  await page.keyboard.press("Tab");
  await page.keyboard.type(PASSWORD);
  if (register) {
    await page.keyboard.press("Tab");
    await page.keyboard.press("Tab");
    const focused = await page.evaluate(() => document.activeElement?.id);
    if (focused !== "register-submit") throw new Error(`Tab led to #${focused}, not the Register button`);
  }
  await page.keyboard.press("Enter");
  await page.locator('#connection[data-state="online"]').waitFor();
  await page.locator("#chat").waitFor({ state: "visible" });
}

function conversationButton(page, key) {
  return page.locator(`.conversation-button[data-key="${key}"]`);
}

function message(page, text) {
  return page.locator("#messages li.msg", { hasText: text });
}

async function markOf(page, text) {
  return page.locator("#messages li.msg.mine", { hasText: text }).locator(".mark").getAttribute("data-mark");
}

async function waitMark(page, text, marks) {
  const selector = marks.map((mark) => `[data-mark="${mark}"]`).join(", ");
  await page.locator("#messages li.msg.mine", { hasText: text }).locator(".mark").and(page.locator(selector)).waitFor();
  return markOf(page, text);
}

/**
 * One cim-client command as `user` on the device `device` (the CLI logs in, does it and
 * logs out); its JSON answer. A non-zero exit throws with what it said.
 */
async function cli(user, device, ...args) {
  const command = [env("CIM_CLIENT"), "--router", env("CIM_ROUTER"), "--user", user, "--device", device, ...args];
  const { stdout } = await promisify(execFile)(command[0], command.slice(1), {
    env: { ...process.env, CIM_PASSWORD: PASSWORD },
    timeout: 60_000,
  });
  return JSON.parse(stdout);
}

/** One call to the router or the logic service, as the watch (a Node script here) makes it. */
async function call(base, method, path, body, token) {
  const headers = { "Content-Type": "application/json", ...(token ? { Authorization: `Bearer ${token}` } : {}) };
  const response = await fetch(`${base}/api/v1${path}`, { method, headers, ...(body ? { body: JSON.stringify(body) } : {}) });
  const text = await response.text();
  if (!response.ok) throw new Error(`${method} ${path}: HTTP ${response.status} ${text}`);
  return text ? JSON.parse(text) : {};
}

/**
 * The guardian's side of an SOS, in the page: a watch (kind device) is bound to carol
 * with its binding code, carol logs in on the web, the watch raises an SOS, carol's
 * page shows it on top of everything and her Acknowledge calls the logic API.
 */
async function sosFlow(browser) {
  const router = env("CIM_ROUTER");
  const logic = env("CIM_LOGIC");
  await call(logic, "POST", "/register", { name: "watch1", password: PASSWORD, kind: "device" });
  await call(logic, "POST", "/register", { name: "carol", password: PASSWORD, kind: "person" });
  const watch = (await call(router, "POST", "/login", { user: "watch1", password: PASSWORD, device: "watch" })).token;
  const carolToken = (await call(router, "POST", "/login", { user: "carol", password: PASSWORD, device: "setup" })).token;
  const { code } = await call(logic, "POST", "/devices/me/binding-code", undefined, watch);
  const binding = await call(logic, "POST", "/bindings", { device: "watch1", code }, carolToken);
  if (binding.status !== "active") throw new Error(`the binding is ${binding.status}`);
  await call(router, "POST", "/logout", {}, carolToken);

  const carolContext = await browser.newContext({ viewport: { width: 1000, height: 700 } });
  const carol = observed(await carolContext.newPage(), "carol");
  await logIn(carol, "carol");
  const raised = await call(logic, "POST", "/sos", { lat: 31.2304, lon: 121.4737, battery: 35 }, watch);
  const id = raised.id ?? raised.sos ?? raised.event;
  const alarm = carol.locator(`#alarms .alarm[data-sos="${id}"]`);
  await alarm.locator(".alarm-text", { hasText: "SOS from watch1" }).waitFor();
  await carol.screenshot({ path: join(SHOTS, "web-carol-sos.png") });
  const acknowledge = alarm.getByRole("button", { name: "Acknowledge" });
  await acknowledge.focus();
  await carol.keyboard.press("Enter");
  await alarm.and(carol.locator(".handled")).waitFor();
  const event = await call(logic, "GET", `/sos/${id}`, undefined, watch);
  const state = event.status ?? event.state ?? (event.handled_by ? "handled" : "open");
  if (event.handled_by !== "carol") throw new Error(`the SOS was not acknowledged by carol: ${JSON.stringify(event)}`);
  await carolContext.close();
  return { id, state: `${state} by ${event.handled_by}` };
}

async function main() {
  // No --user-data-dir: launch() gives each run a fresh temporary profile of its own.
  const browser = await chromium.launch({
    executablePath: env("CIM_CHROMIUM", "/usr/bin/chromium"),
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
    ],
  });
  try {
    // Alice on a desktop-sized window, bob on a phone-sized one.
    const aliceContext = await browser.newContext({ viewport: { width: 1000, height: 700 } });
    const bobContext = await browser.newContext({ viewport: { width: 390, height: 740 }, isMobile: false, hasTouch: true });
    const alice = observed(await aliceContext.newPage(), "alice");
    let bob = observed(await bobContext.newPage(), "bob");

    step = "alice logs in, bob registers and is logged in";
    await logIn(alice, "alice");
    await logIn(bob, "bob", true);
    ok(step);

    step = "alice opens a chat with bob and sends a text with Enter";
    await alice.locator("#new-chat-user").fill("bob");
    await alice.locator("#new-chat-user").press("Enter");
    await alice.locator("#compose").waitFor({ state: "visible" });
    if (!(await alice.evaluate(() => document.activeElement?.id === "compose"))) throw new Error("the composer does not have the focus");
    await alice.keyboard.type("Hello bob, from the web");
    await alice.keyboard.press("Enter");
    await message(alice, "Hello bob, from the web").waitFor();
    ok(step);

    step = "bob sees the text live";
    await conversationButton(bob, "user:alice").waitFor();
    await conversationButton(bob, "user:alice").click();
    await message(bob, "Hello bob, from the web").waitFor();
    ok(step);

    step = "alice sends an image; the progress bar reaches 100%";
    await alice.evaluate(() => {
      const bar = document.getElementById("upload-progress");
      window.__progress = [];
      new MutationObserver(() => window.__progress.push(Number(bar.dataset.percent))).observe(bar, { attributes: true, attributeFilter: ["data-percent"] });
    });
    await alice.locator("#attach").setInputFiles({ name: "gradient.png", mimeType: "image/png", buffer: png(480, 320) });
    await alice.locator('#upload-progress[data-percent="100"]').waitFor();
    await alice.locator("#upload-label", { hasText: "Uploaded gradient.png" }).waitFor();
    const seen = await alice.evaluate(() => window.__progress);
    ok(step, `progress seen ${seen.join(" ")}`);

    step = "bob sees the image live with its thumbnail";
    const thumb = bob.locator("#messages li.msg.image img.thumb");
    await thumb.waitFor();
    await bob.waitForFunction(() => {
      const img = document.querySelector("#messages li.msg.image img.thumb");
      return img !== null && img.complete && img.naturalWidth > 0 && img.src.startsWith("blob:");
    });
    const size = await thumb.evaluate((img) => `${img.naturalWidth}x${img.naturalHeight}`);
    ok(step, `thumbnail ${size}`);

    step = "bob has the conversation open, so he has read both, alice sees them marked read";
    const textMark = await waitMark(alice, "Hello bob, from the web", ["read"]);
    await alice.locator('#messages li.msg.mine.image .mark[data-mark="read"]').waitFor();
    const label = await alice.locator('#messages li.msg.mine.image .mark').getAttribute("aria-label");
    ok(step, `text ${textMark}, image ${label}`);

    step = "alice types, bob sees that she is typing";
    await alice.locator("#compose").focus();
    await alice.keyboard.type("See you");
    await bob.locator("#typing", { hasText: "alice is typing…" }).waitFor();
    await alice.keyboard.type(" at 5");
    await alice.keyboard.press("Enter");
    await message(bob, "See you at 5").waitFor();
    await bob.locator("#typing:empty").waitFor({ state: "attached" });
    ok(step);

    step = "alice edits one message and recalls another, bob sees both changes";
    await waitMark(alice, "See you at 5", ["sent", "delivered", "read"]);
    await message(alice, "See you at 5").getByRole("button", { name: "Edit this message" }).click();
    if ((await alice.locator("#compose").inputValue()) !== "See you at 5") throw new Error("the composer does not hold the text to edit");
    await alice.locator("#compose").fill("See you at 6");
    await alice.locator("#compose").press("Enter");
    await message(bob, "See you at 6").locator(".edited:not([hidden])").waitFor();
    await alice.locator("#compose").fill("Oops, wrong chat");
    await alice.locator("#compose").press("Enter");
    await message(bob, "Oops, wrong chat").waitFor();
    await waitMark(alice, "Oops, wrong chat", ["sent", "delivered", "read"]);
    await message(alice, "Oops, wrong chat").getByRole("button", { name: "Recall this message" }).click();
    await message(bob, "Message recalled").waitFor();
    await message(alice, "You recalled this message").waitFor();
    if (await message(bob, "Oops, wrong chat").count()) throw new Error("bob still sees the recalled text");
    ok(step);

    step = "alice sends a file, bob downloads the same bytes";
    const notes = Buffer.from("minutes of the meeting\n".repeat(200));
    await alice.locator("#attach").setInputFiles({ name: "notes.txt", mimeType: "text/plain", buffer: notes });
    await alice.locator("#upload-label", { hasText: "Uploaded notes.txt" }).waitFor();
    const file = message(bob, "File: notes.txt (4.5 KiB)");
    await file.waitFor();
    const [download] = await Promise.all([bob.waitForEvent("download"), file.getByRole("link", { name: "Download" }).click()]);
    const saved = await download.path();
    const { readFileSync } = await import("node:fs");
    if (!readFileSync(saved).equals(notes)) throw new Error("the downloaded file differs from the one sent");
    ok(step, `${notes.length} bytes as ${download.suggestedFilename()}`);

    step = "bob's page is closed; alice sends three more";
    await bob.close();
    for (const text of ["First while you were away", "Second while you were away", "Third while you were away"]) {
      await alice.locator("#compose").fill(text);
      await alice.locator("#compose").press("Enter");
      await waitMark(alice, text, ["sent", "delivered", "read"]);
    }
    ok(step);

    step = "bob opens the page again, the conversation shows 3 unread and the three messages";
    bob = observed(await bobContext.newPage(), "bob");
    await logIn(bob, "bob");
    const unread = conversationButton(bob, "user:alice").locator(".unread");
    await unread.and(bob.locator(":not([hidden])")).waitFor();
    await bob.waitForFunction(() => document.querySelector('.conversation-button[data-key="user:alice"] .unread')?.textContent === "3");
    const preview = await conversationButton(bob, "user:alice").locator(".preview").textContent();
    if (preview !== "Third while you were away") throw new Error(`the list's preview is ${JSON.stringify(preview)}`);
    await bob.screenshot({ path: join(SHOTS, "web-bob-unread.png") });
    await conversationButton(bob, "user:alice").focus();
    await bob.keyboard.press("Enter");
    for (const text of ["First while you were away", "Second while you were away", "Third while you were away"]) await message(bob, text).waitFor();
    await bob.locator('.conversation-button[data-key="user:alice"] .unread[hidden]').waitFor({ state: "attached" });
    await waitMark(alice, "Third while you were away", ["read"]); // bob read them: alice sees it
    ok(step, `preview ${JSON.stringify(preview)}`);

    step = "alice is also logged in from the Python CLI and her web page shows the message she sent there";
    const fromCli = "Sent from my terminal";
    const devices = (await cli("alice", "cli", "devices")).items.map((d) => d.device);
    const webDevices = devices.filter((name) => /^web-[a-z0-9]{8}$/.test(name));
    if (webDevices.length !== 1 || !devices.includes("cli")) throw new Error(`alice's devices online: ${devices.join(" ")}`);
    const sentFromCli = await cli("alice", "cli", "send", "--timeout", "30", "bob", fromCli);
    if (!["delivered", "stored"].includes(sentFromCli.status)) throw new Error(`cim-client send: ${JSON.stringify(sentFromCli)}`);
    // On alice's page: hers (right side, a mark, "via cli"), in the chat with bob, not unread.
    const hers = alice.locator("#messages li.msg.mine", { hasText: fromCli });
    await hers.locator(".via", { hasText: "via cli" }).waitFor();
    await waitMark(alice, fromCli, ["read"]); // bob has the chat open: he read it, she sees it
    const aliceCopies = await message(alice, fromCli).count();
    if (aliceCopies !== 1) throw new Error(`alice's page shows the CLI message ${aliceCopies} times`);
    if ((await alice.locator("#conversation-title").textContent())?.includes("bob") !== true) throw new Error("alice's page is not on the chat with bob");
    await conversationButton(alice, "user:bob").locator(".unread[hidden]").waitFor({ state: "attached" });
    const alicePreview = await conversationButton(alice, "user:bob").locator(".preview").textContent();
    if (alicePreview !== `You: ${fromCli}`) throw new Error(`alice's list says ${JSON.stringify(alicePreview)}`);
    await alice.locator('#connection[data-state="online"]').waitFor(); // the CLI did not take her page's place
    // On bob's page: from alice, once.
    await bob.locator("#messages li.msg.theirs", { hasText: fromCli }).waitFor();
    const bobCopies = await message(bob, fromCli).count();
    if (bobCopies !== 1) throw new Error(`bob's page shows the CLI message ${bobCopies} times`);
    ok(step, `alice's devices online: ${devices.join(", ")}; ${sentFromCli.status}, read on her page`);

    step = "screenshots";
    await alice.screenshot({ path: join(SHOTS, "web-alice.png") });
    await bob.screenshot({ path: join(SHOTS, "web-bob.png") });
    ok(step, SHOTS);

    step = "alice creates a group with bob and posts; bob sees it";
    await alice.locator("#new-group-box summary").click();
    await alice.locator("#new-group-name").fill("family");
    await alice.locator("#new-group-members").fill("bob");
    await alice.locator("#new-group-members").press("Enter");
    await alice.locator("#conversation-title", { hasText: "# family" }).waitFor();
    await bob.locator("#back").click(); // the phone-sized page: back to the list
    // bob is not alice's contact: he is invited (docs/privacy.md) and accepts.
    const invitation = bob.locator(".invitation", { hasText: "alice invites you to the group family" });
    await invitation.waitFor();
    await invitation.getByRole("button", { name: "Accept" }).click();
    await invitation.waitFor({ state: "detached" });
    const group = bob.locator('.conversation-button[data-key^="group:"]', { hasText: "# family" });
    await group.waitFor();
    await alice.locator("#compose").fill("Dinner at seven");
    await alice.locator("#compose").press("Enter");
    await waitMark(alice, "Dinner at seven", ["sent", "delivered", "read"]);
    await group.locator(".unread", { hasText: "1" }).waitFor();
    await group.click();
    await message(bob, "Dinner at seven").locator(".from", { hasText: "alice" }).waitFor();
    await bob.screenshot({ path: join(SHOTS, "web-bob-group.png") });
    ok(step);


    step = "a watch raises an SOS, its guardian carol sees it on top and acknowledges it";
    const sos = await sosFlow(browser);
    ok(step, `SOS ${sos.id} ${sos.state}`);

    step = "every control on the pages has a name, and the keyboard reaches it";
    for (const page of [alice, bob]) {
      const unnamed = await page.evaluate(() =>
        [...document.querySelectorAll("button, input, textarea, a[href], select")]
          .filter((el) => el.getClientRects().length > 0 || el.id === "attach")
          .filter((el) => {
            const labelled = (el.labels?.length ?? 0) > 0 || el.getAttribute("aria-label") || el.textContent?.trim();
            return !labelled || el.tabIndex < 0;
          })
          .map((el) => el.outerHTML.slice(0, 80)),
      );
      if (unnamed.length) throw new Error(`controls without a name or out of the tab order: ${unnamed.join(" | ")}`);
    }
    ok(step);

    step = "a second tab of alice's takes her device over, the first says so at its login form";
    const device = await alice.evaluate(() => localStorage.getItem("cim.device.alice"));
    const secondTab = observed(await aliceContext.newPage(), "alice's second tab");
    await logIn(secondTab, "alice");
    // The first tab was replaced (KICKED REPLACED): back at the login form, saying why.
    await alice.locator("#login-error", { hasText: "opened in another tab or window" }).waitFor();
    await alice.locator('#connection[data-state="offline"]').waitFor();
    const online = (await cli("alice", "cli", "devices")).items.map((d) => d.device).filter((name) => name.startsWith("web-"));
    if (online.join() !== device) throw new Error(`alice's web devices online: ${online.join(" ")}, this browser's is ${device}`);
    await secondTab.locator('#connection[data-state="online"]').waitFor(); // not taken back
    await secondTab.close();
    await logIn(alice, "alice"); // her choice: the first tab again
    ok(step, `one device ${device}`);

    step = "no console errors";
    if (consoleErrors.length) throw new Error(consoleErrors.join("\n"));
    ok(step);

    step = "the daemon stops, the pages show that they are offline and reconnecting";
    process.kill(Number(env("CIM_DAEMON_PID")), "SIGTERM");
    for (const page of [alice, bob]) {
      await page.locator('#connection[data-state="reconnecting"], #connection[data-state="connecting"]').waitFor({ timeout: 40_000 });
      await page.locator("#connection", { hasText: /reconnecting|Connecting/ }).waitFor();
    }
    await alice.screenshot({ path: join(SHOTS, "web-alice-reconnecting.png") });
    ok(step);
  } catch (error) {
    // What each page showed when the step failed, beside the other screenshots.
    for (const page of browser.contexts().flatMap((context) => context.pages())) {
      const who = page.url().length ? browser.contexts().indexOf(page.context()) : 0;
      await page.screenshot({ path: join(SHOTS, `failed-${who ? "bob" : "alice"}.png`) }).catch(() => undefined);
    }
    throw error;
  } finally {
    await browser.close();
  }
}

try {
  await main();
  console.log("PASSED web app end to end");
} catch (error) {
  console.log(`FAILED ${step}: ${error instanceof Error ? error.message : String(error)}`);
  if (consoleErrors.length) console.log(`console errors:\n${consoleErrors.join("\n")}`);
  process.exit(1);
}
