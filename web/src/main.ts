/**
 * The app: logs in through the SDK, feeds its events to the model and the model to
 * the page. One ChatClient per login; logging out stops it (and the router session).
 */
import { resolveServices, STORAGE_KEY, type Services } from "./config.js";
import { ChatModel, keyOfTimeline, SYSTEM_SENDER, TYPE, type Item, type MediaInfo } from "./model.js";
import { parseNotice } from "./notices.js";
import { conversationKey, mediaMessage, pb, ServiceError, WebChat, webDeviceName } from "./sdk.js";
import { acknowledgeSos, Files, register, type StoredFile } from "./services.js";
import { $, ChatView } from "./view.js";

const START_DEADLINE_MS = 20_000;
/** How long a "typing" notice shows without another (the node passes one per 3 s). */
const TYPING_SHOWN_MS = 6_000;
/** How often this page tells a conversation that its user is typing. */
const TYPING_EVERY_MS = 3_000;

let services: Services = resolveServices(window.location, localStorage.getItem(STORAGE_KEY));
let client: WebChat | undefined;
let model = new ChatModel("");
let view: ChatView | undefined;
let files: Files | undefined;
const historyLoaded = new Set<string>();
let renderQueued = false;
/** The own message being edited in the composer, if any. */
let editing: Item | undefined;
/** When this page last said "typing" in the open conversation (0: it has not, or stopped). */
let typingSaid = 0;

function input(id: string): HTMLInputElement {
  return $(id) as HTMLInputElement;
}

function describe(error: unknown): string {
  if (error instanceof ServiceError) return error.message;
  if (error instanceof Error) return error.message;
  return String(error);
}

function showError(id: string, error: unknown): void {
  $(id).textContent = error === "" ? "" : describe(error);
}

function render(): void {
  if (renderQueued) return;
  renderQueued = true;
  queueMicrotask(() => {
    renderQueued = false;
    view?.renderList();
    view?.renderMessages();
    view?.renderTyping(model.open === undefined ? [] : model.typingIn(model.open, Date.now()));
  });
}

// --- logging in ----------------------------------------------------------------------

function fillServers(): void {
  input("server-router").value = services.router;
  input("server-logic").value = services.logic;
  input("server-files").value = services.files;
}

function readServers(): void {
  const typed = { router: input("server-router").value, logic: input("server-logic").value, files: input("server-files").value };
  services = resolveServices({ ...window.location, search: "" }, JSON.stringify(typed));
  localStorage.setItem(STORAGE_KEY, JSON.stringify(services));
}

/**
 * This browser's device name for `user` (the SDK's webDeviceName: `web-` and 8 random
 * characters, made once and kept in localStorage): a reload is the same device, so the
 * node's catch-up cursor and read state stay with this browser. Another browser, or
 * another user here, is another name. Tabs of one browser share it: a second tab's login
 * takes the device over and the first stops (KICKED REPLACED) without reconnecting.
 */
function deviceFor(user: string): string {
  return webDeviceName(localStorage, `cim.device.${user}`);
}

async function logIn(registering: boolean): Promise<void> {
  const user = input("login-user").value.trim();
  const password = input("login-password").value;
  showError("login-error", "");
  if (!user || !password) {
    showError("login-error", "Type a user name and a password.");
    return;
  }
  readServers();
  const buttons = [$("login-submit"), $("register-submit")] as HTMLButtonElement[];
  for (const button of buttons) button.disabled = true;
  try {
    if (registering) await register(services.logic, user, password);
    await startSession(user, password);
  } catch (error) {
    await client?.stop(false).catch(() => undefined);
    client = undefined;
    showError("login-error", error);
    setConnection("offline", "");
  } finally {
    for (const button of buttons) button.disabled = false;
  }
}

async function startSession(user: string, password: string): Promise<void> {
  const device = deviceFor(user);
  model = new ChatModel(user, device);
  model.pageVisible = document.visibilityState !== "hidden";
  historyLoaded.clear();
  files?.forget();
  const fileService = new Files(services.files, () => session().token, user);
  files = fileService;
  view = new ChatView(model, {
    loadBlob: (url, mime) => fileService.blobUrl(url, mime),
    open: openConversation,
    acknowledge: (sos, button) => void acknowledge(sos, button),
    edit: startEditing,
    recall: (item) => void recall(item),
  });
  view.reset();
  const chat = new WebChat({ routers: services.router, user, password, device });
  client = chat;
  wire(chat);
  await chat.start(START_DEADLINE_MS);
  input("login-password").value = "";
  document.body.classList.replace("signed-out", "signed-in");
  $("login").hidden = true;
  $("chat").hidden = false;
  $("logout").hidden = false;
  const whoami = $("whoami");
  whoami.hidden = false;
  whoami.textContent = user;
  void loadGroups();
  void invitationsWanted();
  render();
  input("new-chat-user").focus();
}

