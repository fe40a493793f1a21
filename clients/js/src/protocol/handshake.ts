/**
 * The client's half of the one-round-trip handshake (docs/protocol.md, "The handshake").
 *
 * The hello carries the router token sealed to the node's key together with the
 * secret the session keys come from; the node's answer is its nonce and the first
 * sealed frame (the LoginResult). Everything needed to check it byte for byte against
 * the Python implementation (random source, clock, even the RSA sealing) can be
 * injected: tests/vectors/protocol.json holds the expected bytes.
 */
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { hmac } from "@noble/hashes/hmac.js";
import { sha256 } from "@noble/hashes/sha2.js";
import * as pb from "../gen/cim_pb.js";
import { concat, u32, utf8 } from "./bytes.js";
import {
  FrameAuthenticationError,
  NONCE_SIZE,
  PROTOCOL_VERSION,
  SECRET_SIZE,
  encodeSuites,
  fingerprintOf,
  hkdf,
  randomBytes,
  sealForNode,
  sessionCiphers,
  type FrameOpener,
  type FrameSealer,
} from "./crypto.js";
import { ProtocolError } from "./frames.js";

export const HELLO_LABEL = utf8("cim client hello");
export const MAX_TOKEN_LENGTH = 256;
export const RESUMPTION_SECRET_LABEL = utf8("cim resumption secret");
export const RESUME_PROOF_LABEL = utf8("cim resume hello");

/**
 * What a client keeps to resume its session with one node (docs/crypto.md,
 * "Resumption"): the ticket of the last LoginResult (opaque) and the resumption secret
 * both sides derived from that session (never sent).
 */
export interface Resumption {
  ticket: Uint8Array;
  secret: Uint8Array;
  /** The node key the session was made with: the ticket is only offered to it. */
  fingerprint: Uint8Array;
  device: string;
  /** Client clock, ms: after this the ticket is not offered. */
  expiresAt: number;
}

/** The resumption secret a finished handshake leaves: HKDF-SHA256(secret, nonces, label || fingerprint). */
export function nextResumptionSecret(
  secret: Uint8Array,
  clientNonce: Uint8Array,
  serverNonce: Uint8Array,
  fingerprint: Uint8Array,
): Promise<Uint8Array> {
  return hkdf(secret, concat(clientNonce, serverNonce), concat(RESUMPTION_SECRET_LABEL, fingerprint), SECRET_SIZE);
}

/** HMAC-SHA256(resumption secret, label || hello digest || u16 len || ticket || u8 len || device). */
export function resumeProof(secret: Uint8Array, digest: Uint8Array, ticket: Uint8Array, device: string): Uint8Array {
  const name = utf8(device);
  if (ticket.length > 0xffff || name.length > 255) throw new RangeError("the ticket or the device name is too long");
  const length = Uint8Array.of(ticket.length >> 8, ticket.length & 0xff);
  return hmac(sha256, secret, concat(RESUME_PROOF_LABEL, digest, length, ticket, Uint8Array.of(name.length), name));
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((value, index) => value === b[index]);
}

/** SHA-256 over a canonical encoding of the hello's plaintext fields. */
export function helloDigest(
  version: number,
  offered: readonly string[],
  suite: string,
  clientNonce: Uint8Array,
  fingerprint: Uint8Array,
): Uint8Array {
  if (clientNonce.length > 255 || fingerprint.length > 255) throw new RangeError("a hello field is too long");
  return sha256(
    concat(
      HELLO_LABEL,
      u32(version),
      Uint8Array.of(clientNonce.length),
      clientNonce,
      Uint8Array.of(fingerprint.length),
      fingerprint,
      encodeSuites(offered, suite),
    ),
  );
}

/** The node refused the hello (HANDSHAKE_ERROR): `reason` says why. */
export class HandshakeRefused extends Error {
  override name = "HandshakeRefused";
  readonly reason: pb.HandshakeError_Reason;
  readonly reasonName: string;
  readonly allowedSuites: string[];
  readonly retryAfterMs: number;

