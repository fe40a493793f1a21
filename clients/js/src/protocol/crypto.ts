/**
 * The session key schedule and the frame cipher (docs/protocol.md, docs/crypto.md).
 *
 * WebCrypto (globalThis.crypto.subtle, in browsers and Node) does RSA-OAEP and HKDF,
 * which it does natively and fast; @noble/ciphers does ChaCha20-Poly1305, which
 * WebCrypto lacks, synchronously, so frames are sealed and opened in order without
 * awaiting. ChaCha20-Poly1305 is the only suite this SDK offers: RC4 exists on the
 * node for old clients only.
 */
import { chacha20poly1305 } from "@noble/ciphers/chacha.js";
import { sha256 } from "@noble/hashes/sha2.js";
import { buffer, concat, u32, utf8 } from "./bytes.js";

export const PROTOCOL_VERSION = 2;
export const SECRET_SIZE = 32;
export const NONCE_SIZE = 16;
export const TAG_SIZE = 16;
export const MIN_RSA_BITS = 2048;
export const SUITE_CHACHA = "chacha20-poly1305";
export const SUITE_RC4 = "rc4-hmac-sha256";
export const KEY_LABEL = utf8("cim session keys");

const CLIENT_TO_NODE = 1;
const NODE_TO_CLIENT = 2;

/** A frame that failed to authenticate: tampered, replayed, reordered, wrong way. */
export class FrameAuthenticationError extends Error {
  override name = "FrameAuthenticationError";
}

export function subtle(): SubtleCrypto {
  const api = globalThis.crypto?.subtle;
  if (api === undefined) {
    throw new Error("WebCrypto (globalThis.crypto.subtle) is required: a secure context or Node 20");
  }
  return api;
}

export function randomBytes(size: number): Uint8Array {
  return globalThis.crypto.getRandomValues(new Uint8Array(size));
}

/** SHA-256 of the SubjectPublicKeyInfo DER: what the client pins. */
export function fingerprintOf(publicDer: Uint8Array): Uint8Array {
  return sha256(publicDer);
}

/** Count-prefixed list then length-prefixed names: no two offers encode alike. */
export function encodeSuites(offered: readonly string[], suite: string): Uint8Array {
  if (offered.length > 255) throw new RangeError("at most 255 suites can be offered");
  const parts: Uint8Array[] = [Uint8Array.of(offered.length)];
  for (const name of [...offered, suite]) {
    const encoded = utf8(name);
    if (encoded.length > 255) throw new RangeError("a suite name is longer than 255 bytes");
    parts.push(Uint8Array.of(encoded.length), encoded);
  }
  return concat(...parts);
}

/** The HKDF info: binds version, node key, the client's offer and the choice. */
export function keyScheduleInfo(
  fingerprint: Uint8Array,
  offered: readonly string[],
  suite: string,
): Uint8Array {
  if (fingerprint.length !== 32) throw new RangeError("the key fingerprint must be 32 bytes");
  return concat(KEY_LABEL, u32(PROTOCOL_VERSION), fingerprint, encodeSuites(offered, suite));
}

/** HKDF-SHA256 through WebCrypto. */
export async function hkdf(
  ikm: Uint8Array,
  salt: Uint8Array,
  info: Uint8Array,
  length: number,
): Promise<Uint8Array> {
  const api = subtle();
  const key = await api.importKey("raw", buffer(ikm), "HKDF", false, ["deriveBits"]);
  const bits = await api.deriveBits(
    { name: "HKDF", hash: "SHA-256", salt: buffer(salt), info: buffer(info) },
    key,
    length * 8,
  );
  return new Uint8Array(bits);
}

