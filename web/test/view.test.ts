import assert from "node:assert/strict";
import { test } from "node:test";
import { humanSize } from "../src/view.js";

test("sizes read as people read them", () => {
  assert.equal(humanSize(930), "930 B");
  assert.equal(humanSize(4600), "4.5 KiB");
  assert.equal(humanSize(5 * 1024 * 1024 + 300_000), "5.3 MiB");
  assert.equal(humanSize(3 * 1024 ** 4), "3072.0 GiB");
});
