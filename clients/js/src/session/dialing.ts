/**
 * Reaching a node for a session: login, fast reconnect, backoff, the first deadline
 * (cim/client/dialing.py).
 *
 * Reconnecting tries the node it had with the still-valid token first (design: 快速连接,
 * one round trip); only if that fails does it log in through the router again. A node
 * that redirects (WRONG_NODE naming a node with a gateway, `ws_url`) is followed once. Failed
 * attempts wait the reconnect backoff (jittered: the clients of a node that went away
 * do not all come back at once); a node that asks for longer (a RATE_LIMITED
 * handshake, GOING_AWAY) gets it. The first connection may have a deadline.
 */
import type { Backoff, Clock, Timer } from "../clock.js";
import { SUITE_CHACHA, fingerprintOf } from "../protocol/crypto.js";
import { pb } from "../protocol/frames.js";
import { HandshakeRefused, type Resumption } from "../protocol/handshake.js";
import { ImConnection, LoginRefused, type ConnectionEvents, type WebSocketFactory } from "./connection.js";
import { RouterError, type LoginTicket, type RouterClient } from "./router.js";

/** The session cannot go on without the user (bad password, refused suite, kicked). */
export class SessionFailed extends Error {
  override name = "SessionFailed";
}

/** The router or node said no. */
export class SessionRefused extends SessionFailed {
  override name = "SessionRefused";
}

/** The router or node could not be reached before the first connection's deadline. */
export class Unreachable extends SessionFailed {
  override name = "Unreachable";
}

/** The node would not resume with the ticket: a full hello follows at once. */
class ResumeRefused extends Error {}

class RetryLater extends Error {
  constructor(
    readonly delay: number,
    why: string,
  ) {
    super(why);
  }
}

/** The ticket moved to the node a WRONG_NODE names, if that node has a gateway. */
function redirect(error: unknown, ticket: LoginTicket): LoginTicket | undefined {
  if (!(error instanceof LoginRefused) || error.result.status !== pb.LoginResult_Status.WRONG_NODE) return undefined;
  const node = error.result.node;
  if (node === undefined || !node.wsUrl) return undefined; // the router knows where it lives
  return { ...ticket, node: { id: node.id, host: node.host, port: node.port }, ws: node.wsUrl };
}

/** What the dialer needs from its session. */
export interface DialTarget {
  readonly user: string;
  readonly device: string;
  readonly stopping: boolean;
  readonly foreground: boolean;
  readonly maxFrameSize: number;
  ticket: LoginTicket | undefined;
  current: ImConnection | undefined;
  setState(state: "connecting" | "reconnecting", detail: string): void;
  loggedIn(connection: ImConnection, result: pb.LoginResult, where: string): void;
  giveUp(why: string, error: SessionFailed): void;
  frame(type: number, message: object): void;
  closed(reason: string): void;
}

export const OFFERED_SUITES = [SUITE_CHACHA] as const;

export class Dialer {
  private timer: Timer | undefined;
  private firstContact: Timer | undefined;
  private attempt = 0;
  private attempting = false;
  private generation = 0;
  private lastFailure = "";
  /** The node's GOING_AWAY wait (ms) before the next connection, once. */
  goingAway = 0;
  /**
   * The last session's resumption ticket: the next connection to the same node within
   * its window skips RSA (and the router); refused, a full hello follows.
   */
  resumption: Resumption | undefined;

  constructor(
    private readonly session: DialTarget,
    private readonly clock: Clock,
    private readonly router: RouterClient,
    private readonly password: string,
    private readonly backoff: Backoff,
    private readonly webSocket: WebSocketFactory | undefined,
    private readonly random: () => number,
  ) {}

  firstDeadline(ms: number): void {
    this.firstContact ??= this.clock.later(ms, () => {
      this.firstContact = undefined;
      const why = this.lastFailure || "no answer";
      this.cancel();
      this.session.giveUp(`${why} (gave up after ${ms / 1000} s)`, new Unreachable(why));
    });
  }

  endFirstContact(): void {
    this.firstContact?.cancel();
    this.firstContact = undefined;
  }

  /** Stop any wait or attempt in progress. */
  cancel(): void {
    this.timer?.cancel();
    this.timer = undefined;
    this.generation++;
  }

  connectSoon(delay: number): void {
    if (this.session.stopping) return;
    this.timer?.cancel();
    this.timer = undefined;
    if (delay <= 0) {
      const generation = this.generation;
      queueMicrotask(() => generation === this.generation && void this.establish());
      return;
    }
    this.session.setState("reconnecting", `in ${(delay / 1000).toFixed(1)} s`);
    this.timer = this.clock.later(delay, () => void this.establish());
  }

  /** Reconnect now (the network came back, the page came to the foreground). */
  hurry(): void {
    if (this.timer?.active && !this.attempting) this.connectSoon(0);
  }

  /** The connection dropped: again after GOING_AWAY's wait or the first backoff. */
  reconnect(): void {
    const delay = this.goingAway || this.backoff.delay(0, this.random);
    this.goingAway = 0;
    this.connectSoon(delay);
  }

  private async establish(): Promise<void> {
    this.timer = undefined;
    if (this.attempting || this.session.stopping) return;
    this.attempting = true;
    const generation = this.generation;
    this.session.setState("connecting", "");
    try {
      await this.reachANode(generation);
    } catch (error) {
      if (generation !== this.generation || this.session.stopping) return;
      if (error instanceof SessionFailed) {
        this.session.giveUp(error.message, error);
        return;
      }
      this.lastFailure = error instanceof Error ? error.message : String(error);
      let delay = this.backoff.delay(this.attempt++, this.random);
      if (error instanceof RetryLater) delay = Math.max(delay, error.delay);
      this.connectSoon(delay);
    } finally {
      this.attempting = false;
    }
  }

