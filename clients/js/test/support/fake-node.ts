// A node and a router in memory: the real handshake (the node's RSA key is the test
// vectors' one), real frame encryption, a WebSocket that is a pair of callbacks.
import { create, fromBinary, toBinary, type DescMessage, type MessageInitShape } from "@bufbuild/protobuf";
import { constants, privateDecrypt } from "node:crypto";
import { readFileSync } from "node:fs";
import { concat, fromHex, toBase64, toHex } from "../../src/protocol/bytes.js";
import { randomBytes, sessionCiphers, type FrameOpener, type FrameSealer } from "../../src/protocol/crypto.js";
import { helloDigest, nextResumptionSecret, resumeProof } from "../../src/protocol/handshake.js";
import { ESTABLISHED_OUTBOUND, decodeFrame, encodeFrame, pb } from "../../src/protocol/frames.js";
import type { WebSocketLike } from "../../src/session/connection.js";

const vectors = JSON.parse(readFileSync(new URL("../../../../../tests/vectors/protocol.json", import.meta.url), "utf8"));
export const NODE_KEY_PEM: string = vectors.node_key_pem;
export const SERVER_KEY = fromHex(vectors.server_key);
export const WS_URL = "ws://node1.test/ws";
/** A second node's gateway (WRONG_NODE tests). */
export const WS_URL_2 = "ws://node2.test/ws";

export interface Received {
  type: number;
  message: any;
}

class FakeSocket implements WebSocketLike {
  binaryType = "blob";
  readyState = 0;
  onopen: ((event: unknown) => void) | null = null;
  onmessage: ((event: { data: unknown }) => void) | null = null;
  onclose: ((event: { code?: number; reason?: string }) => void) | null = null;
  onerror: ((event: unknown) => void) | null = null;
  closedByClient = false;

  constructor(readonly link: NodeLink) {}

  send(data: Uint8Array): void {
    if (this.readyState !== 1) throw new Error("not open");
    void this.link.fromClient(data.slice());
  }

  close(): void {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.closedByClient = true;
    this.link.closed = true;
  }
}

/** The node's end of one connection. */
export class NodeLink {
  readonly socket: FakeSocket;
  sealer: FrameSealer | undefined;
  opener: FrameOpener | undefined;
  token = "";
  device = "";
  received: Received[] = [];
  heartbeats = 0;
  closed = false;
  private queue: Promise<void> = Promise.resolve();

  constructor(
    readonly node: FakeNode,
    readonly url = WS_URL,
  ) {
    this.socket = new FakeSocket(this);
  }

  fromClient(data: Uint8Array): Promise<void> {
    this.queue = this.queue.then(() => this.handle(data));
    return this.queue;
  }

  private async handle(data: Uint8Array): Promise<void> {
    if (this.closed) return;
    if (this.sealer === undefined) {
      await this.handshake(data);
      return;
    }
    if (data.length === 0) {
      this.heartbeats++;
      if (this.node.echoHeartbeats) this.deliver(new Uint8Array(0));
      return;
    }
    const frame = decodeFrame(this.opener!.open(data), ESTABLISHED_OUTBOUND);
    const received = { type: frame.type, message: frame.message };
    this.received.push(received);
    this.node.onFrame(this, received);
  }