/** The page's key of an SDK timeline key. */
function pageKey(chat: WebChat, timeline: string): string | undefined {
  const [peer, group] = chat.reads.where(timeline);
  if (group) return `group:${group}`;
  if (peer) return `user:${peer}`;
  return keyOfTimeline(chat.user, timeline);
}

/** The SDK's timeline key of the page's conversation. */
function timelineOf(key: string): string {
  const conversation = model.conversation(key);
  return conversationKey(model.me, conversation.group || conversation.peer, Boolean(conversation.group));
}

let marking = false;

/**
 * The user is looking at a conversation with unread messages: mark it read up to the
 * newest (READ_R; the user's other devices and a 1:1 peer hear of it). Once per turn.
 */
function markSeen(): void {
  if (marking) return;
  marking = true;
  queueMicrotask(() => {
    marking = false;
    const key = model.open;
    const chat = client;
    if (key === undefined || chat === undefined || !model.seeing(key)) return;
    const timeline = timelineOf(key);
    if (chat.reads.unread(timeline) === 0) return;
    chat.markRead(timeline).catch(() => undefined); // the next look tries again
  });
}

function session(): WebChat {
  if (client === undefined) throw new Error("not logged in");
  return client;
}

function setConnection(state: string, detail: string): void {
  const status = $("connection");
  status.dataset["state"] = state;
  const words: Record<string, string> = {
    online: "Online",
    connecting: "Connecting…",
    reconnecting: "Offline, reconnecting…",
    offline: "Offline",
    stopped: "Offline",
  };
  status.textContent = words[state] ?? state;
  status.title = detail;
}

function wire(chat: WebChat): void {
  /** KICKED REPLACED: this device logged in again elsewhere (another tab, most likely). */
  let replaced = false;
  chat.on("state", ({ state, detail }) => setConnection(state, detail));
  chat.on("summary", (summary) => {
    model.summary(summary.conversations.map((c) => ({ peer: c.peer, group: c.group, newest: c.newest })));
    render();
  });
  chat.on("unread", ({ conversation, unread }) => {
    const key = pageKey(chat, conversation);
    if (key === undefined) return;
    model.setUnread(key, unread);
    if (model.seeing(key) && unread > 0) markSeen();
    render();
  });
  chat.on("read", (event) => {
    const key = pageKey(chat, event.conversation);
    if (key === undefined) return;
    if (event.own) model.setUnread(key, event.unread); // read on another device
    else model.readThrough(key, Number(event.seq)); // the peer read ours: ✓✓ read
    render();
  });
  chat.on("message", ({ message }) => {
    if (message.group && !model.conversations.has(`group:${message.group}`)) namesWanted();
    const item = model.received(message);
    if (item !== undefined && message.type === TYPE.SYSTEM && message.from === SYSTEM_SENDER) notice(item);
    render();
  });
  chat.on("change", ({ change }) => {
    model.changed(change);
    render();
  });
  chat.on("typing", (notice) => {
    if (notice.from === model.me) return; // this user's other devices
    const key = notice.group ? `group:${notice.group}` : `user:${notice.from}`;
    const started = notice.state === pb.TypingState.TYPING_STARTED;
    model.typing(key, notice.from, started ? Date.now() + TYPING_SHOWN_MS : 0);
    render();
    if (started) setTimeout(render, TYPING_SHOWN_MS + 100);
  });
  chat.on("outcome", (outcome) => {
    model.outcome(outcome);
    render();
  });
  chat.onTaken = (answer) => {
    model.taken(answer.clientSeq, answer.msgId, answer.seq);
    render();
  };
  chat.on("failed", (error) => {
    showError("login-error", replaced ? `${model.me} was opened in another tab or window of this browser (it is one device, ${model.device}); log in to use it here.` : error);
    signOut(false);
  });
  chat.on("kicked", (kicked) => {
    replaced = kicked.code === pb.Kicked_Code.REPLACED;
    showError("chat-error", `The server ended this session: ${kicked.reason}`);
  });
  chat.on("error", (error) => showError("chat-error", `${error.message || "refused"}`));
}

/** A system notice: an SOS raised or handled goes to the alarm strip too, a group
 * invitation to the invitations strip. */
