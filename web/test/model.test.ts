import assert from "node:assert/strict";
import { test } from "node:test";
import { ChatModel, conversationKey, keyOfTimeline, previewOf, TYPE, type MessageLike } from "../src/model.js";

let nextId = 100n;
function message(fields: Partial<MessageLike>): MessageLike {
  return {
    id: nextId++,
    from: "bob",
    to: "alice",
    group: "",
    type: TYPE.TEXT,
    text: "hi",
    clientSeq: 0n,
    sentAtMs: 1000n,
    seq: 1n,
    ...fields,
  };
}

test("a 1:1 conversation is keyed by the other user, a group by its id", () => {
  assert.equal(conversationKey("alice", { from: "bob", to: "alice", group: "" }), "user:bob");
  assert.equal(conversationKey("alice", { from: "alice", to: "bob", group: "" }), "user:bob");
  assert.equal(conversationKey("alice", { from: "bob", to: "", group: "g7" }), "group:g7");
});

test("the SDK's unread counts show, but not for the conversation on screen of a visible page", () => {
  const model = new ChatModel("alice");
  model.setUnread("user:bob", 2);
  model.setUnread("user:carol", 1);
  model.opened("user:carol");
  model.setUnread("user:carol", 4);
  assert.equal(model.conversation("user:bob").unread, 2);
  assert.equal(model.conversation("user:carol").unread, 0);
  assert.equal(model.totalUnread(), 2);
  model.pageVisible = false;
  assert.equal(model.seeing("user:carol"), false);
  model.setUnread("user:carol", 5);
  assert.equal(model.conversation("user:carol").unread, 5);
  model.pageVisible = true;
  model.opened("user:carol");
  assert.equal(model.conversation("user:carol").unread, 0);
  assert.equal(model.seeing("user:carol"), true);
});

test("the summary gives the list its conversations and newest messages", () => {
  const model = new ChatModel("bob");
  const newest = message({ from: "alice", to: "bob", text: "third", seq: 5n, sentAtMs: 5000n });
  model.summary([{ peer: "alice", group: "", newest }, { peer: "", group: "g1" }]);
  assert.equal(model.conversation("user:alice").preview, "third");
  assert.deepEqual(
    model.sorted().map((c) => c.key),
    ["user:alice", "group:g1"],
  );
});

test("SDK timeline keys name the page's conversations", () => {
  assert.equal(keyOfTimeline("alice", "d:alice:bob"), "user:bob");
  assert.equal(keyOfTimeline("bob", "d:alice:bob"), "user:alice");
  assert.equal(keyOfTimeline("a:b", "d:a%3Ab:c%25d"), "user:c%d");
  assert.equal(keyOfTimeline("alice", "g:G7"), "group:G7");
  assert.equal(keyOfTimeline("alice", "x:1"), undefined);
});

test("a message already shown (same id) is not shown again", () => {
  const model = new ChatModel("alice");
  const first = message({ id: 7n });
  assert.ok(model.received(first));
  assert.equal(model.received({ ...first }), undefined);
  assert.equal(model.conversation("user:bob").items.length, 1);
});

test("messages are kept in timeline order whatever order they arrive in", () => {
  const model = new ChatModel("alice");
  for (const seq of [3n, 1n, 2n]) model.received(message({ seq }));
  assert.deepEqual(
    model.conversation("user:bob").items.map((item) => item.seq),
    [1, 2, 3],
  );
});

test("a sent message goes sending, sent (msg:A), delivered (ack:N); read marks go up to the peer's seq", () => {
  const model = new ChatModel("alice");
  const item = model.sending({ peer: "bob" }, "text", "hello");
  assert.equal(item.mark, "sending");
  model.numbered(item, 41n);
  model.taken(41n, 900n, 6n);
  assert.equal(item.mark, "sent");
  assert.equal(item.seq, 6);
  model.outcome({ clientSeq: 41n, msgId: 900n, status: "delivered" });
  assert.equal(item.mark, "delivered");
  model.taken(41n, 900n, 6n); // a late msg:A never lowers the mark
  assert.equal(item.mark, "delivered");
  const later = model.sending({ peer: "bob" }, "text", "later");
  model.numbered(later, 42n);
  model.taken(42n, 901n, 7n);
  assert.deepEqual(
    model.readThrough("user:bob", 6).map((i) => i.text),
    ["hello"],
  );
  assert.equal(item.mark, "read");
  assert.equal(later.mark, "sent");
});

test("a failed message is marked failed; our own message coming back is not a second item", () => {
  const model = new ChatModel("alice");
  const item = model.sending({ peer: "bob" }, "text", "x");
  model.numbered(item, 5n);
  model.outcome({ clientSeq: 5n, msgId: 0n, status: "failed" });
  assert.equal(item.mark, "failed");
  const other = model.sending({ peer: "bob" }, "text", "y");
  model.numbered(other, 6n);
  assert.equal(model.received(message({ id: 55n, from: "alice", to: "bob", clientSeq: 6n, seq: 9n })), undefined);
  assert.equal(model.conversation("user:bob").items.length, 2);
  assert.equal(other.seq, 9);
});

