// Acceptance 1: the handshake and frames, both directions, byte for byte against the
// Python implementation (tests/vectors/protocol.json, made by
// `python -m tests.vectors.protocol`; the same vectors are in docs/protocol.md).
import { fromJson, toJson, type JsonValue } from "@bufbuild/protobuf";
import assert from "node:assert/strict";
import { constants, privateDecrypt } from "node:crypto";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { fromHex, toHex } from "../src/protocol/bytes.js";
import {
  FrameAuthenticationError,
  SUITE_CHACHA,
  SUITE_RC4,
  hkdf,
  keyScheduleInfo,
  sealForNode,
  sessionCiphers,
} from "../src/protocol/crypto.js";
import {
  ESTABLISHED_INBOUND,
  ESTABLISHED_OUTBOUND,
  FrameSplitter,
  decodeFrame,
  encodeFrame,
  lengthPrefixed,
  pb,
} from "../src/protocol/frames.js";
import {
  ClientHandshake,
  HandshakeRefused,
  helloDigest,
  nextResumptionSecret,
  resumeProof,
} from "../src/protocol/handshake.js";

interface FrameVector {
  direction: "client_to_node" | "node_to_client";
  type: string;
  type_number: number;
  n: number;
  json: JsonValue;
  plaintext: string;
  body: string;
  tcp: string;
}
interface SessionVector {
  offered_suites: string[];
  suite: string;
  hello_digest: string;
  key_material: string;
  sealed_key: string;
  hello_body: string;
  hello_tcp: string;
  login_result: JsonValue;
  login_result_plaintext: string;
  reply_body: string;
  reply_tcp: string;
  frames: FrameVector[];
}
interface Vectors {
  inputs: {
    secret: string;
    client_nonce: string;
    server_nonce: string;
    token: string;
    device: string;
    timestamp_ms: number;
  };
  node_key_pem: string;
  server_key: string;
  key_fingerprint: string;
  heartbeat: { body: string; tcp: string };
  handshake_error: { json: JsonValue; body: string; tcp: string };
  sessions: SessionVector[];
  resumption: {
    client_nonce: string;
    server_nonce: string;
    resumption_secret: string;
    ticket: string;
    resume_window_ms: number;
    hello_digest: string;
    resume_proof: string;
    hello_body: string;
    hello_tcp: string;
    login_result: JsonValue;
    login_result_plaintext: string;
    reply_body: string;
    next_resumption_secret: string;
  };
}

const vectors: Vectors = JSON.parse(
  readFileSync(new URL("../../../../tests/vectors/protocol.json", import.meta.url), "utf8"),
);
const inputs = vectors.inputs;
const serverKey = fromHex(vectors.server_key);

/** The vectors' random source: the nonce, then the secret (as the Python client asks). */
function fixedRandom(): (size: number) => Uint8Array {
  const queue = [fromHex(inputs.client_nonce), fromHex(inputs.secret)];
  return (size) => {
    const next = queue.shift();
    assert.ok(next && next.length === size, `unexpected random request of ${size} bytes`);
    return next;
  };
}

async function handshake(session: SessionVector, seal = true): Promise<ClientHandshake> {
  return ClientHandshake.create({
    serverKey,
    token: inputs.token,
    device: inputs.device,
    suite: session.suite,
    offered: session.offered_suites,
    nowMs: inputs.timestamp_ms,
    random: fixedRandom(),
    // OAEP is randomised: for the byte-for-byte hello, use the sealed key Python made.
    ...(seal ? { seal: async () => fromHex(session.sealed_key) } : {}),
  });
}

