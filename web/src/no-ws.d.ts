// The SDK imports `ws` only in Node; the browser build leaves it out (build.mjs).
declare const WebSocket: unknown;
export default WebSocket;
