// The session against a node in memory (test/support/fake-node.ts): router login,
// hello, the six packets, heartbeats, reconnects, dedup, order, gaps, catch-up.
import assert from "node:assert/strict";
import { test } from "node:test";
import { pb } from "../src/protocol/frames.js";
import type { DeliveryOutcome } from "../src/session/delivery.js";
import { SessionRefused, Unreachable } from "../src/session/dialing.js";
import { settle, until } from "./support/fake-clock.js";
import { FakeNode, WS_URL, WS_URL_2 } from "./support/fake-node.js";
import { online, setup, texts } from "./support/session.js";

const T = pb.FrameType;

test("logs in through the second router when the first is down, then summary first", async () => {
  const s = await online();
  assert.equal(s.node.routerLogins, 1);
  assert.equal(s.node.link.token.startsWith("token-1-"), true);
  assert.equal(s.node.link.device, "web-1");
  assert.equal(s.node.link.received[0]!.type, T.OFFLINE_SUMMARY_R);
  assert.deepEqual(
    s.seen.state.map((e) => e.state),
    ["connecting", "online"],
  );
  assert.equal(s.seen.online[0]!.loginResult.user, "alice");
});

test("sending: msg:R, msg:A, ack:N delivered; the outcome is reported once", async () => {
  const s = await online();
  const sent = s.client.sendText("bob", "hi bob");
  await until(() => s.node.link.of(T.MSG_R).length === 1, "MSG_R");
  const request = s.node.link.of(T.MSG_R)[0];
  assert.equal(request.to, "bob");
  assert.equal(request.text, "hi bob");
  assert.equal(request.prevSeq, 0n);
  s.node.link.send(T.MSG_A, pb.MsgASchema, { clientSeq: request.clientSeq, msgId: 77n, conversation: "d:alice:bob", seq: 1n });
  s.node.link.send(T.ACK_N, pb.AckNSchema, { clientSeq: request.clientSeq, msgId: 77n, status: pb.DeliveryStatus.DELIVERED, to: "bob" });
  const outcome: DeliveryOutcome = await sent;
  assert.deepEqual({ ...outcome }, { clientSeq: request.clientSeq, msgId: 77n, to: "bob", status: "delivered", reason: "" });
  assert.equal(s.seen.outcome.length, 1);
  // The next message to bob names this one as its previous.
  void s.client.sendText("bob", "again");
  await until(() => s.node.link.of(T.MSG_R).length === 2, "second MSG_R");
  assert.equal(s.node.link.of(T.MSG_R)[1].prevSeq, request.clientSeq);
});

test("auto retry: the same msg:R again after 10 s and 40 s, failed at 160 s", async () => {
  const s = await online();
  const sent = s.client.sendText("bob", "anyone?");
  await until(() => s.node.link.of(T.MSG_R).length === 1, "MSG_R");
  s.clock.advance(10_000);
  await until(() => s.node.link.of(T.MSG_R).length === 2, "the first resend");
  s.clock.advance(30_000);
  await until(() => s.node.link.of(T.MSG_R).length === 3, "the second resend");
  const seqs = new Set(s.node.link.of(T.MSG_R).map((m) => m.clientSeq));
  assert.equal(seqs.size, 1, "a resend keeps its client_seq");
  s.clock.advance(120_000);
  const outcome = await sent;
  assert.equal(outcome.status, "failed");
  assert.match(outcome.reason, /no ack:N within 160 s/);
});

test("manual retry: a dropped connection fails the message; resend sends it again", async () => {
  const s = await online({ retry: "manual" });
  const sent = s.client.sendText("bob", "hello?");
  await until(() => s.node.link.of(T.MSG_R).length === 1, "MSG_R");
  s.node.link.drop();
  const outcome = await sent;
  assert.equal(outcome.status, "failed");
  s.clock.advance(500);
  await until(() => s.client.state === "online" && s.node.links.length === 2, "reconnected");
  const again = s.client.resend(outcome.clientSeq);
  await until(() => s.node.link.of(T.MSG_R).length === 1, "the resend");
  const request = s.node.link.of(T.MSG_R)[0];
  assert.equal(request.clientSeq, outcome.clientSeq);
  s.node.link.send(T.ACK_N, pb.AckNSchema, { clientSeq: request.clientSeq, msgId: 9n, status: pb.DeliveryStatus.STORED });
  assert.equal((await again).status, "stored");
});

