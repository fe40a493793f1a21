/**
 * What a browser keeps across a page reload (cim/client/seen.py's FileSeenStore, the
 * upload state file): the device's name, the inbox's dedup memory and the uploads to resume, in a Web
 * Storage (`localStorage`, or any object with its getItem/setItem/removeItem).
 *
 * A reload before the node's cursor moved brings the same messages again at the next
 * catch-up; the seen store keeps them from being shown twice. It is written on every
 * hand-over (a small JSON list, bounded by `maxIds`), read once at start. A store that
 * cannot be written (quota, private mode) weakens dedup; it never loses a message.
 */
import type { UploadStateStore } from "../api/files.js";
import { randomBytes } from "../protocol/crypto.js";
import { MemorySeenStore, type SeenStore } from "./seen.js";

export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

type Entry = [string, string, string, string]; // msgId, sender, device, clientSeq

export class WebStorageSeenStore implements SeenStore {
  private readonly memory: MemorySeenStore;
  private entries: Entry[] = [];

  /** `key` names this user and device's memory, e.g. `cim.seen.alice.web-1`. */
  constructor(
    private readonly storage: StorageLike,
    private readonly key: string,
    readonly maxIds = 2000,
  ) {
    this.memory = new MemorySeenStore(maxIds);
    try {
      const saved = JSON.parse(storage.getItem(key) ?? "[]") as Entry[];
      for (const [id, sender, device, seq] of Array.isArray(saved) ? saved.slice(-maxIds) : []) {
        this.remember(BigInt(id), sender, device, BigInt(seq));
      }
    } catch {
      this.entries = []; // a torn or foreign value: start empty
    }
  }

  isDuplicate(msgId: bigint, sender: string, device: string, clientSeq: bigint): boolean {
    return this.memory.isDuplicate(msgId, sender, device, clientSeq);
  }

  record(msgId: bigint, sender: string, device: string, clientSeq: bigint): void {
    if (this.memory.isDuplicate(msgId, sender, device, 0n)) return;
    this.remember(msgId, sender, device, clientSeq);
    try {
      this.storage.setItem(this.key, JSON.stringify(this.entries));
    } catch {
      // quota or private mode: the memory still deduplicates until the page goes
    }
  }

  private remember(msgId: bigint, sender: string, device: string, clientSeq: bigint): void {
    this.memory.record(msgId, sender, device, clientSeq);
    this.entries.push([msgId.toString(), sender, device, clientSeq.toString()]);
    if (this.entries.length > this.maxIds) this.entries.splice(0, this.entries.length - this.maxIds);
  }
}

/** Upload ids to resume, in a Web Storage (FileClient.upload's `state`). */
export class WebStorageUploadState implements UploadStateStore {
  constructor(
    private readonly storage: StorageLike,
    private readonly prefix = "cim.upload.",
  ) {}

  get(key: string): string | undefined {
    return this.storage.getItem(this.prefix + key) ?? undefined;
  }

  put(key: string, uploadId: string): void {
    try {
      this.storage.setItem(this.prefix + key, uploadId);
    } catch {
      // not resumable after a reload, that is all
    }
  }

  drop(key: string): void {
    this.storage.removeItem(this.prefix + key);
  }
}

/**
 * This browser's device name, made once and kept (`web-` and 8 random characters):
 * the node keeps a session, cursors and read state per device, and a device new to
 * the account starts at the present, so a page must log in as the same device after
 * a reload. Tabs sharing the storage are one device (a second tab's login replaces the
 * first's connection): give each tab its own `key` (sessionStorage) to have them apart.
 * A storage that cannot be written gives a fresh name each time.
 */
export function webDeviceName(storage: StorageLike, key = "cim.device", prefix = "web-"): string {
  try {
    const saved = storage.getItem(key);
    if (saved && /^[\x21-\x7e]{1,64}$/.test(saved)) return saved;
  } catch {
    // unreadable: make one
  }
  const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789";
  const name = prefix + [...randomBytes(8)].map((b) => alphabet[b % alphabet.length]).join("");
  try {
    storage.setItem(key, name);
  } catch {
    // quota or private mode: this page's name only
  }
  return name;
}
