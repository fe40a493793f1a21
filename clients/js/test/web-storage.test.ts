// What a browser keeps across a reload: dedup memory and uploads to resume.
import assert from "node:assert/strict";
import { test } from "node:test";
import { WebStorageSeenStore, WebStorageUploadState, webDeviceName, type StorageLike } from "../src/session/web-storage.js";

class MemoryStorage implements StorageLike {
  items = new Map<string, string>();
  full = false;
  getItem(key: string): string | null {
    return this.items.get(key) ?? null;
  }
  setItem(key: string, value: string): void {
    if (this.full) throw new Error("QuotaExceededError");
    this.items.set(key, value);
  }
  removeItem(key: string): void {
    this.items.delete(key);
  }
}

test("the seen store survives a reload: by id and by sender device and client_seq", () => {
  const storage = new MemoryStorage();
  const before = new WebStorageSeenStore(storage, "cim.seen.alice.web");
  before.record(10n, "bob", "phone", 5n);
  const after = new WebStorageSeenStore(storage, "cim.seen.alice.web");
  assert.equal(after.isDuplicate(10n, "bob", "phone", 5n), true);
  assert.equal(after.isDuplicate(99n, "bob", "phone", 5n), true, "a resend taken anew");
  assert.equal(after.isDuplicate(11n, "bob", "phone", 6n), false);
});

test("bounded, and a store that cannot write or holds junk never loses a message", () => {
  const storage = new MemoryStorage();
  const seen = new WebStorageSeenStore(storage, "k", 3);
  for (let n = 1n; n <= 5n; n++) seen.record(n, "bob", "phone", n);
  assert.equal(JSON.parse(storage.getItem("k")!).length, 3);
  assert.equal(new WebStorageSeenStore(storage, "k", 3).isDuplicate(1n, "bob", "phone", 0n), false, "forgotten");
  storage.full = true;
  seen.record(6n, "bob", "phone", 6n);
  assert.equal(seen.isDuplicate(6n, "bob", "phone", 6n), true, "memory still knows it");
  storage.items.set("junk", "{not json");
  assert.equal(new WebStorageSeenStore(storage, "junk").isDuplicate(1n, "bob", "phone", 1n), false);
});

test("upload ids to resume, kept per key", () => {
  const storage = new MemoryStorage();
  const state = new WebStorageUploadState(storage);
  state.put("a", "u1");
  assert.equal(new WebStorageUploadState(storage).get("a"), "u1");
  state.drop("a");
  assert.equal(state.get("a"), undefined);
});

test("a device name made once per browser and kept; a storage that cannot keep it still gives one", () => {
  const storage = new MemoryStorage();
  const name = webDeviceName(storage);
  assert.match(name, /^web-[a-z0-9]{8}$/);
  assert.equal(webDeviceName(storage), name, "the same after a reload");
  assert.equal(storage.items.get("cim.device"), name);
  assert.notEqual(webDeviceName(storage, "cim.device.tab2"), name, "another key, another device");
  storage.items.set("cim.device", "bad name with spaces");
  assert.match(webDeviceName(storage), /^web-/, "a foreign value is replaced");
  assert.notEqual(storage.items.get("cim.device"), "bad name with spaces");
  const full = new MemoryStorage();
  full.full = true;
  assert.match(webDeviceName(full, "k", "kiosk-"), /^kiosk-[a-z0-9]{8}$/);
});
