// Resumption (docs/crypto.md, "Resumption"): a reconnect to the same node offers the
// last LoginResult's ticket (no RSA, no router); a refused ticket falls back to a full
// hello at once with the cached token; an expired one is not offered.
import assert from "node:assert/strict";
import { test } from "node:test";
import { until } from "./support/fake-clock.js";
import { FakeNode } from "./support/fake-node.js";
import { online } from "./support/session.js";

test("a reconnect resumes with the ticket, and the next one with the ticket it left", async () => {
  const s = await online();
  assert.equal(s.node.tickets.size, 1, "the full login left a ticket");
  for (const round of [1, 2]) {
    s.node.link.drop();
    s.clock.advance(500);
    await until(() => s.client.state === "online" && s.node.links.length === round + 1, "back online");
    assert.equal(s.node.resumptions, round);
  }
  assert.equal(s.node.routerLogins, 1);
  assert.equal(s.node.tickets.size, 1, "each ticket used once, a new one issued");
});

test("a refused ticket falls back to a full hello with the cached token", async () => {
  const s = await online();
  s.node.tickets.clear(); // the node forgot it (a restart, another node key)
  s.node.link.drop();
  s.clock.advance(500);
  await until(() => s.client.state === "online" && s.node.links.length === 3, "back online");
  assert.equal(s.node.resumptions, 0);
  assert.equal(s.node.routerLogins, 1, "the token was still good: no router");
  // The full hello left a new ticket: the next reconnect resumes.
  s.node.link.drop();
  s.clock.advance(500);
  await until(() => s.client.state === "online" && s.node.links.length === 4, "online again");
  assert.equal(s.node.resumptions, 1);
});

test("an expired ticket is not offered", async () => {
  const node = new FakeNode();
  node.resumeWindow = 1_000;
  const s = await online({}, node);
  const links = node.links.length;
  s.clock.advance(2_000);
  node.link.drop();
  s.clock.advance(500);
  await until(() => s.client.state === "online" && node.links.length === links + 1, "back online");
  assert.equal(node.resumptions, 0);
});