test("receiving: handed over in order, ack:R with the watermark, duplicates dropped but acknowledged", async () => {
  const s = await online();
  const link = s.node.link;
  const message = (id: bigint, seq: bigint, text: string, clientSeq = seq) => ({
    id, from: "bob", to: "alice", device: "phone", text, conversation: "d:alice:bob", seq, clientSeq,
  });
  link.send(T.MSG_N, pb.MessageSchema, message(1n, 1n, "one"));
  link.send(T.MSG_N, pb.MessageSchema, message(1n, 1n, "one again (same id)"));
  link.send(T.MSG_N, pb.MessageSchema, message(2n, 2n, "two"));
  // A resend the node took anew: new id, new seq, same sender device and client_seq.
  link.send(T.MSG_N, pb.MessageSchema, message(3n, 3n, "two, taken twice", 2n));
  await until(() => link.of(T.ACK_R).length === 4, "four ack:R");
  assert.deepEqual(texts(s), ["one", "two"]);
  assert.deepEqual(
    link.of(T.ACK_R).map((a) => [a.msgId, a.throughSeq]),
    [[1n, 1n], [1n, 1n], [2n, 2n], [3n, 3n]],
  );
  assert.equal(s.client.inbox.duplicates, 2);
  assert.equal(s.seen.message.every((m) => m.live), true);
});

test("a gap is healed at once with HISTORY_R, then shown in order", async () => {
  const s = await online();
  const link = s.node.link;
  const base = { from: "bob", to: "alice", device: "phone", conversation: "d:alice:bob" };
  link.send(T.MSG_N, pb.MessageSchema, { ...base, id: 1n, seq: 1n, clientSeq: 1n, text: "one" });
  link.send(T.MSG_N, pb.MessageSchema, { ...base, id: 4n, seq: 4n, clientSeq: 4n, text: "four" });
  await until(() => link.of(T.HISTORY_R).length === 1, "the gap's HISTORY_R");
  const ask = link.of(T.HISTORY_R)[0];
  assert.deepEqual([ask.peer, ask.after, ask.before], ["bob", 1n, 4n]);
  assert.deepEqual(texts(s), ["one"], "four waits for the gap");
  link.send(T.HISTORY_A, pb.HistoryASchema, {
    requestId: ask.requestId,
    messages: [
      { ...base, id: 3n, seq: 3n, clientSeq: 3n, text: "three" },
      { ...base, id: 2n, seq: 2n, clientSeq: 2n, text: "two" },
    ],
  });
  await until(() => s.seen.message.length === 4, "the filled gap");
  assert.deepEqual(texts(s), ["one", "two", "three", "four"]);
  assert.equal(s.client.inbox.watermark("d:alice:bob"), 4n);
});

