/**
 * What the receiving client already handed to its application (cim/client/seen.py;
 * design: 业务层面去重): by server id, and by (sender, sender device, client_seq) for a
 * resend the node took anew past its dedup window (new id, same client_seq). Bounded:
 * the last `maxIds` messages exactly; a forgotten one is not assumed seen.
 */

export interface SeenStore {
  isDuplicate(msgId: bigint, sender: string, device: string, clientSeq: bigint): boolean;
  record(msgId: bigint, sender: string, device: string, clientSeq: bigint): void;
}

export class MemorySeenStore implements SeenStore {
  private readonly ids = new Map<bigint, string>();
  private readonly seqs = new Set<string>();

  constructor(readonly maxIds = 10_000) {
    if (maxIds < 1) throw new RangeError("a seen store must remember at least one message");
  }

  get size(): number {
    return this.ids.size;
  }

  isDuplicate(msgId: bigint, sender: string, device: string, clientSeq: bigint): boolean {
    if (msgId && this.ids.has(msgId)) return true;
    if (clientSeq <= 0n) return false; // not numbered by its sender: only the id tells
    return this.seqs.has(seqKey(sender, device, clientSeq));
  }

  record(msgId: bigint, sender: string, device: string, clientSeq: bigint): void {
    if (this.ids.has(msgId)) return;
    const key = clientSeq > 0n ? seqKey(sender, device, clientSeq) : "";
    this.ids.set(msgId, key);
    if (key) this.seqs.add(key);
    while (this.ids.size > this.maxIds) {
      const [oldest, oldKey] = this.ids.entries().next().value!;
      this.ids.delete(oldest);
      if (oldKey) this.seqs.delete(oldKey);
    }
  }
}

function seqKey(sender: string, device: string, clientSeq: bigint): string {
  return JSON.stringify([sender, device, clientSeq.toString()]);
}
