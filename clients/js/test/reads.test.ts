// Read receipts: ReadState alone (unread counts, read points, the peer's mark), then
// the session against the node in memory (READ_R/READ_A, READ_N, READERS_R, the
// summary's counts, live messages, the read_receipts setting, the user's own messages
// from another device).
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import assert from "node:assert/strict";
import { test } from "node:test";
import { pb } from "../src/protocol/frames.js";
import { RequestRefused } from "../src/session/answers.js";
import { ReadState, conversationKey, type UnreadChange } from "../src/session/reads.js";
import { settle, until } from "./support/fake-clock.js";
import { FakeNode } from "./support/fake-node.js";
import { online, setup, texts, type Setup } from "./support/session.js";

const T = pb.FrameType;
const BOB = "d:alice:bob";

function message(seq: bigint, from = "bob", extra: MessageInitShape<typeof pb.MessageSchema> = {}): pb.Message {
  return create(pb.MessageSchema, {
    id: 100n + seq,
    from,
    to: from === "alice" ? "bob" : "alice",
    device: "phone",
    clientSeq: seq,
    conversation: BOB,
    seq,
    text: `m${seq}`,
    ...extra,
  });
}

test("conversationKey: 1:1 keys sorted and escaped as the node makes them, groups, keys as they are", () => {
  assert.equal(conversationKey("alice", "bob"), "d:alice:bob");
  assert.equal(conversationKey("bob", "alice"), "d:alice:bob");
  assert.equal(conversationKey("alice", "team", true), "g:team");
  assert.equal(conversationKey("c", "a:b"), "d:a%3Ab:c");
  assert.equal(conversationKey("x", "100%"), "d:100%25:x");
  assert.equal(conversationKey("alice", "g:team"), "g:team");
  // Python orders by code point: an astral character sorts after U+FFFD.
  assert.equal(conversationKey("\u{1F600}", "\uFFFD"), "d:\uFFFD:\u{1F600}");
});

test("ReadState: the summary's counts, live messages, own messages, READ_A and READ_N", () => {
  const reads = new ReadState("alice");
  const changes: UnreadChange[] = [];
  reads.onUnread = (change) => changes.push(change);
  reads.summary(
    create(pb.OfflineSummaryASchema, {
      total: 2,
      // Read on another device up to 3, this device's cursor at 1: the count is past 3.
      conversations: [{ conversation: BOB, peer: "bob", count: 2, lastSeq: 5n, cursor: 1n, readSeq: 3n, peerReadSeq: 4n }],
      caughtUp: [{ conversation: "d:alice:carol", seq: 9n }],
      peerReads: [{ conversation: "d:alice:carol", seq: 7n }],
    }),
  );
  assert.deepEqual([reads.unread(BOB), reads.unread("d:alice:carol"), reads.newest(BOB)], [2, 0, 5n]);
  assert.deepEqual([reads.peerRead(BOB), reads.peerRead("d:alice:carol"), reads.peerRead("d:alice:dan")], [4n, 7n, 0n]);
  assert.deepEqual(reads.where(BOB), ["bob", ""]);
  reads.received(message(6n));
  assert.equal(reads.unread(BOB), 3);
  reads.received(create(pb.MessageSchema, { id: 9n, from: "dan", group: "team", conversation: "g:team", seq: 4n }));
  assert.deepEqual([...reads.unreadCounts()], [[BOB, 3], ["g:team", 4]]);
  assert.equal(reads.totalUnread, 7);
  assert.deepEqual(reads.where("g:team"), ["", "team"]);
  // Alice's own message (another device): nobody has unread messages of their own.
  reads.received(message(7n, "alice"));
  assert.equal(reads.unread(BOB), 0);
  // Another device of hers read g:team up to 2 of 6.
  const own = reads.notice(create(pb.ReadNoticeSchema, { conversation: "g:team", reader: "alice", seq: 2n, lastSeq: 6n, group: "team" }));
  assert.deepEqual({ ...own }, { conversation: "g:team", reader: "alice", seq: 2n, own: true, unread: 4, peer: "", group: "team" });
  // Bob read hers up to 7: ✓✓, her counts do not move.
  const peer = reads.notice(create(pb.ReadNoticeSchema, { conversation: BOB, reader: "bob", seq: 7n, peer: "bob" }));
  assert.deepEqual([peer.own, peer.unread, reads.peerRead(BOB)], [false, 0, 7n]);
  // Marks only rise: an older notice and a lower READ_A change nothing.
  reads.notice(create(pb.ReadNoticeSchema, { conversation: BOB, reader: "bob", seq: 5n }));
  assert.equal(reads.peerRead(BOB), 7n);
  reads.marked(create(pb.ReadASchema, { conversation: "g:team", seq: 1n, lastSeq: 6n }));
  assert.equal(reads.unread("g:team"), 4);
  reads.marked(create(pb.ReadASchema, { conversation: "g:team", seq: 6n, lastSeq: 6n, moved: true }));
  reads.sent("d:alice:carol", 10n);
  assert.deepEqual([...reads.unreadCounts()], []);
  assert.deepEqual(
    changes.map((c) => [c.conversation, c.unread]),
    [[BOB, 2], [BOB, 3], ["g:team", 4], [BOB, 0], ["g:team", 0]],
  );
});