function notice(item: Item): void {
  const parsed = parseNotice(item.text);
  if (view === undefined) return;
  if (parsed.event === "group.invited") {
    const group = String(parsed.fields["group"] ?? "");
    if (group) void invitationsWanted();
    return;
  }
  if (parsed.sos === undefined) return;
  if (parsed.event === "sos.raised") view.alarm(parsed.sos, parsed.summary, false);
  if (parsed.event === "sos.handled") view.alarm(parsed.sos, parsed.summary, true);
}

async function acknowledge(sos: number, button: HTMLButtonElement): Promise<void> {
  button.disabled = true;
  try {
    await acknowledgeSos(services.logic, () => session().token, sos);
    view?.alarm(sos, `SOS ${sos} acknowledged`, true);
  } catch (error) {
    button.disabled = false;
    showError("chat-error", error);
  }
}

function signOut(logout: boolean): void {
  const chat = client;
  client = undefined;
  void chat?.stop(logout).catch(() => undefined);
  document.body.classList.replace("signed-in", "signed-out");
  $("chat").hidden = true;
  $("logout").hidden = true;
  $("whoami").hidden = true;
  $("login").hidden = false;
  setConnection("offline", "");
  view?.reset();
  input("login-user").focus();
}

// --- conversations -------------------------------------------------------------------

/** The pending group invitations, each with Accept and Decline. */
async function invitationsWanted(): Promise<void> {
  try {
    const answer = await session().groupRequest({ op: { case: "invitations", value: {} } });
    for (const invitation of answer.invitations) {
      const group = invitation.group;
      if (group === undefined) continue;
      const text = `${invitation.invitedBy || "someone"} invites you to the group ${group.name || group.id}`;
      view?.invitation(group.id, text, (accept) => answerInvitation(group.id, group.name, accept));
    }
  } catch (error) {
    showError("chat-error", error);
  }
}

async function answerInvitation(group: string, name: string, accept: boolean): Promise<void> {
  try {
    const answer = accept
      ? await session().acceptInvitation(group)
      : await session().groupRequest({ op: { case: "decline", value: { group } } });
    if (!answer.ok) throw new Error(`${answer.error}: ${answer.message}`);
    if (accept) {
      model.conversation(`group:${group}`, `# ${name || group}`);
      render();
    }
  } catch (error) {
    showError("chat-error", error);
    throw error;
  }
}

let namesAsked: Promise<void> | undefined;

/** A message from a group not yet listed (we were just added): ask for the names once. */
function namesWanted(): void {
  namesAsked ??= loadGroups().finally(() => {
    namesAsked = undefined;
  });
}

async function loadGroups(): Promise<void> {
  try {
    const answer = await session().listGroups();
    for (const group of answer.groups) model.conversation(`group:${group.id}`, `# ${group.name || group.id}`);
    render();
  } catch (error) {
    showError("chat-error", error);
  }
}

function openConversation(key: string): void {
  if (editing !== undefined) stopEditing();
  typingSaid = 0;
  stopTypingTimer();
  model.opened(key);
  const conversation = model.conversation(key);
  $("conversation-title").textContent = conversation.title;
  $("composer").hidden = false;
  $("add-members").hidden = !conversation.group;
  $("chat").classList.add("viewing");
  showError("chat-error", "");
  $("chat-info").textContent = "";
  if (!$("upload-label").textContent?.startsWith("Uploading")) $("upload").hidden = true;
  render();
  markSeen();
  input("compose").focus();
  if (!historyLoaded.has(key)) {
    historyLoaded.add(key);
    void loadHistory(key);
  }
}

async function loadHistory(key: string): Promise<void> {
  const conversation = model.conversation(key);
  try {
    const chat = session();
    const page = await chat.history(conversation.group || conversation.peer, { group: Boolean(conversation.group), limit: 50 });
    if (page.error) throw new Error(`${page.error}: ${page.message}`);
    for (const message of page.messages) model.received(message);
    model.readThrough(key, Number(chat.reads.peerRead(timelineOf(key)))); // read before this page
    markSeen();
    render();
  } catch (error) {
    historyLoaded.delete(key);
    showError("chat-error", error);
  }
}

function target(): { peer?: string; group?: string } | undefined {
  const key = model.open;
  if (key === undefined) return undefined;
  const conversation = model.conversation(key);
  return conversation.group ? { group: conversation.group } : { peer: conversation.peer };
}

function addressed(to: { peer?: string; group?: string }): { to?: string; group?: string } {
  return to.group ? { group: to.group } : { to: to.peer ?? "" };
}