  private async reachANode(generation: number): Promise<void> {
    const cached = this.session.ticket;
    if (cached !== undefined && (!cached.expiresAt || cached.expiresAt > this.clock.now())) {
      try {
        await this.open(cached, generation);
        return;
      } catch (error) {
        const moved = redirect(error, cached);
        if (moved !== undefined && generation === this.generation) {
          this.session.ticket = moved;
          await this.open(moved, generation);
          return;
        }
        if (error instanceof SessionFailed || error instanceof RetryLater) throw error;
        // The cached login no longer works (token gone, node gone): the router again.
      }
    }
    if (generation !== this.generation) return;
    this.resumption = undefined;
    this.session.ticket = await this.login();
    await this.open(this.session.ticket, generation);
  }

  private async login(): Promise<LoginTicket> {
    const { user, device } = this.session;
    let ticket: LoginTicket;
    try {
      ticket = await this.router.login(user, this.password, device);
    } catch (error) {
      if (error instanceof RouterError && [400, 401, 403, 409].includes(error.status)) {
        throw new SessionRefused(error.message);
      }
      throw error;
    }
    if (ticket.cipherSuites.length && !ticket.cipherSuites.includes(SUITE_CHACHA)) {
      throw new SessionRefused(`the node does not allow ${SUITE_CHACHA}; it allows: ${ticket.cipherSuites.join(", ")}`);
    }
    if (ticket.ws === undefined) {
      throw new SessionRefused("the node has no WebSocket gateway (its [ws] section is not enabled)");
    }
    return ticket;
  }

  /** The resumption to offer this node, if one is still good for it. */
  private resumable(ticket: LoginTicket): Resumption | undefined {
    const resumption = this.resumption;
    if (resumption === undefined) return undefined;
    const fingerprint = fingerprintOf(ticket.serverKey);
    const sameKey =
      fingerprint.length === resumption.fingerprint.length &&
      fingerprint.every((value, index) => value === resumption.fingerprint[index]);
    if (resumption.expiresAt <= this.clock.now() || !sameKey || resumption.device !== this.session.device) {
      return undefined;
    }
    return resumption;
  }

  private async open(ticket: LoginTicket, generation: number): Promise<void> {
    const resume = this.resumable(ticket);
    this.resumption = undefined; // single use whatever happens
    try {
      await this.openWith(ticket, generation, resume);
    } catch (error) {
      if (!(error instanceof ResumeRefused) || generation !== this.generation) throw error;
      await this.openWith(ticket, generation, undefined);
    }
  }

  private async openWith(ticket: LoginTicket, generation: number, resume: Resumption | undefined): Promise<void> {
    const session = this.session;
    let connection: ImConnection;
    const events: ConnectionEvents = {
      // Only the session's current connection speaks: an abandoned one stays quiet.
      frame: (type, message) => session.current === connection && session.frame(type, message),
      closed: (reason) => session.current === connection && session.closed(reason),
    };
    connection = new ImConnection(
      {
        url: ticket.ws!,
        clock: this.clock,
        serverKey: ticket.serverKey,
        token: ticket.token,
        device: session.device,
        suite: SUITE_CHACHA,
        offered: OFFERED_SUITES,
        maxFrameSize: session.maxFrameSize,
        foreground: session.foreground,
        ...(resume ? { resume } : {}),
        ...(this.webSocket ? { webSocket: this.webSocket } : {}),
      },
      events,
    );
    connection.heartbeatInterval = ticket.heartbeatInterval;
    connection.heartbeatTimeout = ticket.heartbeatTimeout;
    let result: pb.LoginResult;
    // Current from the start: frames right behind the LoginResult reach the session.
    session.current = connection;
    try {
      result = await connection.open();
    } catch (error) {
      if (session.current === connection) session.current = undefined;
      if (error instanceof HandshakeRefused) {
        if (error.reason === pb.HandshakeError_Reason.RATE_LIMITED) throw new RetryLater(error.retryAfterMs, error.message);
        // RESUME_REFUSED, or any refusal of a resume hello (an older node answers it
        // BAD_HELLO): the full hello decides.
        if (resume) throw new ResumeRefused(error.message);
        throw new SessionRefused(`the node refused the handshake: ${error.message}`);
      }
      if (error instanceof LoginRefused && error.result.status === pb.LoginResult_Status.WRONG_NODE) {
        session.ticket = undefined; // the router knows where the session lives now
      }
      throw error;
    }
    if (generation !== this.generation || session.stopping) {
      if (session.current === connection) session.current = undefined;
      connection.close("no longer wanted");
      return;
    }
    this.resumption = connection.resumption;
    this.attempt = 0;
    this.lastFailure = "";
    this.endFirstContact();
    session.loggedIn(connection, result, ticket.ws!);
  }

  /** End the session at the router (best effort). */
  async logout(): Promise<void> {
    const ticket = this.session.ticket;
    this.session.ticket = undefined;
    this.resumption = undefined;
    if (ticket === undefined) return;
    try {
      await this.router.logout(ticket.token);
    } catch {
      // best effort: the token expires anyway
    }
  }
}