/** Log in with `summary` as the node's answer; each pull gets an empty last page. */
async function loginWith(summary: MessageInitShape<typeof pb.OfflineSummaryASchema>): Promise<Setup> {
  const node = new FakeNode();
  node.autoSummary = false;
  const auto = node.onFrame;
  node.onFrame = (link, frame) => {
    auto(link, frame);
    if (frame.type === T.OFFLINE_SUMMARY_R) {
      link.send(T.OFFLINE_SUMMARY_A, pb.OfflineSummaryASchema, { ...summary, requestId: frame.message.requestId });
    } else if (frame.type === T.OFFLINE_R) {
      link.send(T.OFFLINE_A, pb.OfflineASchema, { requestId: frame.message.requestId, conversation: frame.message.conversation });
    }
  };
  return online({}, node);
}

test("unread counts from the summary and live messages; markRead marks the newest, READ_A clears it", async () => {
  const s = await loginWith({
    total: 2,
    conversations: [{ conversation: BOB, peer: "bob", count: 2, lastSeq: 5n, cursor: 3n, peerReadSeq: 2n }],
  });
  const link = s.node.link;
  assert.equal(s.client.reads.unread(BOB), 2);
  assert.equal(s.client.reads.peerRead(BOB), 2n);
  link.send(T.MSG_N, pb.MessageSchema, message(6n));
  await until(() => s.seen.message.length === 1, "bob's message");
  assert.equal(s.client.reads.unread(BOB), 3);
  assert.deepEqual(s.seen.message[0]!.own, false);
  const marked = s.client.markRead(BOB);
  await until(() => link.of(T.READ_R).length === 1, "READ_R");
  const ask = link.of(T.READ_R)[0];
  assert.deepEqual([ask.conversation, ask.seq], [BOB, 6n], "the newest this device has");
  link.send(T.READ_A, pb.ReadASchema, { requestId: ask.requestId, conversation: BOB, seq: 6n, moved: true, lastSeq: 6n });
  assert.equal((await marked).moved, true);
  assert.equal(s.client.reads.unread(BOB), 0);
  assert.deepEqual(
    s.seen.unread.map((c) => [c.conversation, c.unread]),
    [[BOB, 2], [BOB, 3], [BOB, 0]],
  );
  // An explicit seq goes as it is.
  void s.client.markRead(BOB, 4n).catch(() => {});
  await until(() => link.of(T.READ_R).length === 2, "the second READ_R");
  assert.equal(link.of(T.READ_R)[1].seq, 4n);
});

test("READ_N: another device of the user read (unread drops), the 1:1 peer read (✓✓)", async () => {
  const s = await loginWith({
    total: 3,
    conversations: [{ conversation: BOB, peer: "bob", count: 3, lastSeq: 3n, cursor: 0n }],
  });
  const link = s.node.link;
  link.send(T.READ_N, pb.ReadNoticeSchema, { conversation: BOB, reader: "alice", seq: 2n, lastSeq: 3n });
  await until(() => s.seen.read.length === 1, "her other device's read");
  assert.deepEqual([s.seen.read[0]!.own, s.seen.read[0]!.unread, s.seen.read[0]!.peer], [true, 1, "bob"]);
  link.send(T.READ_N, pb.ReadNoticeSchema, { conversation: BOB, reader: "bob", seq: 9n, peer: "bob" });
  await until(() => s.seen.read.length === 2, "bob's read");
  assert.deepEqual([s.seen.read[1]!.own, s.seen.read[1]!.reader, s.seen.read[1]!.seq], [false, "bob", 9n]);
  assert.equal(s.client.reads.peerRead(BOB), 9n);
  assert.equal(s.client.reads.unread(BOB), 1, "the peer's read is not hers");
});