  private async handshake(body: Uint8Array): Promise<void> {
    const hello = fromBinary(pb.ClientHelloSchema, body.subarray(1));
    let secret: Uint8Array;
    if (hello.resumeTicket.length > 0) {
      // Single use: taken out whatever follows. Refused: a plaintext HANDSHAKE_ERROR.
      const key = toHex(hello.resumeTicket);
      const ticket = this.node.tickets.get(key);
      this.node.tickets.delete(key);
      const digest = helloDigest(hello.version, hello.offeredSuites, hello.suite, hello.clientNonce, hello.keyFingerprint);
      const proof = ticket && resumeProof(ticket.secret, digest, hello.resumeTicket, hello.resumeDevice);
      if (ticket === undefined || !this.node.tokens.has(ticket.token) || toHex(proof!) !== toHex(hello.resumeProof)) {
        const refusal = create(pb.HandshakeErrorSchema, { reason: pb.HandshakeError_Reason.RESUME_REFUSED, message: "resumption refused" });
        this.deliver(concat(Uint8Array.of(pb.FrameType.HANDSHAKE_ERROR), toBinary(pb.HandshakeErrorSchema, refusal)));
        this.drop(1000);
        return;
      }
      this.token = ticket.token;
      this.device = ticket.device;
      secret = ticket.secret;
      this.node.resumptions++;
    } else {
      const material = fromBinary(
        pb.KeyMaterialSchema,
        privateDecrypt({ key: NODE_KEY_PEM, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: "sha256" }, hello.sealedKey),
      );
      this.token = material.token;
      this.device = material.device;
      secret = material.secret;
    }
    const serverNonce = randomBytes(16);
    const ciphers = await sessionCiphers(hello.suite, secret, hello.clientNonce, serverNonce, hello.keyFingerprint, hello.offeredSuites, "node");
    const moved = this.node.redirects.get(this.url);
    let status = this.node.tokens.has(this.token) ? pb.LoginResult_Status.OK : pb.LoginResult_Status.INVALID_TOKEN;
    if (moved !== undefined && status === pb.LoginResult_Status.OK) status = pb.LoginResult_Status.WRONG_NODE;
    const result = create(pb.LoginResultSchema, {
      status,
      ...(status === pb.LoginResult_Status.WRONG_NODE ? { node: moved } : {}),
      user: this.node.tokens.get(this.token) ?? "",
      device: this.device,
      heartbeatIntervalMs: this.node.heartbeatInterval,
      heartbeatTimeoutMs: this.node.heartbeatTimeout,
    });
    if (status === pb.LoginResult_Status.OK && this.node.resumeWindow > 0) {
      const ticket = randomBytes(24);
      this.node.tickets.set(toHex(ticket), {
        token: this.token,
        device: this.device,
        secret: await nextResumptionSecret(secret, hello.clientNonce, serverNonce, hello.keyFingerprint),
      });
      result.resumeTicket = ticket;
      result.resumeWindowMs = this.node.resumeWindow;
    }
    const first = encodeFrame(pb.FrameType.LOGIN_RESULT, pb.LoginResultSchema, result);
    this.deliver(concat(Uint8Array.of(pb.FrameType.LOGIN_RESULT), serverNonce, ciphers.sealer.seal(first)));
    this.node.logins++;
    if (status === pb.LoginResult_Status.OK) {
      this.sealer = ciphers.sealer;
      this.opener = ciphers.opener;
    } else {
      this.drop(1000);
    }
  }

  deliver(body: Uint8Array): void {
    if (this.closed) return;
    const data = body.buffer.slice(body.byteOffset, body.byteOffset + body.byteLength);
    this.socket.onmessage?.({ data });
  }

  /** Send one sealed frame to the client. */
  send<D extends DescMessage>(type: number, schema: D, init: MessageInitShape<D>): void {
    this.deliver(this.sealer!.seal(encodeFrame(type, schema, create(schema, init) as never)));
  }

  of(type: number): any[] {
    return this.received.filter((r) => r.type === type).map((r) => r.message);
  }

  /** The network drops the connection. */
  drop(code = 1006): void {
    if (this.closed) return;
    this.closed = true;
    this.socket.readyState = 3;
    this.socket.onclose?.({ code, reason: "" });
  }
}

export class FakeNode {
  links: NodeLink[] = [];
  tokens = new Map<string, string>();
  /** Resumption tickets issued and not yet used (hex ticket -> what it resumes). */
  tickets = new Map<string, { token: string; device: string; secret: Uint8Array }>();
  /** [im] resume_window in ms; 0: no tickets. */
  resumeWindow = 600_000;
  /** Hellos that resumed with a ticket. */
  resumptions = 0;
  logins = 0;
  routerLogins = 0;
  routerLogouts = 0;
  heartbeatInterval = 30_000;
  heartbeatTimeout = 90_000;
  echoHeartbeats = true;
  password = "secret";
  unreachableRouters = new Set<string>(["http://down.test"]);
  /** Called for every frame the client sends (after the node recorded it). */
  onFrame: (link: NodeLink, frame: Received) => void = () => {};
  /** Answer APP_STATE_R (foreground 30/90 s, background 120/300 s); false: refuse it. */
  appStates = true;
  /** Answer the login's summary at once with nothing unread (most tests). */
  autoSummary = true;
  /** A login at this gateway URL is answered WRONG_NODE naming that node. */
  redirects = new Map<string, MessageInitShape<typeof pb.NodeAddressSchema>>();
  /** The gateway URLs that answer (the router hands out WS_URL). */
  gateways = new Set<string>([WS_URL, WS_URL_2]);
  /** The gateway the router's login answer names. */
  routerGateway = WS_URL;

