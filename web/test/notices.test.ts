import assert from "node:assert/strict";
import { test } from "node:test";
import { parseNotice } from "../src/notices.js";

test("an SOS notice is high priority, names its id and says where", () => {
  const notice = parseNotice(
    JSON.stringify({ event: "sos.raised", priority: "high", sos: 12, device: "watch1", lat: 31.2, lon: 121.5, battery: 40 }),
  );
  assert.equal(notice.event, "sos.raised");
  assert.equal(notice.priority, "high");
  assert.equal(notice.sos, 12);
  assert.equal(notice.device, "watch1");
  assert.equal(notice.summary, "SOS from watch1 at 31.20000, 121.50000 (battery 40%)");
});

test("a handled SOS is a normal notice naming who handled it", () => {
  const notice = parseNotice('{"event":"sos.handled","priority":"normal","sos":3,"device":"w","handled_by":"mum"}');
  assert.equal(notice.priority, "normal");
  assert.equal(notice.sos, 3);
  assert.equal(notice.summary, "SOS of w handled by mum");
});

test("a text that is not a notice is shown as it is; an unknown event by its name", () => {
  assert.deepEqual(parseNotice("plain words").summary, "plain words");
  assert.equal(parseNotice("[1,2]").event, "");
  assert.equal(parseNotice('{"event":"post.liked"}').summary, "post liked");
  assert.equal(parseNotice('{"event":"sos.raised","sos":"x"}').sos, undefined);
});
