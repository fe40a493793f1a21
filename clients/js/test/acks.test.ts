// Cumulative acks (src/session/acks.ts, as cim/client/acks.py): a group
// conversation's ack:R stands for many messages; 1:1 messages are acknowledged at once.
import assert from "node:assert/strict";
import { test } from "node:test";
import { create } from "@bufbuild/protobuf";
import { pb } from "../src/protocol/frames.js";
import { CumulativeAcks, GROUP_ACK_DELAY_MS } from "../src/session/acks.js";
import { FakeClock } from "./support/fake-clock.js";

function message(conversation: string, seq: bigint): pb.Message {
  return create(pb.MessageSchema, { id: 1000n + seq, conversation, seq });
}

function setup(every = 3): { clock: FakeClock; acks: CumulativeAcks; sent: [bigint, string, bigint][] } {
  const clock = new FakeClock();
  const sent: [bigint, string, bigint][] = [];
  const acks = new CumulativeAcks(clock, (ack) => sent.push([ack.msgId, ack.conversation, ack.throughSeq]), every);
  return { clock, acks, sent };
}

test("a 1:1 message, or one without a watermark, is acknowledged at once", () => {
  const { acks, sent } = setup();
  acks.acknowledge(message("d:alice:bob", 1n), 1n);
  acks.acknowledge(message("g:g1", 5n), 0n);
  assert.deepEqual(sent, [[1001n, "d:alice:bob", 1n], [1005n, "g:g1", 0n]]);
  assert.equal(acks.owed, 0);
});

test("every nth group message sends one ack:R for all of them", () => {
  const { acks, sent } = setup();
  for (const seq of [1n, 2n, 3n, 4n]) acks.acknowledge(message("g:g1", seq), seq);
  assert.deepEqual(sent, [[1003n, "g:g1", 3n]]);
  assert.equal(acks.owed, 1);
});

test("the rest goes after the delay, one per conversation, and the watermark never goes back", () => {
  const { clock, acks, sent } = setup();
  acks.acknowledge(message("g:g1", 7n), 7n);
  acks.acknowledge(message("g:g2", 2n), 2n);
  acks.acknowledge(message("g:g1", 4n), 7n); // a duplicate acknowledged again
  clock.advance(GROUP_ACK_DELAY_MS - 1);
  assert.deepEqual(sent, []);
  clock.advance(1);
  assert.deepEqual(sent, [[1004n, "g:g1", 7n], [1002n, "g:g2", 2n]]);
  assert.equal(clock.pending, 0);
});

test("flush sends now; forget (a lost connection) sends nothing", () => {
  const { clock, acks, sent } = setup();
  acks.acknowledge(message("g:g1", 1n), 1n);
  acks.flush();
  assert.deepEqual(sent, [[1001n, "g:g1", 1n]]);
  acks.acknowledge(message("g:g1", 2n), 2n);
  acks.forget();
  clock.advance(GROUP_ACK_DELAY_MS);
  assert.deepEqual(sent, [[1001n, "g:g1", 1n]]);
  assert.equal(clock.pending, 0);
});