  constructor() {
    this.onFrame = (link, frame) => this.autoAnswer(link, frame);
  }

  get link(): NodeLink {
    return this.links[this.links.length - 1]!;
  }

  webSocket = (url: string): WebSocketLike => {
    if (!this.gateways.has(url)) throw new Error(`unknown WebSocket URL ${url}`);
    const link = new NodeLink(this, url);
    this.links.push(link);
    setImmediate(() => {
      link.socket.readyState = 1;
      link.socket.onopen?.({});
    });
    return link.socket;
  };

  fetch = async (input: string | URL | Request, init?: RequestInit): Promise<Response> => {
    const url = String(input);
    const origin = new URL(url).origin;
    if (this.unreachableRouters.has(origin)) throw new TypeError("fetch failed: connection refused");
    if (url.endsWith("/api/v1/login")) {
      const body = JSON.parse(String(init?.body));
      if (body.password !== this.password) {
        return json(401, { error: "invalid_credentials", message: "wrong user name or password" });
      }
      this.routerLogins++;
      const token = `token-${this.routerLogins}-${"x".repeat(30)}`;
      this.tokens.set(token, body.user);
      return json(200, {
        token,
        session_id: `s${this.routerLogins}`,
        user: body.user,
        node: { id: "node1", host: "127.0.0.1", port: 9000, ws_url: this.routerGateway },
        server_key: toBase64(SERVER_KEY),
        key_fingerprint: vectors.key_fingerprint,
        heartbeat_interval: this.heartbeatInterval / 1000,
        heartbeat_timeout: this.heartbeatTimeout / 1000,
        cipher_suites: ["chacha20-poly1305", "rc4-hmac-sha256"],
        expires_at: "2099-01-01T00:00:00.000Z",
      });
    }
    if (url.endsWith("/api/v1/logout")) {
      this.routerLogouts++;
      return json(200, {});
    }
    return json(404, { error: "not_found", message: url });
  };

  /** The default node behaviour: an empty summary, acks answered. */
  autoAnswer(link: NodeLink, frame: Received): void {
    const T = pb.FrameType;
    if (frame.type === T.OFFLINE_SUMMARY_R && this.autoSummary) {
      link.send(T.OFFLINE_SUMMARY_A, pb.OfflineSummaryASchema, { requestId: frame.message.requestId });
    } else if (frame.type === T.ACK_R) {
      link.send(T.ACK_A, pb.AckASchema, { msgId: frame.message.msgId });
    } else if (frame.type === T.APP_STATE_R) {
      const requestId = frame.message.requestId;
      if (!this.appStates) {
        link.send(T.ERROR, pb.ErrorSchema, { code: pb.Error_Code.BAD_REQUEST, requestType: T.APP_STATE_R, requestId, message: "unknown frame" });
        return;
      }
      const background = frame.message.state === pb.AppState.APP_BACKGROUND;
      link.send(T.APP_STATE_A, pb.AppStateASchema, {
        requestId,
        state: frame.message.state,
        heartbeatIntervalMs: background ? 120_000 : 30_000,
        heartbeatTimeoutMs: background ? 300_000 : 90_000,
      });
    } else if (frame.type === T.OFFLINE_ACK_R) {
      link.send(T.OFFLINE_ACK_A, pb.OfflineAckASchema, { requestId: frame.message.requestId, acknowledged: frame.message.cursors.length });
    }
  }
}

function json(status: number, body: unknown): Response {
  return new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json" } });
}

export { toBinary };