test("the user's message from another device is hers, marked sent, said to come from there, shown once", () => {
  const model = new ChatModel("alice", "web-abc");
  const waiting = model.sending({ peer: "bob" }, "text", "from this page");
  model.numbered(waiting, 7n);
  // The CLI numbers its messages on its own: the same client_seq is not this page's message.
  const cli = message({ id: 70n, from: "alice", to: "bob", device: "cli", clientSeq: 7n, seq: 4n, text: "from the terminal", sentAtMs: BigInt(Date.now() + 1000) });
  const item = model.received(cli);
  assert.ok(item);
  assert.deepEqual([item.mine, item.via, item.mark, item.from], [true, "cli", "sent", "alice"]);
  assert.equal(waiting.msgId, "0", "this page's own message was not taken for it");
  assert.equal(model.received({ ...cli }), undefined, "the same id again is not a second item");
  assert.equal(model.conversation("user:bob").items.filter((i) => i.text === "from the terminal").length, 1);
  assert.equal(model.conversation("user:bob").preview, "You: from the terminal");
  assert.equal(model.conversation("user:bob").unread, 0);
  assert.deepEqual(model.readThrough("user:bob", 4).map((i) => i.text), ["from the terminal"]);
  // This page's own message coming back (a history page) names this device: no "via".
  const back = model.received(message({ id: 71n, from: "alice", to: "bob", device: "web-abc", clientSeq: 7n, seq: 5n }));
  assert.equal(back, undefined);
  assert.deepEqual([waiting.msgId, waiting.via], ["71", ""]);
});

test("previews say what a message is", () => {
  const media = { url: "u", thumbnailUrl: "", name: "cat.png", mime: "image/png", size: 3, width: 1, height: 1 };
  assert.equal(previewOf({ kind: "image", text: "", media, mine: true }), "You: [image] cat.png");
  assert.equal(previewOf({ kind: "text", text: "a\n b", media: undefined, mine: false }), "a b");
  assert.equal(previewOf({ kind: "system", text: '{"event":"sos.raised","device":"w1"}', media: undefined, mine: false }), "SOS from w1");
  assert.equal(new ChatModel("carol").conversation("user:@system").title, "System notices");
});

test("conversations are listed newest activity first", () => {
  const model = new ChatModel("alice");
  model.received(message({ from: "bob", sentAtMs: 1000n }));
  model.received(message({ from: "carol", sentAtMs: 3000n }));
  model.received(message({ from: "dave", sentAtMs: 2000n }));
  assert.deepEqual(
    model.sorted().map((c) => c.key),
    ["user:carol", "user:dave", "user:bob"],
  );
});

test("a recall empties the message and an edit replaces its text; the list's preview follows", () => {
  const model = new ChatModel("bob");
  model.received(message({ id: 1n, from: "alice", to: "bob", text: "See you at 5", seq: 1n }));
  model.received(message({ id: 2n, from: "alice", to: "bob", text: "Oops", seq: 2n }));
  const edited = model.changed({ event: "edit", msgId: 1n, text: "See you at 6" });
  assert.equal(edited?.text, "See you at 6");
  assert.equal(edited?.edited, true);
  const recalled = model.changed({ event: "recall", msgId: 2n, text: "" });
  assert.equal(recalled?.recalled, true);
  assert.equal(recalled?.text, "");
  assert.equal(model.conversation("user:alice").preview, "message recalled");
  assert.equal(model.changed({ event: "edit", msgId: 2n, text: "back" })?.text, "", "a recalled message stays recalled");
  assert.equal(model.changed({ event: "edit", msgId: 99n, text: "x" }), undefined);
});

test("change entries are not messages; stored messages keep their recalled and edited flags", () => {
  const model = new ChatModel("bob");
  assert.equal(model.received(message({ id: 5n, from: "alice", to: "bob", change: 2, text: "new", seq: 3n })), undefined);
  const item = model.received(message({ id: 6n, from: "alice", to: "bob", edited: true, text: "fixed", seq: 4n }));
  assert.equal(item?.edited, true);
  assert.equal(model.conversation("user:alice").items.length, 1);
});

test("typing shows until it expires, is stopped, or the typist's message arrives", () => {
  const model = new ChatModel("bob");
  model.typing("user:alice", "alice", 6000);
  assert.deepEqual(model.typingIn("user:alice", 1000), ["alice"]);
  assert.deepEqual(model.typingIn("user:alice", 6000), []);
  model.typing("user:alice", "alice", 9000);
  model.typing("user:alice", "alice", 0);
  assert.deepEqual(model.typingIn("user:alice", 1000), []);
  model.typing("user:alice", "alice", 9000);
  model.received(message({ from: "alice", to: "bob" }));
  assert.deepEqual(model.typingIn("user:alice", 1000), []);
});
