/**
 * One connection to a node over the WebSocket gateway (cim/client/connection.py).
 *
 * One binary WebSocket message carries one frame body exactly as on TCP without the
 * length prefix; an empty message is the heartbeat. The connection does the
 * one-round-trip handshake, sends a heartbeat only when it has been quiet, notices a
 * silent node, and hands decoded frames to its owner. Heartbeats follow the
 * application's foreground/background state (`setForeground`): in the background the
 * interval stretches towards the node's timeout (fewer wake-ups, less battery), and
 * coming back to the foreground probes the node at once, so a connection that died
 * while the page slept is found at once rather than after a whole timeout.
 * Reconnecting is the session's business, not this class's.
 */
import type { Clock, Timer } from "../clock.js";
import { FrameAuthenticationError, type FrameOpener, type FrameSealer } from "../protocol/crypto.js";
import { ESTABLISHED_INBOUND, ESTABLISHED_OUTBOUND, ProtocolError, decodeFrame, encodeFrame, pb } from "../protocol/frames.js";
import { ClientHandshake, HandshakeRefused, type HandshakeOptions, type Resumption } from "../protocol/handshake.js";

export const DEFAULT_MAX_FRAME_SIZE = 1 << 20;
export const HANDSHAKE_TIMEOUT = 10_000;

/** The standard WebSocket interface (browsers; the `ws` package in Node). */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code?: number; reason?: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketFactory = (url: string) => WebSocketLike | Promise<WebSocketLike>;

/** globalThis.WebSocket where there is one (browsers, Node 22), else the `ws` package. */
export const defaultWebSocket: WebSocketFactory = async (url) => {
  const native = (globalThis as { WebSocket?: new (url: string) => WebSocketLike }).WebSocket;
  if (native !== undefined) return new native(url);
  const module = (await import("ws")) as unknown as { default: new (url: string) => WebSocketLike };
  return new module.default(url);
};

/** The node decrypted the hello but refused the login (`statusName` says why). */
export class LoginRefused extends Error {
  override name = "LoginRefused";
  readonly statusName: string;
  constructor(readonly result: pb.LoginResult) {
    const statusName = pb.LoginResult_Status[result.status] ?? String(result.status);
    super(`login refused: ${statusName}: ${result.message}`);
    this.statusName = statusName;
  }
}

/** The connection closed or could not be opened (a transport problem: retry). */
export class ConnectionClosed extends Error {
  override name = "ConnectionClosed";
}

export interface ConnectionEvents {
  frame(type: number, message: object): void;
  closed(reason: string): void;
}

export interface ConnectionOptions extends Omit<HandshakeOptions, "nowMs"> {
  url: string;
  clock: Clock;
  webSocket?: WebSocketFactory;
  maxFrameSize?: number;
  handshakeTimeout?: number;
  foreground?: boolean;
}

export class ImConnection {
  private socket: WebSocketLike | undefined;
  private handshake: ClientHandshake | undefined;
  private sealer: FrameSealer | undefined;
  private opener: FrameOpener | undefined;
  private idleTimer: Timer | undefined;
  private silenceTimer: Timer | undefined;
  private closed = false;
  private lastHeard = 0;
  private foreground: boolean;
  private nodePaced = false;
  /** ms, from the LoginResult (the router's values until then). */
  heartbeatInterval = 30_000;
  heartbeatTimeout = 90_000;
  loginResult: pb.LoginResult | undefined;
  /** The next connection to this node resumes with this (once logged in). */
  resumption: Resumption | undefined;
  heartbeatsSent = 0;
  heartbeatsReceived = 0;
  private incoming: Promise<void> = Promise.resolve();
  /** Messages received and not yet dealt with (opening them is asynchronous). */
  private opening = 0;
  private settle: { resolve: (r: pb.LoginResult) => void; reject: (e: Error) => void } | undefined;

  constructor(
    private readonly options: ConnectionOptions,
    private readonly events: ConnectionEvents,
  ) {
    this.foreground = options.foreground ?? true;
  }

  /** The hello carried a resumption ticket (no RSA, no router). */
  get resumed(): boolean {
    return this.handshake?.resumed ?? false;
  }

  get established(): boolean {
    return this.sealer !== undefined && !this.closed;
  }

  /** Connect and log in; resolves with the LoginResult (status OK). */
  open(): Promise<pb.LoginResult> {
    return new Promise<pb.LoginResult>((resolve, reject) => {
      this.settle = { resolve, reject };
      void this.start();
    });
  }

  private async start(): Promise<void> {
    const { clock } = this.options;
    this.silenceTimer = clock.later(this.options.handshakeTimeout ?? HANDSHAKE_TIMEOUT, () =>
      this.close("the node did not finish the handshake in time"),
    );
    try {
      this.handshake = await ClientHandshake.create({ ...this.options, nowMs: clock.now() });
      const socket = await (this.options.webSocket ?? defaultWebSocket)(this.options.url);
      if (this.closed) {
        socket.close();
        return;
      }
      this.socket = socket;
      socket.binaryType = "arraybuffer";
      socket.onopen = () => this.socket === socket && socket.send(this.handshake!.helloBody);
      // In order, one at a time: the handshake's reply is opened asynchronously
      // (WebCrypto), and frames right behind it must wait for the keys.
      socket.onmessage = (event) => {
        this.opening++;
        this.incoming = this.incoming.then(() => this.received(event.data)).finally(() => this.opening--);
      };
      socket.onerror = () => {};
      if (socket.readyState === 1) socket.send(this.handshake.helloBody); // already open
      // Behind the messages that came before it: a node that refuses the login (or
      // kicks) closes right after saying why, and the why is still being opened.
      socket.onclose = (event) => {
        const why = `the connection closed${event?.code ? ` (${event.code}${event.reason ? `: ${event.reason}` : ""})` : ""}`;
        if (this.opening) this.incoming = this.incoming.then(() => this.close(why, false));
        else this.close(why, false);
      };
    } catch (error) {
      this.close(error instanceof Error ? error.message : String(error), true, error);
    }
  }

