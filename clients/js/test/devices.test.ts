// Many devices per user: the user's devices online (DEVICES_R), and the kicks that end
// a device's session for good (too many devices, replaced by the same device's newer
// login).
import assert from "node:assert/strict";
import { test } from "node:test";
import { pb } from "../src/protocol/frames.js";
import { SessionRefused } from "../src/session/dialing.js";
import { settle, until } from "./support/fake-clock.js";
import { online } from "./support/session.js";

const T = pb.FrameType;

test("devices(): DEVICES_R, answered by request_id with the user's devices online", async () => {
  const s = await online();
  const link = s.node.link;
  const asked = s.client.devices();
  await until(() => link.of(T.DEVICES_R).length === 1, "DEVICES_R");
  link.send(T.DEVICES_A, pb.DevicesASchema, {
    requestId: link.of(T.DEVICES_R)[0].requestId,
    devices: [
      { device: "cli-host", connectedAtMs: 1_000n, activeAtMs: 5_000n },
      { device: "web-1", connectedAtMs: 2_000n, activeAtMs: 2_000n, thisDevice: true },
    ],
  });
  const devices = await asked;
  assert.deepEqual(devices.map((d) => [d.device, d.thisDevice, d.activeAtMs]), [["cli-host", false, 5_000n], ["web-1", true, 2_000n]]);
});

for (const [name, code] of [
  ["too many devices of the user online", pb.Kicked_Code.TOO_MANY_DEVICES],
  ["replaced by this device's newer login (another tab)", pb.Kicked_Code.REPLACED],
] as const) {
  test(`KICKED ${name}: stopped, failed, no reconnect`, async () => {
    const s = await online();
    s.node.link.send(T.KICKED, pb.KickedSchema, { code, reason: name });
    await until(() => s.client.state === "stopped", "stopped");
    assert.equal(s.seen.kicked[0]!.code, code);
    assert.ok(s.seen.failed[0] instanceof SessionRefused);
    assert.ok(s.seen.failed[0]!.message.includes(name), s.seen.failed[0]!.message);
    s.clock.advance(120_000);
    await settle();
    assert.equal(s.node.links.length, 1, "no new connection");
    assert.equal(s.node.routerLogins, 1, "no new login");
  });
}