test("markRead: nothing known rejects without asking; a refusal is RequestRefused; readers asks READERS_R", async () => {
  const s = await online();
  const link = s.node.link;
  await assert.rejects(s.client.markRead("d:alice:nobody"), RangeError);
  assert.equal(link.of(T.READ_R).length, 0);
  const refused = s.client.markRead("d:alice:zed", 3n);
  await until(() => link.of(T.READ_R).length === 1, "READ_R");
  link.send(T.ERROR, pb.ErrorSchema, { code: pb.Error_Code.FORBIDDEN, requestType: T.READ_R, requestId: link.of(T.READ_R)[0].requestId, message: "not yours" });
  await assert.rejects(refused, (error: unknown) => error instanceof RequestRefused && /FORBIDDEN: not yours/.test(error.message));
  const who = s.client.readers("g:team", 4n);
  await until(() => link.of(T.READERS_R).length === 1, "READERS_R");
  const ask = link.of(T.READERS_R)[0];
  assert.deepEqual([ask.conversation, ask.seq], ["g:team", 4n]);
  link.send(T.READERS_A, pb.ReadersASchema, { requestId: ask.requestId, conversation: "g:team", seq: 4n, count: 2, readers: ["bob", "carol"], members: 3 });
  const answer = await who;
  assert.deepEqual([answer.count, answer.readers, answer.members], [2, ["bob", "carol"], 3]);
});

test("the read_receipts privacy setting through CONTACTS_R settings", async () => {
  const s = await online();
  const link = s.node.link;
  const off = s.client.setReadReceipts(false);
  await until(() => link.of(T.CONTACTS_R).length === 1, "CONTACTS_R");
  const ask = link.of(T.CONTACTS_R)[0];
  assert.equal(ask.op.case, "settings");
  assert.deepEqual([ask.op.value.readReceipts, ask.op.value.messages], ["off", ""], "other settings stay");
  link.send(T.CONTACTS_A, pb.ContactsAnswerSchema, { requestId: ask.requestId, ok: true, settings: { messages: "everyone", groupAdds: "contacts", readReceipts: "off" } });
  assert.equal((await off).readReceipts, "off");
  const bad = s.client.privacySettings({ readReceipts: "maybe" });
  await until(() => link.of(T.CONTACTS_R).length === 2, "the second CONTACTS_R");
  link.send(T.CONTACTS_A, pb.ContactsAnswerSchema, { requestId: link.of(T.CONTACTS_R)[1].requestId, ok: false, error: "bad_setting", message: "read_receipts is on or off" });
  await assert.rejects(bad, (error: unknown) => error instanceof RequestRefused && error.reason === "bad_setting");
});

test("the user's messages from another device: own, once, and they leave nothing unread", async () => {
  const s = await online();
  const link = s.node.link;
  link.send(T.MSG_N, pb.MessageSchema, message(1n));
  link.send(T.MSG_N, pb.MessageSchema, message(2n, "alice", { device: "cli", text: "sent from the CLI" }));
  link.send(T.MSG_N, pb.MessageSchema, message(2n, "alice", { device: "cli", text: "sent from the CLI" }));
  await until(() => link.of(T.ACK_R).length === 3, "three ack:R");
  await settle();
  assert.deepEqual(texts(s), ["m1", "sent from the CLI"]);
  assert.deepEqual(s.seen.message.map((m) => m.own), [false, true]);
  assert.equal(s.client.reads.unread(BOB), 0);
  // This device's own send (msg:A) moves the read point too; it is not handed back.
  link.send(T.MSG_N, pb.MessageSchema, message(3n));
  await until(() => s.client.reads.unread(BOB) === 1, "bob's reply");
  void s.client.sendText("bob", "mine");
  await until(() => link.of(T.MSG_R).length === 1, "MSG_R");
  link.send(T.MSG_A, pb.MsgASchema, { clientSeq: link.of(T.MSG_R)[0].clientSeq, msgId: 104n, conversation: BOB, seq: 4n });
  await until(() => s.client.reads.unread(BOB) === 0, "read by sending");
  assert.equal(s.seen.message.length, 3);
});

test("a stopped client hears no READ_N", async () => {
  const s = setup();
  s.client.frame(T.READ_N, create(pb.ReadNoticeSchema, { conversation: BOB, reader: "bob", seq: 1n }));
  assert.equal(s.seen.read.length, 1, "a session not yet started still listens");
  await s.client.stop(false);
  s.client.frame(T.READ_N, create(pb.ReadNoticeSchema, { conversation: BOB, reader: "bob", seq: 2n }));
  assert.equal(s.seen.read.length, 1);
});
