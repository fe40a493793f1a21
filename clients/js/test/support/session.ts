// A ChatClient logged in to a FakeNode, with every event it emitted recorded: the
// setup session.test.ts and reads.test.ts share.
import { Backoff } from "../../src/clock.js";
import { ChatClient, type ChatClientOptions, type ChatEvents } from "../../src/session/client.js";
import { FakeClock, until } from "./fake-clock.js";
import { FakeNode } from "./fake-node.js";

export interface Setup {
  node: FakeNode;
  clock: FakeClock;
  client: ChatClient;
  seen: { [K in keyof ChatEvents]: ChatEvents[K][] };
}

/** Every event name, so a test that forgets one still records it (a typo fails to compile). */
const EVENTS: { [K in keyof ChatEvents]: true } = {
  state: true, online: true, message: true, outcome: true, summary: true, caughtUp: true, kicked: true,
  goingAway: true, change: true, typing: true, read: true, unread: true, error: true, failed: true,
};

export function setup(options: Partial<ChatClientOptions> = {}, node = new FakeNode()): Setup {
  const clock = new FakeClock();
  const client = new ChatClient({
    routers: ["http://down.test", "http://router.test"],
    user: "alice",
    password: "secret",
    device: "web-1",
    webSocket: node.webSocket,
    fetch: node.fetch,
    clock,
    random: () => 0.5,
    backoff: new Backoff(500, 30_000, 0.5),
    ...options,
  });
  const seen = {} as Record<string, unknown[]>;
  for (const name of Object.keys(EVENTS) as (keyof ChatEvents)[]) {
    seen[name] = [];
    client.on(name, ((value: unknown) => seen[name]!.push(value)) as never);
  }
  return { node, clock, client, seen: seen as unknown as Setup["seen"] };
}

/** Started, online, and the login's catch-up over. */
export async function online(options: Partial<ChatClientOptions> = {}, node?: FakeNode): Promise<Setup> {
  const s = setup(options, node);
  const started = s.client.start();
  await until(() => s.client.state === "online", "online");
  await started;
  await until(() => s.seen.caughtUp.length === 1, "the login's catch-up");
  return s;
}

export function texts(s: Setup): string[] {
  return s.seen.message.map((m) => m.message.text);
}