for (const [index, session] of vectors.sessions.entries()) {
  const label = `session ${index} (offered ${session.offered_suites.join(",")})`;

  test(`${label}: hello digest, key material and CLIENT_HELLO byte for byte`, async () => {
    assert.equal(
      toHex(
        helloDigest(2, session.offered_suites, session.suite, fromHex(inputs.client_nonce), fromHex(vectors.key_fingerprint)),
      ),
      session.hello_digest,
    );
    const client = await handshake(session);
    assert.equal(toHex(client.fingerprint), vectors.key_fingerprint);
    assert.equal(toHex(client.keyMaterial), session.key_material);
    assert.equal(toHex(client.helloBody), session.hello_body);
    assert.equal(toHex(lengthPrefixed(client.helloBody)), session.hello_tcp);
  });

  test(`${label}: WebCrypto's RSA-OAEP opens with the node's key to the same key material`, async () => {
    const client = await handshake(session, false);
    const hello = pb.ClientHelloSchema;
    const parsed = decodeFrame(client.helloBody, new Map([[pb.FrameType.CLIENT_HELLO, hello]]));
    const sealed = (parsed.message as pb.ClientHello).sealedKey;
    assert.notEqual(toHex(sealed), session.sealed_key); // randomised
    const opened = privateDecrypt(
      { key: vectors.node_key_pem, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: "sha256" },
      sealed,
    );
    assert.equal(opened.toString("hex"), session.key_material);
  });

  test(`${label}: the node's reply opens to the LoginResult`, async () => {
    const client = await handshake(session);
    const reply = fromHex(session.reply_body);
    assert.equal(toHex(lengthPrefixed(reply)), session.reply_tcp);
    const result = await client.finish(reply);
    assert.deepEqual(toJson(pb.LoginResultSchema, result.loginResult), session.login_result);
    assert.equal(result.loginResult.status, pb.LoginResult_Status.OK);
  });

  test(`${label}: frames both ways, byte for byte, counters per direction`, async () => {
    const client = await handshake(session);
    const { sealer, opener } = await client.finish(fromHex(session.reply_body));
    // A fake node with the same keys: what the client seals, it opens, and back.
    const node = await sessionCiphers(
      session.suite,
      fromHex(inputs.secret),
      fromHex(inputs.client_nonce),
      fromHex(inputs.server_nonce),
      fromHex(vectors.key_fingerprint),
      session.offered_suites,
      "node",
    );
    node.sealer.seal(fromHex(session.login_result_plaintext)); // the node's counter 0
    let checked = 0;
    for (const frame of session.frames) {
      if (frame.direction === "client_to_node") {
        const schema = ESTABLISHED_OUTBOUND.get(frame.type_number);
        assert.ok(schema, `${frame.type} is a client frame`);
        const plaintext = encodeFrame(frame.type_number, schema, fromJson(schema, frame.json));
        assert.equal(toHex(plaintext), frame.plaintext, `${frame.type} n=${frame.n} plaintext`);
        const body = sealer.seal(plaintext);
        assert.equal(toHex(body), frame.body, `${frame.type} n=${frame.n} body`);
        assert.equal(toHex(lengthPrefixed(body)), frame.tcp);
        assert.equal(toHex(node.opener.open(body)), frame.plaintext);
      } else {
        const plaintext = opener.open(fromHex(frame.body));
        assert.equal(toHex(plaintext), frame.plaintext, `${frame.type} n=${frame.n} plaintext`);
        const decoded = decodeFrame(plaintext, ESTABLISHED_INBOUND);
        assert.equal(decoded.type, frame.type_number);
        const schema = ESTABLISHED_INBOUND.get(frame.type_number)!;
        assert.deepEqual(toJson(schema, decoded.message as never), frame.json);
        assert.equal(toHex(node.sealer.seal(plaintext)), frame.body);
      }
      checked++;
    }
    assert.equal(checked, session.frames.length);
    assert.ok(session.frames.some((f) => f.direction === "client_to_node"));
    assert.ok(session.frames.some((f) => f.direction === "node_to_client"));
  });

  test(`${label}: a replayed, reordered or tampered frame fails and ends the stream`, async () => {
    const client = await handshake(session);
    const { opener } = await client.finish(fromHex(session.reply_body));
    const nodeFrames = session.frames.filter((f) => f.direction === "node_to_client");
    assert.throws(() => opener.open(fromHex(nodeFrames[1]!.body)), FrameAuthenticationError);
    // Even the right frame is refused once the stream failed.
    assert.throws(() => opener.open(fromHex(nodeFrames[0]!.body)), FrameAuthenticationError);
  });
}

test("a HANDSHAKE_ERROR becomes HandshakeRefused with its reason and allowed suites", async () => {
  const client = await handshake(vectors.sessions[0]!);
  const body = fromHex(vectors.handshake_error.body);
  assert.equal(toHex(lengthPrefixed(body)), vectors.handshake_error.tcp);
  await assert.rejects(client.finish(body), (error: unknown) => {
    assert.ok(error instanceof HandshakeRefused);
    assert.equal(error.reasonName, "SUITE_NOT_ALLOWED");
    assert.deepEqual(error.allowedSuites, [SUITE_RC4]);
    return true;
  });
});

test("a reply sealed for another hello does not authenticate", async () => {
  const [first, second] = vectors.sessions;
  const client = await handshake(first!);
  await assert.rejects(client.finish(fromHex(second!.reply_body)), FrameAuthenticationError);
});

test("the heartbeat is the empty body, four zero bytes on TCP, and splits back", () => {
  assert.equal(toHex(lengthPrefixed(new Uint8Array(0))), vectors.heartbeat.tcp);
  const session = vectors.sessions[0]!;
  const stream = fromHex(session.reply_tcp + vectors.heartbeat.tcp + session.frames[0]!.tcp);
  const splitter = new FrameSplitter(65536);
  // Byte by byte: a stream arrives in arbitrary pieces.
  const bodies = Array.from(stream).flatMap((byte) => splitter.push(Uint8Array.of(byte)));
  assert.deepEqual(bodies.map(toHex), [session.reply_body, "", session.frames[0]!.body]);
  assert.throws(() => new FrameSplitter(10).push(fromHex("0000000b")), /exceeds the limit/);
});

