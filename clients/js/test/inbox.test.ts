// The inbox alone: what waits for what, and what a failed gap fill does.
import { create } from "@bufbuild/protobuf";
import assert from "node:assert/strict";
import { test } from "node:test";
import { pb } from "../src/protocol/frames.js";
import { RequestRefused } from "../src/session/answers.js";
import { Inbox } from "../src/session/inbox.js";
import { MemorySeenStore } from "../src/session/seen.js";
import { settle } from "./support/fake-clock.js";

interface Harness {
  inbox: Inbox;
  shown: string[];
  acks: [bigint, bigint][];
  fills: { after: bigint; before: bigint; answer: (a: pb.HistoryA) => void; fail: (e: Error) => void }[];
  pulls: string[];
}

function harness(options: { decline?: (m: pb.Message) => boolean; sending?: (m: pb.Message) => boolean } = {}): Harness {
  const h: Harness = { inbox: undefined as never, shown: [], acks: [], fills: [], pulls: [] };
  h.inbox = new Inbox(
    "alice",
    new MemorySeenStore(),
    (message) => {
      if (options.decline?.(message)) return false;
      h.shown.push(message.text);
      return true;
    },
    (message, through) => h.acks.push([message.id, through]),
    (_conversation, _peer, _group, after, before) =>
      new Promise((answer, fail) => h.fills.push({ after, before, answer, fail })),
    (conversation) => h.pulls.push(conversation),
    options.sending,
  );
  return h;
}

function msg(seq: number, text = `m${seq}`, extra: { conversation?: string; group?: string } = {}): pb.Message {
  return create(pb.MessageSchema, {
    id: BigInt(100 + seq),
    from: "bob",
    to: "alice",
    device: "phone",
    clientSeq: BigInt(seq),
    conversation: "d:alice:bob",
    seq: BigInt(seq),
    text,
    ...extra,
  });
}

test("while the summary is on its way, live messages wait, then go in order", () => {
  const h = harness();
  h.inbox.summaryPending = true;
  h.inbox.receive(msg(6));
  h.inbox.receive(msg(5));
  assert.deepEqual(h.shown, []);
  h.inbox.anchor("d:alice:bob", 4n);
  h.inbox.summaryDone(true);
  assert.deepEqual(h.shown, ["m5", "m6"]);
  assert.deepEqual(h.acks.at(-1), [106n, 6n]);
});

test("a refused gap fill shows the held messages with the watermark below the hole", async () => {
  const h = harness();
  h.inbox.anchor("d:alice:bob", 1n);
  h.inbox.receive(msg(4));
  assert.equal(h.fills.length, 1);
  h.fills[0]!.fail(new RequestRefused("HISTORY_R", "UNAVAILABLE"));
  await settle(5);
  assert.deepEqual(h.shown, ["m4"]);
  assert.equal(h.inbox.watermark("d:alice:bob"), 1n, "the catch-up brings 2 and 3");
  assert.deepEqual(h.acks, [[104n, 1n]]);
  assert.deepEqual(h.pulls, ["d:alice:bob"], "asked at once, not left to the next login");
});

test("a later gap's fill does not skip the hole a refused fill left", async () => {
  const h = harness();
  h.inbox.anchor("d:alice:bob", 2n);
  h.inbox.receive(msg(4)); // 3 missing
  h.fills[0]!.fail(new RequestRefused("HISTORY_R", "UNAVAILABLE"));
  await settle(5);
  h.inbox.receive(msg(6)); // 5 missing: this fill is answered
  assert.equal(h.fills.length, 2);
  assert.deepEqual([h.fills[1]!.after, h.fills[1]!.before], [4n, 6n]);
  h.fills[1]!.answer(create(pb.HistoryASchema, { messages: [msg(5)] }));
  await settle(5);
  assert.deepEqual(h.shown, ["m4", "m5", "m6"]);
  assert.equal(h.inbox.watermark("d:alice:bob"), 2n, "3 is still missing");
  assert.ok(h.acks.every(([, through]) => through <= 2n), "no ack claims 3");
  h.inbox.beginCatchUp("d:alice:bob", 2n);
  h.inbox.catchUpPage("d:alice:bob", [msg(3), msg(4), msg(5), msg(6)]);
  assert.equal(h.inbox.endCatchUp("d:alice:bob", 6n, true), 6n);
  assert.deepEqual(h.shown, ["m4", "m5", "m6", "m3"]);
});

test("an own message held through a refused fill is not shown back by the catch-up", async () => {
  const h = harness();
  h.inbox.anchor("d:alice:bob", 2n);
  h.inbox.receive(msg(4)); // 3 missing
  h.inbox.own("d:alice:bob", 5n); // msg:A while the fill is out
  h.fills[0]!.fail(new RequestRefused("HISTORY_R", "UNAVAILABLE"));
  await settle(5);
  assert.deepEqual(h.shown, ["m4"]);
  h.inbox.beginCatchUp("d:alice:bob", 2n);
  h.inbox.catchUpPage("d:alice:bob", [msg(3), msg(4), msg(5, "mine")]);
  assert.equal(h.inbox.endCatchUp("d:alice:bob", 5n, true), 5n);
  assert.deepEqual(h.shown, ["m4", "m3"]);
});

