/**
 * cim client SDK: one package for browsers and Node 20.
 *
 * `ChatClient` is the session (docs/sdk-js.md lists its events); `LogicClient` and
 * `FileClient` are the HTTP services; the protocol modules are exported for tools and
 * other transports.
 */
export { ChatClient, type ChatClientOptions, type ChatEvents, type SessionState } from "./session/client.js";
export { RetryPolicy, type DeliveryOutcome, type DeliveryStatus, type RetryMode } from "./session/delivery.js";
export { RequestFailed, RequestRefused, RequestTimedOut, ConnectionLost, type RequestPolicy } from "./session/answers.js";
export { SessionFailed, SessionRefused, Unreachable } from "./session/dialing.js";
export { LoginRefused, ConnectionClosed, defaultWebSocket, type WebSocketLike, type WebSocketFactory } from "./session/connection.js";
export { RouterClient, RouterError, ServiceError, parseTicket, type LoginTicket } from "./session/router.js";
export { MemorySeenStore, type SeenStore } from "./session/seen.js";
export { WebStorageSeenStore, WebStorageUploadState, webDeviceName, type StorageLike } from "./session/web-storage.js";
export type { CatchUpResult } from "./session/catch-up.js";
export { CumulativeAcks, GROUP_ACK_DELAY_MS, GROUP_ACK_EVERY } from "./session/acks.js";
export { ReadState, conversationKey, type ReadEvent, type UnreadChange } from "./session/reads.js";
export { Corrections, changeOf, type Change, type ChangeEvent } from "./session/corrections.js";
export { LogicClient, LogicError } from "./api/logic.js";
export {
  FileClient,
  FileServiceError,
  MemoryUploadState,
  mediaMessage,
  md5Of,
  type StoredFile,
  type UploadProgress,
  type UploadReport,
  type UploadSource,
  type UploadStateStore,
} from "./api/files.js";
export { Backoff, realClock, type Clock, type Timer } from "./clock.js";
export { Emitter } from "./events.js";
export { pb, FrameType, encodeFrame, decodeFrame, lengthPrefixed, FrameSplitter, ProtocolError } from "./protocol/frames.js";
export {
  ClientHandshake,
  HandshakeRefused,
  helloDigest,
  nextResumptionSecret,
  resumeProof,
  type Resumption,
} from "./protocol/handshake.js";
export {
  FrameAuthenticationError,
  PROTOCOL_VERSION,
  SUITE_CHACHA,
  fingerprintOf,
  keyScheduleInfo,
  sessionCiphers,
} from "./protocol/crypto.js";