test("catch-up: summary first, newest conversation first, pages newest first, cursors acknowledged", async () => {
  const node = new FakeNode();
  node.autoSummary = false;
  const s = setup({}, node);
  void s.client.start();
  await until(() => node.links.length === 1 && node.link.of(T.OFFLINE_SUMMARY_R).length === 1, "the summary request");
  const link = node.link;
  link.send(T.OFFLINE_SUMMARY_A, pb.OfflineSummaryASchema, {
    requestId: link.of(T.OFFLINE_SUMMARY_R)[0].requestId,
    total: 3,
    conversations: [
      { conversation: "g:team", group: "team", count: 1, lastSeq: 8n, cursor: 7n },
      { conversation: "d:alice:bob", peer: "bob", count: 2, lastSeq: 5n, cursor: 3n },
    ],
    caughtUp: [{ conversation: "d:alice:carol", seq: 9n }],
  });
  await until(() => link.of(T.OFFLINE_R).length === 1, "the first pull");
  assert.equal(link.of(T.OFFLINE_R)[0].conversation, "g:team");
  link.send(T.OFFLINE_A, pb.OfflineASchema, {
    requestId: link.of(T.OFFLINE_R)[0].requestId,
    conversation: "g:team",
    messages: [{ id: 18n, from: "carol", group: "team", conversation: "g:team", seq: 8n, text: "team news" }],
  });
  await until(() => link.of(T.OFFLINE_R).length === 2, "the second pull");
  const second = link.of(T.OFFLINE_R)[1];
  assert.equal(second.conversation, "d:alice:bob");
  assert.deepEqual(second.acks.map((c: pb.Cursor) => [c.conversation, c.seq]), [["g:team", 8n]]);
  // Newest page first (seq 5), then the older one (seq 4).
  link.send(T.OFFLINE_A, pb.OfflineASchema, {
    requestId: second.requestId, conversation: "d:alice:bob", more: true, nextBefore: 5n,
    messages: [{ id: 15n, from: "bob", to: "alice", conversation: "d:alice:bob", seq: 5n, text: "five" }],
  });
  await until(() => link.of(T.OFFLINE_R).length === 3, "the older page");
  assert.equal(link.of(T.OFFLINE_R)[2].before, 5n);
  link.send(T.OFFLINE_A, pb.OfflineASchema, {
    requestId: link.of(T.OFFLINE_R)[2].requestId, conversation: "d:alice:bob",
    messages: [{ id: 14n, from: "bob", to: "alice", conversation: "d:alice:bob", seq: 4n, text: "four" }],
  });
  await until(() => s.seen.caughtUp.length === 1, "the end of the catch-up");
  assert.deepEqual(texts(s), ["team news", "five", "four"]);
  assert.equal(s.seen.message.every((m) => !m.live), true);
  const end = link.of(T.OFFLINE_ACK_R)[0];
  assert.deepEqual(end.cursors.map((c: pb.Cursor) => [c.conversation, c.seq]), [["d:alice:bob", 5n]]);
  assert.equal(s.seen.summary[0]!.total, 3);
  assert.equal(s.client.inbox.watermark("d:alice:carol"), 9n);
  assert.equal(s.seen.caughtUp[0]!.handed, 3);
});

test("heartbeats when quiet; the node's background pace after APP_STATE; a probe on coming back", async () => {
  const s = await online();
  const link = s.node.link;
  s.clock.advance(30_000);
  await until(() => link.heartbeats === 1, "a heartbeat after 30 s of quiet");
  s.client.setForeground(false);
  await until(() => link.of(T.APP_STATE_R).length === 1 && s.client.answers.size === 0, "APP_STATE_R answered");
  assert.equal(link.of(T.APP_STATE_R)[0].state, pb.AppState.APP_BACKGROUND);
  s.clock.advance(100_000);
  await settle();
  assert.equal(link.heartbeats, 1, "the node's background interval (120 s) is longer");
  s.clock.advance(20_000);
  await until(() => link.heartbeats === 2, "the background heartbeat at 120 s");
  s.client.setForeground(true);
  await until(() => link.heartbeats === 3, "the probe on coming back");
  await until(() => link.of(T.APP_STATE_R).length === 2, "back in the foreground, told");
  assert.equal(s.client.state, "online");
});

test("a node that refuses APP_STATE: the client stretches its background heartbeat itself", async () => {
  const node = new FakeNode();
  node.appStates = false;
  const s = await online({}, node);
  const link = s.node.link;
  s.client.setForeground(false);
  await until(() => s.client.answers.size === 0 && link.of(T.APP_STATE_R).length === 1, "the refusal");
  s.clock.advance(59_000);
  await settle();
  assert.equal(link.heartbeats, 0);
  s.clock.advance(1_000);
  await until(() => link.heartbeats === 1, "two thirds of the timeout");
});