  private async received(data: unknown): Promise<void> {
    if (this.closed) return;
    let body: Uint8Array;
    if (data instanceof ArrayBuffer) body = new Uint8Array(data);
    else if (data instanceof Uint8Array) body = data;
    else {
      this.close("the node sent a text message", true, new ProtocolError("text message"));
      return;
    }
    const max = this.options.maxFrameSize ?? DEFAULT_MAX_FRAME_SIZE;
    if (body.length > max) {
      this.close(`a frame of ${body.length} bytes exceeds the limit ${max}`, true, new ProtocolError("frame too large"));
      return;
    }
    this.lastHeard = this.options.clock.now();
    if (this.opener === undefined) {
      await this.finishHandshake(body);
      return;
    }
    this.restartSilence();
    if (body.length === 0) {
      this.heartbeatsReceived++;
      return;
    }
    let frame;
    try {
      frame = decodeFrame(this.opener.open(body), ESTABLISHED_INBOUND);
    } catch (error) {
      this.close(`a bad frame: ${(error as Error).message}`, true, error);
      return;
    }
    this.events.frame(frame.type, frame.message as object);
  }

  private async finishHandshake(body: Uint8Array): Promise<void> {
    if (body.length === 0) {
      this.close("a heartbeat before the handshake", true, new ProtocolError("early heartbeat"));
      return;
    }
    try {
      const { sealer, opener, loginResult } = await this.handshake!.finish(body);
      this.loginResult = loginResult;
      if (loginResult.status !== pb.LoginResult_Status.OK) {
        this.close(`login refused: ${pb.LoginResult_Status[loginResult.status]}`, true, new LoginRefused(loginResult));
        return;
      }
      this.resumption = await this.handshake!.resumptionAfter(loginResult, this.options.clock.now());
      this.sealer = sealer;
      this.opener = opener;
      this.heartbeatInterval = loginResult.heartbeatIntervalMs || this.heartbeatInterval;
      this.heartbeatTimeout = loginResult.heartbeatTimeoutMs || this.heartbeatTimeout;
      this.restartSilence();
      this.restartIdle();
      const settle = this.settle;
      this.settle = undefined;
      settle?.resolve(loginResult);
    } catch (error) {
      const why = error instanceof HandshakeRefused || error instanceof FrameAuthenticationError ? error.message : String(error);
      this.close(why, true, error);
    }
  }

  /**
   * Another pace from now on: the node's APP_STATE_A for the app's state. Both timers
   * start again with the new values, and the interval is the node's from then on.
   */
  setHeartbeat(interval: number, timeout: number): void {
    this.heartbeatInterval = interval;
    this.heartbeatTimeout = timeout;
    this.nodePaced = true;
    if (this.established) {
      this.restartSilence();
      this.restartIdle();
    }
  }

  /**
   * The heartbeat interval in use: the node's (its APP_STATE_A, when it answered one);
   * else, in the background, stretched towards the node's timeout.
   */
  get currentInterval(): number {
    if (this.foreground || this.nodePaced) return this.heartbeatInterval;
    // Still well inside the node's timeout: a late background timer must not cost the session.
    return Math.max(this.heartbeatInterval, Math.floor((this.heartbeatTimeout * 2) / 3));
  }

  /** The application came to the foreground (true) or went to the background. */
  setForeground(foreground: boolean): void {
    const was = this.foreground;
    this.foreground = foreground;
    if (!this.established) return;
    if (foreground && !was) {
      // Timers sleep with a background page: check the deadline by the clock, then probe.
      if (this.options.clock.now() - this.lastHeard > this.heartbeatTimeout) {
        this.close("the node went silent while in the background");
        return;
      }
      this.sendHeartbeat();
    }
    this.restartIdle();
  }

  /** Send an established-state frame. */
  send(type: number, message: object): void {
    if (!this.established || this.socket === undefined) throw new ConnectionClosed("not connected");
    const schema = ESTABLISHED_OUTBOUND.get(type);
    if (schema === undefined) throw new ProtocolError(`${pb.FrameType[type] ?? type} is not a client frame`);
    this.socket.send(this.sealer!.seal(encodeFrame(type, schema, message as never)));
    this.restartIdle();
  }

  sendHeartbeat(): void {
    if (!this.established || this.socket === undefined) return;
    this.socket.send(new Uint8Array(0));
    this.heartbeatsSent++;
  }

  private restartSilence(): void {
    this.silenceTimer?.cancel();
    this.silenceTimer = this.options.clock.later(this.heartbeatTimeout, () => this.close("the node went silent"));
  }

  private restartIdle(): void {
    this.idleTimer?.cancel();
    this.idleTimer = this.options.clock.later(this.currentInterval, () => {
      this.sendHeartbeat();
      this.restartIdle();
    });
  }

  /** Close (once): a handshake still waiting rejects with `error` or ConnectionClosed. */
  close(why = "closed by the client", closeSocket = true, error?: unknown): void {
    if (this.closed) return;
    this.closed = true;
    this.idleTimer?.cancel();
    this.silenceTimer?.cancel();
    if (closeSocket && this.socket !== undefined) {
      try {
        this.socket.close(1000);
      } catch {
        // already closing
      }
    }
    const settle = this.settle;
    this.settle = undefined;
    if (settle !== undefined) {
      settle.reject(error instanceof Error ? error : new ConnectionClosed(why));
      return;
    }
    this.events.closed(why);
  }
}