  constructor(refusal: pb.HandshakeError) {
    const reasonName = pb.HandshakeError_Reason[refusal.reason] ?? String(refusal.reason);
    super(`handshake refused: ${reasonName}: ${refusal.message}`);
    this.reason = refusal.reason;
    this.reasonName = reasonName;
    this.allowedSuites = refusal.allowedSuites;
    this.retryAfterMs = refusal.retryAfterMs;
  }
}

export interface HandshakeOptions {
  serverKey: Uint8Array;
  token: string;
  device: string;
  suite: string;
  offered: readonly string[];
  nowMs: number;
  /** Defaults to crypto.getRandomValues; called for the nonce, then the secret. */
  random?: (size: number) => Uint8Array;
  /** Defaults to RSA-OAEP through WebCrypto (test vectors replace it). */
  seal?: (serverKey: Uint8Array, plaintext: Uint8Array) => Promise<Uint8Array>;
  /** The last session's ticket for this node: the hello resumes (no RSA) instead. */
  resume?: Resumption;
}

export interface HandshakeResult {
  sealer: FrameSealer;
  opener: FrameOpener;
  loginResult: pb.LoginResult;
}

export class ClientHandshake {
  readonly fingerprint: Uint8Array;
  readonly keyMaterial: Uint8Array;
  private serverNonce: Uint8Array | undefined;
  /** The hello carries a resumption ticket. */
  resumed = false;

  private constructor(
    readonly suite: string,
    readonly offered: readonly string[],
    readonly clientNonce: Uint8Array,
    private readonly secret: Uint8Array,
    fingerprint: Uint8Array,
    keyMaterial: Uint8Array,
    readonly helloBody: Uint8Array,
  ) {
    this.fingerprint = fingerprint;
    this.keyMaterial = keyMaterial;
  }

  /** Build the hello (async: WebCrypto's RSA is). */
  static async create(options: HandshakeOptions): Promise<ClientHandshake> {
    const { serverKey, token, device, suite, nowMs } = options;
    const offered = [...options.offered];
    if (!offered.includes(suite)) throw new Error(`the chosen suite ${suite} must be one of the offered suites`);
    const random = options.random ?? randomBytes;
    const fingerprint = fingerprintOf(serverKey);
    if (options.resume !== undefined) return ClientHandshake.resuming(options, offered, fingerprint, random);
    if (token.length === 0 || token.length > MAX_TOKEN_LENGTH) {
      throw new Error(`the token must be 1 to ${MAX_TOKEN_LENGTH} characters`);
    }
    const clientNonce = random(NONCE_SIZE);
    const secret = random(SECRET_SIZE);
    if (clientNonce.length !== NONCE_SIZE || secret.length !== SECRET_SIZE) {
      throw new Error("the random source returned the wrong number of bytes");
    }
    const material = toBinary(
      pb.KeyMaterialSchema,
      create(pb.KeyMaterialSchema, {
        secret,
        token,
        timestampMs: BigInt(nowMs),
        device,
        helloDigest: helloDigest(PROTOCOL_VERSION, offered, suite, clientNonce, fingerprint),
      }),
    );
    const sealedKey = await (options.seal ?? sealForNode)(serverKey, material);
    const hello = create(pb.ClientHelloSchema, {
      version: PROTOCOL_VERSION,
      offeredSuites: offered,
      suite,
      clientNonce,
      keyFingerprint: fingerprint,
      sealedKey,
    });
    const body = concat(Uint8Array.of(pb.FrameType.CLIENT_HELLO), toBinary(pb.ClientHelloSchema, hello));
    return new ClientHandshake(suite, offered, clientNonce, secret, fingerprint, material, body);
  }

