/**
 * Frame bodies: one type byte then the protobuf message (docs/protocol.md, "Framing").
 *
 * A transport carries bodies: TCP puts a u32 big-endian length before each
 * (`lengthPrefixed`, `FrameSplitter`); the WebSocket gateway sends each body as one
 * binary message. An empty body is a heartbeat on both, never encrypted.
 */
import { fromBinary, toBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import * as pb from "../gen/cim_pb.js";

export { pb };
export const FrameType = pb.FrameType;
export type FrameType = pb.FrameType;

/** What a logged-in client accepts from the node, and the message each carries. */
export const ESTABLISHED_INBOUND = new Map<number, DescMessage>([
  [pb.FrameType.MSG_A, pb.MsgASchema],
  [pb.FrameType.MSG_N, pb.MessageSchema],
  [pb.FrameType.ACK_A, pb.AckASchema],
  [pb.FrameType.ACK_N, pb.AckNSchema],
  [pb.FrameType.ONLINE_A, pb.OnlineASchema],
  [pb.FrameType.DEVICES_A, pb.DevicesASchema],
  [pb.FrameType.GROUP_A, pb.GroupAnswerSchema],
  [pb.FrameType.CONTACTS_A, pb.ContactsAnswerSchema],
  [pb.FrameType.OFFLINE_A, pb.OfflineASchema],
  [pb.FrameType.OFFLINE_ACK_A, pb.OfflineAckASchema],
  [pb.FrameType.OFFLINE_SUMMARY_A, pb.OfflineSummaryASchema],
  [pb.FrameType.OFFLINE_NOTICE, pb.OfflineNoticeSchema],
  [pb.FrameType.HISTORY_A, pb.HistoryASchema],
  [pb.FrameType.KICKED, pb.KickedSchema],
  [pb.FrameType.GOING_AWAY, pb.GoingAwaySchema],
  [pb.FrameType.ERROR, pb.ErrorSchema],
  [pb.FrameType.CHANGE_A, pb.ChangeASchema],
  [pb.FrameType.READ_A, pb.ReadASchema],
  [pb.FrameType.READ_N, pb.ReadNoticeSchema],
  [pb.FrameType.READERS_A, pb.ReadersASchema],
  [pb.FrameType.APP_STATE_A, pb.AppStateASchema],
  [pb.FrameType.TYPING_A, pb.TypingASchema],
  [pb.FrameType.TYPING_N, pb.TypingNSchema],
]);

/** What the client sends after the handshake, and the message each carries. */
export const ESTABLISHED_OUTBOUND = new Map<number, DescMessage>([
  [pb.FrameType.MSG_R, pb.MessageSchema],
  [pb.FrameType.ACK_R, pb.AckRSchema],
  [pb.FrameType.ONLINE_R, pb.OnlineRSchema],
  [pb.FrameType.DEVICES_R, pb.DevicesRSchema],
  [pb.FrameType.GROUP_R, pb.GroupRequestSchema],
  [pb.FrameType.CONTACTS_R, pb.ContactsRequestSchema],
  [pb.FrameType.OFFLINE_R, pb.OfflineRSchema],
  [pb.FrameType.OFFLINE_ACK_R, pb.OfflineAckRSchema],
  [pb.FrameType.OFFLINE_SUMMARY_R, pb.OfflineSummaryRSchema],
  [pb.FrameType.HISTORY_R, pb.HistoryRSchema],
  [pb.FrameType.CHANGE_R, pb.ChangeRSchema],
  [pb.FrameType.READ_R, pb.ReadRSchema],
  [pb.FrameType.READERS_R, pb.ReadersRSchema],
  [pb.FrameType.APP_STATE_R, pb.AppStateRSchema],
  [pb.FrameType.TYPING_R, pb.TypingRSchema],
]);

/** A frame that breaks the protocol: the connection must close (never a retry). */
export class ProtocolError extends Error {
  override name = "ProtocolError";
}

/** `u8 type || protobuf`: the plaintext of one frame. */
export function encodeFrame<D extends DescMessage>(
  type: number,
  schema: D,
  message: MessageShape<D>,
): Uint8Array {
  if (!Number.isInteger(type) || type < 0 || type > 255) {
    throw new RangeError(`frame type ${type} does not fit one byte`);
  }
  const payload = toBinary(schema, message);
  const body = new Uint8Array(1 + payload.length);
  body[0] = type;
  body.set(payload, 1);
  return body;
}

/** A decoded frame: its type number and message (typed by `inbound`'s schema). */
export interface Frame {
  type: number;
  message: unknown;
}

/**
 * Parse one opened plaintext against an allow-list; anything else is a
 * ProtocolError (an empty body, an unknown type, a protobuf that does not parse).
 */
export function decodeFrame(plaintext: Uint8Array, inbound: Map<number, DescMessage>): Frame {
  if (plaintext.length === 0) throw new ProtocolError("empty frame");
  const type = plaintext[0]!;
  const schema = inbound.get(type);
  if (schema === undefined) throw new ProtocolError(`unexpected frame type ${type}`);
  try {
    return { type, message: fromBinary(schema, plaintext.subarray(1)) };
  } catch (error) {
    throw new ProtocolError(`frame type ${type} does not parse: ${String(error)}`);
  }
}

/** `u32 length || body`: one frame on a TCP stream. */
export function lengthPrefixed(body: Uint8Array): Uint8Array {
  const out = new Uint8Array(4 + body.length);
  new DataView(out.buffer).setUint32(0, body.length, false);
  out.set(body, 4);
  return out;
}

/**
 * Splits a TCP byte stream into bodies (heartbeats are empty bodies). A length
 * over `maxFrameSize` throws before the body is read, as the node does.
 */
export class FrameSplitter {
  private buffer = new Uint8Array(0);

  constructor(private readonly maxFrameSize: number) {}

  push(data: Uint8Array): Uint8Array[] {
    const joined = new Uint8Array(this.buffer.length + data.length);
    joined.set(this.buffer);
    joined.set(data, this.buffer.length);
    const bodies: Uint8Array[] = [];
    let offset = 0;
    while (joined.length - offset >= 4) {
      const length = new DataView(joined.buffer, joined.byteOffset + offset, 4).getUint32(0, false);
      if (length > this.maxFrameSize) {
        throw new ProtocolError(`frame of ${length} bytes exceeds the limit ${this.maxFrameSize}`);
      }
      if (joined.length - offset - 4 < length) break;
      bodies.push(joined.slice(offset + 4, offset + 4 + length));
      offset += 4 + length;
    }
    this.buffer = joined.slice(offset);
    return bodies;
  }
}