function track(item: Item, sent: { clientSeq: bigint; outcome: Promise<unknown> }): void {
  if (sent.clientSeq) model.numbered(item, sent.clientSeq);
  void sent.outcome.then((outcome) => {
    const o = outcome as { clientSeq: bigint; msgId: bigint; status: string; reason: string };
    if (!item.clientSeq) model.numbered(item, o.clientSeq);
    model.outcome(o);
    if (o.status === "failed") showError("chat-error", `Not sent: ${o.reason}`);
    render();
  });
}

// --- typing, edits and recalls ------------------------------------------------------

/** When the user last typed in the composer (ms). */
let lastInput = 0;
let typingTimer: ReturnType<typeof setInterval> | undefined;

function sayTyping(stopped: boolean): void {
  const to = target();
  if (to === undefined || client === undefined) return;
  const where = to.group ?? to.peer ?? "";
  client.typing(where, { group: Boolean(to.group), stopped }).then(
    (answer) => {
      if (answer.dropped) typingSaid = 0; // the node's one per 3 s: the next tick says it again
    },
    () => undefined,
  );
}

function stopTypingTimer(): void {
  if (typingTimer !== undefined) clearInterval(typingTimer);
  typingTimer = undefined;
}

/**
 * The user typed in the composer: "typing" at once and again every few seconds while
 * they go on (docs/protocol.md, "Typing notices"); an emptied box says "stopped".
 */
function composing(): void {
  if (target() === undefined || editing !== undefined) return;
  const typed = ($("compose") as HTMLTextAreaElement).value.trim() !== "";
  lastInput = Date.now();
  if (!typed) {
    stopTypingTimer();
    if (typingSaid) sayTyping(true);
    typingSaid = 0;
    return;
  }
  const tick = () => {
    const now = Date.now();
    const stillTyping = now - lastInput < TYPING_SHOWN_MS && ($("compose") as HTMLTextAreaElement).value.trim() !== "";
    if (!stillTyping) {
      stopTypingTimer();
      return;
    }
    if (now - typingSaid >= TYPING_EVERY_MS) {
      typingSaid = now;
      sayTyping(false);
    }
  };
  tick();
  typingTimer ??= setInterval(tick, TYPING_EVERY_MS / 3);
}

function startEditing(item: Item): void {
  editing = item;
  const box = $("compose") as HTMLTextAreaElement;
  box.value = item.text;
  $("composer").classList.add("editing");
  $("cancel-edit").hidden = false;
  $("send").textContent = "Save";
  $("chat-info").textContent = "Editing a message: Enter saves, Escape cancels.";
  box.focus();
}

function stopEditing(): void {
  editing = undefined;
  ($("compose") as HTMLTextAreaElement).value = "";
  $("composer").classList.remove("editing");
  $("cancel-edit").hidden = true;
  $("send").textContent = "Send";
  $("chat-info").textContent = "";
}

async function saveEdit(item: Item, text: string): Promise<void> {
  stopEditing();
  if (text === item.text) return;
  try {
    const change = await session().edit(BigInt(item.msgId), text);
    model.changed(change);
    render();
  } catch (error) {
    showError("chat-error", `Not edited: ${describe(error)}`);
  }
}

async function recall(item: Item): Promise<void> {
  try {
    const change = await session().recall(BigInt(item.msgId));
    model.changed(change);
    if (editing === item) stopEditing();
    render();
  } catch (error) {
    showError("chat-error", `Not recalled: ${describe(error)}`);
  }
}

function sendText(): void {
  const to = target();
  const box = $("compose") as HTMLTextAreaElement;
  const text = box.value.trim();
  if (editing !== undefined) {
    if (text) void saveEdit(editing, text);
    return;
  }
  if (to === undefined || !text) return;
  box.value = "";
  typingSaid = 0;
  stopTypingTimer();
  const item = model.sending(to, "text", text);
  track(item, session().send({ ...addressed(to), text }));
  render();
}

function mediaOf(stored: StoredFile, file: File, service: Files): MediaInfo {
  return {
    url: service.absolute(stored.url),
    thumbnailUrl: service.absolute(stored.thumbnailUrl),
    name: stored.name || file.name,
    mime: stored.mime || file.type,
    size: stored.size,
    width: stored.width,
    height: stored.height,
  };
}