test("typing goes out and comes in; recall and edit, sent and received", async () => {
  const s = await online();
  const link = s.node.link;
  const typing = s.client.typing("bob");
  await until(() => link.of(T.TYPING_R).length === 1, "TYPING_R");
  const ask = link.of(T.TYPING_R)[0];
  assert.deepEqual([ask.to, ask.state], ["bob", pb.TypingState.TYPING_STARTED]);
  link.send(T.TYPING_A, pb.TypingASchema, { requestId: ask.requestId });
  assert.equal((await typing).dropped, false);
  link.send(T.TYPING_N, pb.TypingNSchema, { from: "bob", device: "phone", to: "alice", state: pb.TypingState.TYPING_STARTED, conversation: "d:alice:bob" });
  await until(() => s.seen.typing.length === 1, "bob typing");
  // Bob's message, then his edit of it: the change event carries the message as it reads now.
  const base = { from: "bob", to: "alice", device: "phone", conversation: "d:alice:bob" };
  link.send(T.MSG_N, pb.MessageSchema, { ...base, id: 1n, seq: 1n, clientSeq: 1n, text: "helo" });
  link.send(T.MSG_N, pb.MessageSchema, { ...base, id: 2n, seq: 2n, clientSeq: 2n, text: "hello", change: pb.ChangeKind.EDIT, replaces: 1n, replacesSeq: 1n });
  await until(() => s.seen.change.length === 1, "the edit");
  const edit = s.seen.change[0]!.change;
  assert.deepEqual([edit.event, edit.msgId, edit.text, edit.message?.text, edit.message?.edited], ["edit", 1n, "hello", "hello", true]);
  assert.equal(s.seen.message.length, 1, "the change is not a new message");
  // Alice recalls her own message.
  const recalled = s.client.recall(77n);
  await until(() => link.of(T.CHANGE_R).length === 1, "CHANGE_R");
  const change = link.of(T.CHANGE_R)[0];
  assert.deepEqual([change.msgId, change.kind], [77n, pb.ChangeKind.RECALL]);
  link.send(T.CHANGE_A, pb.ChangeASchema, { requestId: change.requestId, msgId: 77n, kind: pb.ChangeKind.RECALL, conversation: "d:alice:bob", seq: 3n, entryId: 90n, replacesSeq: 2n });
  const made = await recalled;
  assert.deepEqual([made.event, made.entrySeq], ["recall", 3n]);
  assert.equal(s.client.inbox.watermark("d:alice:bob"), 3n, "the entry's place is this device's own");
  const tooLate = s.client.edit(1n, "x");
  await until(() => link.of(T.CHANGE_R).length === 2, "the second CHANGE_R");
  link.send(T.ERROR, pb.ErrorSchema, { code: pb.Error_Code.FORBIDDEN, requestType: T.CHANGE_R, requestId: link.of(T.CHANGE_R)[1].requestId, reason: "not_yours", message: "not yours" });
  await assert.rejects(tooLate, (error: unknown) => (error as { reason: string }).reason === "not_yours");
});

test("a silent node is left after the heartbeat timeout; the reconnect is fast (no router login)", async () => {
  const s = await online();
  s.node.echoHeartbeats = false;
  const waiting = s.client.sendText("bob", "while it dies");
  await until(() => s.node.link.of(T.MSG_R).length === 1, "MSG_R");
  s.clock.advance(90_000);
  await until(() => s.client.state === "reconnecting", "reconnecting");
  s.node.echoHeartbeats = true;
  s.clock.advance(500);
  await until(() => s.client.state === "online" && s.node.links.length === 2, "back online");
  assert.equal(s.node.routerLogins, 1, "the cached token was enough");
  // The waiting message goes again on the new connection (auto).
  await until(() => s.node.link.of(T.MSG_R).length === 1, "the resend after the reconnect");
  const request = s.node.link.of(T.MSG_R)[0];
  s.node.link.send(T.ACK_N, pb.AckNSchema, { clientSeq: request.clientSeq, msgId: 5n, status: pb.DeliveryStatus.DELIVERED });
  assert.equal((await waiting).status, "delivered");
});

test("an expired token on reconnect: log in through the router again", async () => {
  const s = await online();
  s.node.tokens.clear();
  s.node.link.drop();
  s.clock.advance(500);
  await until(() => s.node.routerLogins === 2 && s.client.state === "online", "a new login");
  // The resumption ticket died with the token (refused), then the full hello with the
  // cached token (INVALID_TOKEN), then the new login.
  assert.equal(s.node.links.length, 4, "the resume attempt, the cached token, then the new login");
});

test("WRONG_NODE on a fast reconnect: the router again, which knows where the session lives", async () => {
  const s = await online();
  s.node.redirects.set(WS_URL, { id: "node2", host: "10.0.0.2", port: 9000 });
  s.node.routerGateway = WS_URL_2;
  s.node.link.drop();
  s.clock.advance(500);
  await until(() => s.client.state === "online" && s.node.links.length === 3, "online on node2");
  assert.deepEqual(s.node.links.map((l) => l.url), [WS_URL, WS_URL, WS_URL_2]);
  assert.equal(s.node.routerLogins, 2);
  assert.equal(s.seen.online.at(-1)!.url, WS_URL_2);
});