  private static resuming(
    options: HandshakeOptions,
    offered: string[],
    fingerprint: Uint8Array,
    random: (size: number) => Uint8Array,
  ): ClientHandshake {
    const resume = options.resume!;
    if (!sameBytes(resume.fingerprint, fingerprint)) throw new Error("the resumption ticket is for another node key");
    const clientNonce = random(NONCE_SIZE);
    if (clientNonce.length !== NONCE_SIZE) throw new Error("the random source returned the wrong number of bytes");
    const digest = helloDigest(PROTOCOL_VERSION, offered, options.suite, clientNonce, fingerprint);
    const hello = create(pb.ClientHelloSchema, {
      version: PROTOCOL_VERSION,
      offeredSuites: offered,
      suite: options.suite,
      clientNonce,
      keyFingerprint: fingerprint,
      resumeTicket: resume.ticket,
      resumeProof: resumeProof(resume.secret, digest, resume.ticket, resume.device),
      resumeDevice: resume.device,
    });
    const body = concat(Uint8Array.of(pb.FrameType.CLIENT_HELLO), toBinary(pb.ClientHelloSchema, hello));
    const handshake = new ClientHandshake(
      options.suite,
      offered,
      clientNonce,
      resume.secret,
      fingerprint,
      new Uint8Array(0),
      body,
    );
    handshake.resumed = true;
    return handshake;
  }

  /**
   * What to resume with next time, from the LoginResult `finish` returned (undefined
   * when the node issued no ticket). `nowMs`: the client clock now.
   */
  async resumptionAfter(loginResult: pb.LoginResult, nowMs: number): Promise<Resumption | undefined> {
    if (this.serverNonce === undefined || loginResult.resumeTicket.length === 0 || !loginResult.resumeWindowMs) {
      return undefined;
    }
    return {
      ticket: loginResult.resumeTicket,
      secret: await nextResumptionSecret(this.secret, this.clientNonce, this.serverNonce, this.fingerprint),
      fingerprint: this.fingerprint,
      device: loginResult.device,
      expiresAt: nowMs + loginResult.resumeWindowMs,
    };
  }

  /**
   * Turn the node's first frame into ciphers and the LoginResult. Throws
   * HandshakeRefused (the node said no), FrameAuthenticationError (the sealed part
   * does not open: a tampered hello or the wrong node) or ProtocolError.
   */
  async finish(replyBody: Uint8Array): Promise<HandshakeResult> {
    if (replyBody.length === 0) throw new ProtocolError("empty handshake reply");
    const kind = replyBody[0];
    if (kind === pb.FrameType.HANDSHAKE_ERROR) {
      let refusal: pb.HandshakeError;
      try {
        refusal = fromBinary(pb.HandshakeErrorSchema, replyBody.subarray(1));
      } catch {
        throw new ProtocolError("the handshake refusal does not parse");
      }
      throw new HandshakeRefused(refusal);
    }
    if (kind !== pb.FrameType.LOGIN_RESULT) throw new ProtocolError(`unexpected handshake reply type ${kind}`);
    const serverNonce = replyBody.subarray(1, 1 + NONCE_SIZE);
    if (serverNonce.length !== NONCE_SIZE) throw new FrameAuthenticationError("handshake reply truncated");
    const { sealer, opener } = await sessionCiphers(
      this.suite,
      this.secret,
      this.clientNonce,
      serverNonce,
      this.fingerprint,
      this.offered,
    );
    const first = opener.open(replyBody.subarray(1 + NONCE_SIZE));
    if (first.length === 0 || first[0] !== pb.FrameType.LOGIN_RESULT) {
      throw new ProtocolError("the first encrypted frame is not a LOGIN_RESULT");
    }
    let loginResult: pb.LoginResult;
    try {
      loginResult = fromBinary(pb.LoginResultSchema, first.subarray(1));
    } catch {
      throw new ProtocolError("the LoginResult does not parse");
    }
    this.serverNonce = serverNonce.slice();
    return { sealer, opener, loginResult };
  }
}