async function sendFile(file: File): Promise<void> {
  const to = target();
  const service = files;
  if (to === undefined || service === undefined) return;
  const isImage = file.type.startsWith("image/");
  const item = model.sending(to, isImage ? "image" : "file", file.name);
  const bar = $("upload-progress") as HTMLProgressElement;
  const label = $("upload-label");
  $("upload").hidden = false;
  label.textContent = `Uploading ${file.name}`;
  const shown = (fraction: number) => {
    const percent = Math.floor(fraction * 100);
    bar.value = percent;
    bar.dataset["percent"] = String(percent);
    item.progress = fraction;
    render();
  };
  shown(0);
  try {
    const stored = await service.upload(file, (progress) => shown(progress.fraction));
    shown(1);
    label.textContent = `Uploaded ${file.name}`;
    item.media = mediaOf(stored, file, service);
    item.progress = undefined;
    track(item, session().send({ ...addressed(to), ...mediaMessage({ ...stored, url: item.media.url, thumbnailUrl: item.media.thumbnailUrl }) }));
  } catch (error) {
    item.mark = "failed";
    item.progress = undefined;
    label.textContent = `Upload of ${file.name} failed`;
    showError("chat-error", error);
  }
  render();
}

// --- the page's controls -------------------------------------------------------------

function main(): void {
  fillServers();
  setConnection("offline", "");
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    void logIn(false);
  });
  $("register-submit").addEventListener("click", () => void logIn(true));
  $("logout").addEventListener("click", () => signOut(true));
  $("new-chat").addEventListener("submit", (event) => {
    event.preventDefault();
    const user = input("new-chat-user").value.trim();
    if (!user) return;
    input("new-chat-user").value = "";
    openConversation(`user:${user}`);
  });
  $("new-group").addEventListener("submit", (event) => {
    event.preventDefault();
    void createGroup();
  });
  $("add-members").addEventListener("submit", (event) => {
    event.preventDefault();
    void addMembers();
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    sendText();
  });
  $("compose").addEventListener("input", composing);
  $("cancel-edit").addEventListener("click", () => {
    stopEditing();
    input("compose").focus();
  });
  $("compose").addEventListener("keydown", (event) => {
    const key = event as KeyboardEvent;
    if (key.key === "Escape" && editing !== undefined) {
      key.preventDefault();
      stopEditing();
      return;
    }
    if (key.key === "Enter" && !key.shiftKey && !key.isComposing) {
      key.preventDefault();
      sendText();
    }
  });
  $("attach").addEventListener("change", () => {
    const picker = input("attach");
    const file = picker.files?.[0];
    picker.value = "";
    if (file !== undefined) void sendFile(file);
  });
  $("back").addEventListener("click", () => {
    $("chat").classList.remove("viewing");
    model.opened(undefined);
    render();
    const first = document.querySelector<HTMLButtonElement>(".conversation-button");
    (first ?? input("new-chat-user")).focus();
  });
  document.addEventListener("visibilitychange", () => {
    model.pageVisible = document.visibilityState !== "hidden";
    if (model.pageVisible) model.opened(model.open);
    markSeen();
    render();
  });
  input("login-user").focus();
}

/** Who was invited rather than added (they join when they accept). */
function membersSaid(invited: readonly string[], otherwise: string): string {
  return invited.length ? `Invited (they join when they accept): ${invited.join(", ")}.` : otherwise;
}

function users(raw: string): string[] {
  return raw
    .split(/[\s,]+/)
    .map((u) => u.trim())
    .filter(Boolean);
}

async function createGroup(): Promise<void> {
  const name = input("new-group-name").value.trim();
  if (!name) return;
  try {
    const answer = await session().createGroup(name, users(input("new-group-members").value));
    if (!answer.ok || answer.group === undefined) throw new Error(`${answer.error}: ${answer.message}`);
    input("new-group-name").value = "";
    input("new-group-members").value = "";
    ($("new-group-box") as HTMLDetailsElement).open = false;
    const key = `group:${answer.group.id}`;
    model.conversation(key, `# ${answer.group.name || answer.group.id}`);
    historyLoaded.add(key);
    openConversation(key);
    $("chat-info").textContent = membersSaid(answer.invited, "");
  } catch (error) {
    showError("chat-error", error);
  }
}

async function addMembers(): Promise<void> {
  const to = target();
  if (to?.group === undefined) return;
  try {
    const answer = await session().addMembers(to.group, users(input("add-members-users").value));
    if (!answer.ok) throw new Error(`${answer.error}: ${answer.message}`);
    input("add-members-users").value = "";
    $("chat-info").textContent = membersSaid(answer.invited, "Members added.");
  } catch (error) {
    showError("chat-error", error);
  }
}

main();