test("a node's refusal is heard though the node closes right behind it (opening it is asynchronous)", async () => {
  const node = new FakeNode();
  node.redirects.set(WS_URL, { id: "node1", host: "127.0.0.1", port: 9000 });
  const s = setup({}, node);
  const started = s.client.start(2_000);
  await until(() => s.seen.state.some((e) => e.detail.startsWith("in ")), "the refused attempt, a retry scheduled");
  s.clock.advance(2_000);
  await assert.rejects(started, (error: unknown) => error instanceof Unreachable && /login refused: WRONG_NODE/.test(error.message));
});

test("WRONG_NODE naming a node with a gateway: followed at once with the same token", async () => {
  const s = await online();
  s.node.redirects.set(WS_URL, { id: "node2", host: "10.0.0.2", port: 9000, wsUrl: WS_URL_2 });
  s.node.link.drop();
  s.clock.advance(500);
  await until(() => s.client.state === "online" && s.node.links.length === 3, "online on node2");
  assert.deepEqual(s.node.links.map((l) => l.url), [WS_URL, WS_URL, WS_URL_2]);
  assert.equal(s.node.routerLogins, 1, "no new login: the token was good, only the node moved");
  assert.equal(s.node.links[2]!.token, s.node.links[0]!.token);
  assert.equal(s.client.ticket?.ws, WS_URL_2);
  assert.equal(s.client.ticket?.node.id, "node2");
  assert.equal(s.seen.online.at(-1)!.url, WS_URL_2);
});

test("reconnect backoff grows while the node is away", async () => {
  const s = await online();
  s.node.tokens.clear();
  s.node.unreachableRouters.add("http://router.test");
  s.node.link.drop();
  const waits: string[] = [s.seen.state.at(-1)!.detail];
  for (let i = 0; i < 4; i++) {
    const before = s.seen.state.length;
    s.clock.advance(60_000);
    await until(
      () => s.seen.state.slice(before).some((e) => e.state === "reconnecting" && e.detail.startsWith("in ")),
      "a scheduled retry",
    );
    waits.push(s.seen.state.slice(before).find((e) => e.detail.startsWith("in "))!.detail);
  }
  assert.deepEqual(waits, ["in 0.4 s", "in 0.4 s", "in 0.8 s", "in 1.5 s", "in 3.0 s"]);
});

test("KICKED logged in elsewhere: stopped, failed event, no reconnect", async () => {
  const s = await online();
  s.node.link.send(T.KICKED, pb.KickedSchema, { code: pb.Kicked_Code.LOGGED_IN_ELSEWHERE, reason: "elsewhere" });
  await until(() => s.client.state === "stopped", "stopped");
  assert.equal(s.seen.kicked.length, 1);
  assert.ok(s.seen.failed[0] instanceof SessionRefused);
  s.clock.advance(120_000);
  await settle();
  assert.equal(s.node.links.length, 1);
});

test("a wrong password refuses the session at once", async () => {
  const s = setup({ password: "wrong" });
  await assert.rejects(s.client.start(), (error: unknown) => {
    assert.ok(error instanceof SessionRefused);
    assert.match(error.message, /invalid_credentials/);
    return true;
  });
  assert.equal(s.client.state, "stopped");
});

test("a RATE_LIMITED message and the later ones of its conversation wait, then go in order", async () => {
  const s = await online();
  const link = s.node.link;
  void s.client.sendText("bob", "1");
  await until(() => link.of(T.MSG_R).length === 1, "the first");
  const first = link.of(T.MSG_R)[0];
  link.send(T.ERROR, pb.ErrorSchema, { code: pb.Error_Code.RATE_LIMITED, requestType: T.MSG_R, clientSeq: first.clientSeq, retryAfterMs: 250 });
  await settle();
  void s.client.sendText("bob", "2");
  void s.client.sendText("carol", "other conversation");
  await until(() => link.of(T.MSG_R).length === 2, "carol's message, not held");
  assert.equal(link.of(T.MSG_R)[1].to, "carol");
  s.clock.advance(250);
  await until(() => link.of(T.MSG_R).length === 3, "the probe");
  assert.equal(link.of(T.MSG_R)[2].text, "1");
  link.send(T.MSG_A, pb.MsgASchema, { clientSeq: first.clientSeq, msgId: 1n });
  await settle();
  s.clock.advance(250);
  await until(() => link.of(T.MSG_R).length === 4, "the next, after the spacing");
  assert.equal(link.of(T.MSG_R)[3].text, "2");
});