test("the key schedule vectors of docs/protocol.md (chacha20-poly1305 chosen)", async () => {
  const offered = [SUITE_CHACHA, SUITE_RC4];
  const fingerprint = fromHex(Array.from({ length: 32 }, (_, i) => (0xa0 + i).toString(16)).join(""));
  const info = keyScheduleInfo(fingerprint, offered, SUITE_CHACHA);
  assert.equal(
    toHex(info),
    "63696d2073657373696f6e206b65797300000002a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2" +
      "b3b4b5b6b7b8b9babbbcbdbebf021163686163686132302d706f6c79313330350f7263342d686d" +
      "61632d7368613235361163686163686132302d706f6c7931333035",
  );
  const secret = fromHex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f");
  const clientNonce = fromHex("404142434445464748494a4b4c4d4e4f");
  const serverNonce = fromHex("808182838485868788898a8b8c8d8e8f");
  const okm = await hkdf(secret, new Uint8Array([...clientNonce, ...serverNonce]), info, 64);
  assert.equal(
    toHex(okm),
    "5c3ad404f303cb4156102524041fd356986d68a3284b7be34b7d2c7f7a54f837" +
      "bcc26995a09b5f34c96b6a4d66baf67958ecd29399ab5065649d4256a44a95a7",
  );
  const client = await sessionCiphers(SUITE_CHACHA, secret, clientNonce, serverNonce, fingerprint, offered);
  const hello = fromHex("0a68656c6c6f");
  assert.equal(toHex(client.sealer.seal(hello)), "2eb9f17c9181510bf5bb6db7dec5d9d1401ea2dfc9cd");
  assert.equal(toHex(client.sealer.seal(hello)), "6c865be46cb271aac63e052b5c22688f318ea0972781");
  assert.equal(toHex(client.opener.open(fromHex("8c05684d42e750cd90f1854170521aa4a5"))), "03");
  assert.equal(
    toHex(helloDigest(2, offered, SUITE_CHACHA, clientNonce.map((b) => b), fingerprint)),
    "418cb251ffb4ec6fec929fe3a88115ea7c925568768921620c939b5de7e8ffc8",
  );
});

test("a key material too large for the node key is refused before sealing", async () => {
  await assert.rejects(sealForNode(serverKey, new Uint8Array(191)), /cannot be sealed/);
  assert.equal((await sealForNode(serverKey, new Uint8Array(190))).length, 256);
});

test("resumption: the secret, the resume hello, its proof and the reply, byte for byte", async () => {
  const resumed = vectors.resumption;
  const fingerprint = fromHex(vectors.key_fingerprint);
  const secret = await nextResumptionSecret(
    fromHex(inputs.secret),
    fromHex(inputs.client_nonce),
    fromHex(inputs.server_nonce),
    fingerprint,
  );
  assert.equal(toHex(secret), resumed.resumption_secret);
  const ticket = fromHex(resumed.ticket);
  const nonce = fromHex(resumed.client_nonce);
  const digest = helloDigest(2, [SUITE_CHACHA], SUITE_CHACHA, nonce, fingerprint);
  assert.equal(toHex(digest), resumed.hello_digest);
  assert.equal(toHex(resumeProof(secret, digest, ticket, inputs.device)), resumed.resume_proof);
  const client = await ClientHandshake.create({
    serverKey,
    token: "",
    device: inputs.device,
    suite: SUITE_CHACHA,
    offered: [SUITE_CHACHA],
    nowMs: inputs.timestamp_ms,
    random: (size) => {
      assert.equal(size, 16, "a resume hello asks for the nonce only (no secret, no RSA)");
      return nonce;
    },
    seal: async () => assert.fail("a resume hello seals nothing"),
    resume: { ticket, secret, fingerprint, device: inputs.device, expiresAt: inputs.timestamp_ms + 600_000 },
  });
  assert.ok(client.resumed);
  assert.equal(toHex(client.helloBody), resumed.hello_body);
  assert.equal(toHex(lengthPrefixed(client.helloBody)), resumed.hello_tcp);
  const { loginResult } = await client.finish(fromHex(resumed.reply_body));
  assert.deepEqual(toJson(pb.LoginResultSchema, loginResult), resumed.login_result);
  const following = await client.resumptionAfter(loginResult, 1_000);
  assert.ok(following !== undefined);
  assert.equal(toHex(following.secret), resumed.next_resumption_secret);
  assert.equal(following.expiresAt, 1_000 + resumed.resume_window_ms);
  assert.deepEqual(following.ticket, loginResult.resumeTicket);
});

test("resumption: a ticket is only offered to the node key it came from", async () => {
  const resumed = vectors.resumption;
  await assert.rejects(
    ClientHandshake.create({
      serverKey,
      token: "",
      device: inputs.device,
      suite: SUITE_CHACHA,
      offered: [SUITE_CHACHA],
      nowMs: 0,
      resume: {
        ticket: fromHex(resumed.ticket),
        secret: fromHex(resumed.resumption_secret),
        fingerprint: new Uint8Array(32),
        device: inputs.device,
        expiresAt: 1,
      },
    }),
    /another node key/,
  );
});