/** RSA-OAEP(SHA-256, MGF1-SHA-256, no label) to the node's public key. */
export async function sealForNode(publicDer: Uint8Array, plaintext: Uint8Array): Promise<Uint8Array> {
  const api = subtle();
  let key: CryptoKey;
  try {
    key = await api.importKey("spki", buffer(publicDer), { name: "RSA-OAEP", hash: "SHA-256" }, false, [
      "encrypt",
    ]);
  } catch {
    throw new Error("the node key is not an RSA public key");
  }
  const bits = (key.algorithm as RsaHashedKeyAlgorithm).modulusLength;
  if (bits < MIN_RSA_BITS) throw new Error(`the node key has fewer than ${MIN_RSA_BITS} bits`);
  const limit = bits / 8 - 2 * 32 - 2;
  if (plaintext.length > limit) {
    throw new Error(
      `${plaintext.length} bytes cannot be sealed to a ${bits}-bit key (at most ${limit}); ` +
        "use a shorter token or device name",
    );
  }
  return new Uint8Array(await api.encrypt({ name: "RSA-OAEP" }, key, buffer(plaintext)));
}

export interface FrameSealer {
  seal(plaintext: Uint8Array): Uint8Array;
}

export interface FrameOpener {
  open(body: Uint8Array): Uint8Array;
}

function nonce(direction: number, counter: number): Uint8Array {
  const out = new Uint8Array(12);
  const view = new DataView(out.buffer);
  view.setUint32(0, direction, false);
  view.setBigUint64(4, BigInt(counter), false);
  return out;
}

/** Seals one direction's frames; the nonce is the direction and the frame counter. */
export class ChaChaSealer implements FrameSealer {
  private counter = 0;

  constructor(
    private readonly key: Uint8Array,
    private readonly direction: number,
  ) {}

  seal(plaintext: Uint8Array): Uint8Array {
    const n = this.counter++;
    return chacha20poly1305(this.key, nonce(this.direction, n)).encrypt(plaintext);
  }
}

/** Opens one direction's frames in order; after one failure it opens nothing more. */
export class ChaChaOpener implements FrameOpener {
  private counter = 0;
  private failed = false;

  constructor(
    private readonly key: Uint8Array,
    private readonly direction: number,
  ) {}

  open(body: Uint8Array): Uint8Array {
    if (this.failed) throw new FrameAuthenticationError("the stream already failed authentication");
    try {
      const plaintext = chacha20poly1305(this.key, nonce(this.direction, this.counter)).decrypt(body);
      this.counter++;
      return plaintext;
    } catch {
      this.failed = true;
      throw new FrameAuthenticationError("frame failed authentication");
    }
  }
}

/**
 * The (sealer, opener) pair for one side of a session: HKDF-SHA256 with the client's
 * secret as input keying material and both nonces as salt. `role` "node" exists for
 * tests (a fake node), the SDK itself is always "client".
 */
export async function sessionCiphers(
  suite: string,
  secret: Uint8Array,
  clientNonce: Uint8Array,
  serverNonce: Uint8Array,
  fingerprint: Uint8Array,
  offered: readonly string[],
  role: "client" | "node" = "client",
): Promise<{ sealer: FrameSealer; opener: FrameOpener; okm: Uint8Array }> {
  if (secret.length !== SECRET_SIZE) throw new RangeError(`the session secret must be ${SECRET_SIZE} bytes`);
  if (clientNonce.length === 0 || serverNonce.length === 0) throw new RangeError("both nonces are required");
  if (suite !== SUITE_CHACHA) throw new Error(`cipher suite ${suite} is not supported by this client`);
  const okm = await hkdf(
    secret,
    concat(clientNonce, serverNonce),
    keyScheduleInfo(fingerprint, offered, suite),
    64,
  );
  const clientToNode = okm.slice(0, 32);
  const nodeToClient = okm.slice(32, 64);
  if (role === "client") {
    return {
      sealer: new ChaChaSealer(clientToNode, CLIENT_TO_NODE),
      opener: new ChaChaOpener(nodeToClient, NODE_TO_CLIENT),
      okm,
    };
  }
  return {
    sealer: new ChaChaSealer(nodeToClient, NODE_TO_CLIENT),
    opener: new ChaChaOpener(clientToNode, CLIENT_TO_NODE),
    okm,
  };
}