test("requests: history matched by request_id; UNAVAILABLE retried; a refusal rejects", async () => {
  const s = await online();
  const link = s.node.link;
  const page = s.client.history("bob", { limit: 20 });
  await until(() => link.of(T.HISTORY_R).length === 1, "HISTORY_R");
  const ask = link.of(T.HISTORY_R)[0];
  link.send(T.ERROR, pb.ErrorSchema, { code: pb.Error_Code.UNAVAILABLE, requestType: T.HISTORY_R, requestId: ask.requestId, retryAfterMs: 1000 });
  await settle();
  s.clock.advance(1000);
  await until(() => link.of(T.HISTORY_R).length === 2, "asked again");
  link.send(T.HISTORY_A, pb.HistoryASchema, { requestId: ask.requestId, more: true, nextBefore: 3n, messages: [{ id: 1n, text: "old", seq: 3n }] });
  const answer = await page;
  assert.equal(answer.messages[0]!.text, "old");
  assert.equal(answer.nextBefore, 3n);
  const group = s.client.createGroup("team", ["bob"]);
  await until(() => link.of(T.GROUP_R).length === 1, "GROUP_R");
  const create = link.of(T.GROUP_R)[0];
  assert.equal(create.op.case, "create");
  assert.deepEqual(create.op.value.members, ["bob"]);
  link.send(T.ERROR, pb.ErrorSchema, { code: pb.Error_Code.BAD_REQUEST, requestType: T.GROUP_R, requestId: create.requestId, message: "no" });
  await assert.rejects(group, /BAD_REQUEST: no/);
});

test("a group create is not repeated after a silence (it would make two groups)", async () => {
  const s = await online();
  const group = s.client.createGroup("team");
  await until(() => s.node.link.of(T.GROUP_R).length === 1, "GROUP_R");
  s.clock.advance(10_000);
  await assert.rejects(group, /not repeated/);
  assert.equal(s.node.link.of(T.GROUP_R).length, 1);
});

test("group posts, and messages from the group, in the group's seq order", async () => {
  const s = await online();
  const link = s.node.link;
  const posted = s.client.sendGroup("g1", "hello team");
  await until(() => link.of(T.MSG_R).length === 1, "the post");
  const post = link.of(T.MSG_R)[0];
  assert.deepEqual([post.group, post.to], ["g1", ""]);
  link.send(T.MSG_A, pb.MsgASchema, { clientSeq: post.clientSeq, msgId: 10n, conversation: "g:g1", seq: 1n });
  link.send(T.ACK_N, pb.AckNSchema, { clientSeq: post.clientSeq, msgId: 10n, status: pb.DeliveryStatus.ACCEPTED });
  assert.equal((await posted).status, "accepted");
  // A group the login's summary did not name (joined since) is pulled: the node knows
  // where the member starts.
  await until(() => link.of(T.OFFLINE_R).length === 1, "the new group's pull");
  assert.equal(link.of(T.OFFLINE_R)[0].conversation, "g:g1");
  link.send(T.OFFLINE_A, pb.OfflineASchema, { requestId: link.of(T.OFFLINE_R)[0].requestId, conversation: "g:g1" });
  link.send(T.MSG_N, pb.MessageSchema, { id: 11n, from: "bob", device: "d", group: "g1", conversation: "g:g1", seq: 2n, clientSeq: 1n, text: "hi alice" });
  await until(() => s.seen.message.length === 1, "bob's post");
  assert.equal(s.client.inbox.watermark("g:g1"), 2n, "her own post counts as shown");
});

test("stop() logs out at the router and fails what waits", async () => {
  const s = await online();
  const waiting = s.client.sendText("bob", "bye");
  await s.client.stop();
  assert.equal((await waiting).status, "failed");
  assert.equal(s.node.routerLogouts, 1);
  assert.equal(s.client.state, "stopped");
  assert.equal(s.node.link.socket.closedByClient, true);
});