test("a fill refused for now hands the gap to the catch-up, holding what came, in order", async () => {
  const h = harness();
  h.inbox.anchor("d:alice:bob", 2n);
  h.inbox.receive(msg(4)); // 3 missing
  h.fills[0]!.fail(new RequestRefused("HISTORY_R", "UNAVAILABLE", pb.Error_Code.UNAVAILABLE));
  await settle(5);
  assert.deepEqual(h.shown, [], "4 waits for 3");
  assert.deepEqual(h.pulls, ["d:alice:bob"]);
  h.inbox.beginCatchUp("d:alice:bob", 2n);
  h.inbox.catchUpPage("d:alice:bob", [msg(3), msg(4)]);
  assert.equal(h.inbox.endCatchUp("d:alice:bob", 4n, true), 4n);
  assert.deepEqual(h.shown, ["m3", "m4"]);
});

test("a gap refused for now too many times shows what came without it", async () => {
  const h = harness();
  h.inbox.anchor("d:alice:bob", 2n);
  h.inbox.receive(msg(4)); // 3 missing
  for (let round = 0; round < 20 && h.shown.length === 0; round++) {
    h.fills.at(-1)!.fail(new RequestRefused("HISTORY_R", "UNAVAILABLE", pb.Error_Code.UNAVAILABLE));
    await settle(5);
    if (h.shown.length) break;
    // The catch-up it was handed to ends incomplete too; the next fill goes out.
    h.inbox.beginCatchUp("d:alice:bob", 2n);
    h.inbox.endCatchUp("d:alice:bob", 0n, false);
  }
  assert.deepEqual(h.shown, ["m4"]);
  assert.equal(h.inbox.watermark("d:alice:bob"), 2n, "no ack claims 3");
  assert.equal(h.fills.length, 4, "refused fills and incomplete catch-ups: six tries, then shown");
});

test("a fill cut by a lost connection keeps the held message for the next catch-up", async () => {
  const h = harness();
  h.inbox.anchor("d:alice:bob", 1n);
  h.inbox.receive(msg(3));
  h.fills[0]!.fail(new Error("connection lost"));
  await settle(5);
  assert.deepEqual(h.shown, []);
  assert.equal(h.inbox.held("d:alice:bob"), 1);
});

test("a gap of more than a page is left to the conversation's catch-up", async () => {
  const h = harness();
  h.inbox.anchor("d:alice:bob", 1n);
  h.inbox.receive(msg(90));
  h.fills[0]!.answer(create(pb.HistoryASchema, { messages: [msg(89)], more: true }));
  await settle(5);
  assert.deepEqual(h.pulls, ["d:alice:bob"]);
  assert.deepEqual(h.shown, [], "nothing of a part is shown and the rest skipped");
});

test("this device's own message (msg:A) is not shown back and does not open a gap", () => {
  const h = harness();
  h.inbox.anchor("d:alice:bob", 1n);
  h.inbox.own("d:alice:bob", 2n);
  h.inbox.receive(msg(3));
  assert.deepEqual(h.shown, ["m3"]);
  assert.equal(h.fills.length, 0);
  assert.equal(h.inbox.watermark("d:alice:bob"), 3n);
});

test("after a declined message, acknowledgements claim nothing past it", async () => {
  const h = harness({ decline: (m) => m.text === "m2" });
  h.inbox.anchor("d:alice:bob", 1n);
  h.inbox.receive(msg(2));
  h.inbox.receive(msg(3));
  // Declined, 2 left a hole: 3 waits for the fill, which brings 2 (not offered again).
  assert.deepEqual([h.fills[0]!.after, h.fills[0]!.before], [1n, 3n]);
  h.fills[0]!.answer(create(pb.HistoryASchema, { messages: [msg(2)] }));
  await settle(5);
  assert.deepEqual(h.shown, ["m3"]);
  assert.deepEqual(h.acks, [[103n, 0n]], "through_seq 0: the node's cursor stays below 2");
});

test("a new group (not in a complete summary) is pulled before its messages show", () => {
  const h = harness();
  h.inbox.summaryDone(true);
  h.inbox.receive(msg(7, "hi team", { conversation: "g:team", group: "team" }));
  assert.deepEqual(h.pulls, ["g:team"]);
  assert.deepEqual(h.shown, []);
  h.inbox.beginCatchUp("g:team", 0n);
  h.inbox.catchUpPage("g:team", [msg(6, "older", { conversation: "g:team", group: "team" })]);
  h.inbox.endCatchUp("g:team", 6n, true);
  assert.deepEqual(h.shown, ["older", "hi team"]);
});
