from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FrameType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRAME_TYPE_UNSPECIFIED: _ClassVar[FrameType]
    CLIENT_HELLO: _ClassVar[FrameType]
    HANDSHAKE_ERROR: _ClassVar[FrameType]
    LOGIN_RESULT: _ClassVar[FrameType]
    MSG_R: _ClassVar[FrameType]
    MSG_A: _ClassVar[FrameType]
    MSG_N: _ClassVar[FrameType]
    ACK_R: _ClassVar[FrameType]
    ACK_A: _ClassVar[FrameType]
    ACK_N: _ClassVar[FrameType]
    ONLINE_R: _ClassVar[FrameType]
    ONLINE_A: _ClassVar[FrameType]
    OFFLINE_R: _ClassVar[FrameType]
    OFFLINE_A: _ClassVar[FrameType]
    OFFLINE_ACK_R: _ClassVar[FrameType]
    OFFLINE_ACK_A: _ClassVar[FrameType]
    OFFLINE_SUMMARY_R: _ClassVar[FrameType]
    OFFLINE_SUMMARY_A: _ClassVar[FrameType]
    OFFLINE_NOTICE: _ClassVar[FrameType]
    HISTORY_R: _ClassVar[FrameType]
    HISTORY_A: _ClassVar[FrameType]
    CHANGE_R: _ClassVar[FrameType]
    CHANGE_A: _ClassVar[FrameType]
    GROUP_R: _ClassVar[FrameType]
    GROUP_A: _ClassVar[FrameType]
    CONTACTS_R: _ClassVar[FrameType]
    CONTACTS_A: _ClassVar[FrameType]
    READ_R: _ClassVar[FrameType]
    READ_A: _ClassVar[FrameType]
    READ_N: _ClassVar[FrameType]
    READERS_R: _ClassVar[FrameType]
    READERS_A: _ClassVar[FrameType]
    PUSH_R: _ClassVar[FrameType]
    PUSH_A: _ClassVar[FrameType]
    DEVICES_R: _ClassVar[FrameType]
    DEVICES_A: _ClassVar[FrameType]
    KICKED: _ClassVar[FrameType]
    GOING_AWAY: _ClassVar[FrameType]
    ERROR: _ClassVar[FrameType]
    APP_STATE_R: _ClassVar[FrameType]
    APP_STATE_A: _ClassVar[FrameType]
    TYPING_R: _ClassVar[FrameType]
    TYPING_A: _ClassVar[FrameType]
    TYPING_N: _ClassVar[FrameType]

class MessageType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TEXT: _ClassVar[MessageType]
    IMAGE: _ClassVar[MessageType]
    VOICE: _ClassVar[MessageType]
    FILE: _ClassVar[MessageType]
    LOCATION: _ClassVar[MessageType]
    SYSTEM: _ClassVar[MessageType]

class ChangeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHANGE_NONE: _ClassVar[ChangeKind]
    RECALL: _ClassVar[ChangeKind]
    EDIT: _ClassVar[ChangeKind]

class DeliveryStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELIVERY_STATUS_UNSPECIFIED: _ClassVar[DeliveryStatus]
    DELIVERED: _ClassVar[DeliveryStatus]
    STORED: _ClassVar[DeliveryStatus]
    FAILED: _ClassVar[DeliveryStatus]
    ACCEPTED: _ClassVar[DeliveryStatus]

class AppState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    APP_STATE_UNSPECIFIED: _ClassVar[AppState]
    APP_FOREGROUND: _ClassVar[AppState]
    APP_BACKGROUND: _ClassVar[AppState]

class TypingState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TYPING_STATE_UNSPECIFIED: _ClassVar[TypingState]
    TYPING_STARTED: _ClassVar[TypingState]
    TYPING_STOPPED: _ClassVar[TypingState]
FRAME_TYPE_UNSPECIFIED: FrameType
CLIENT_HELLO: FrameType
HANDSHAKE_ERROR: FrameType
LOGIN_RESULT: FrameType
MSG_R: FrameType
MSG_A: FrameType
MSG_N: FrameType
ACK_R: FrameType
ACK_A: FrameType
ACK_N: FrameType
ONLINE_R: FrameType
ONLINE_A: FrameType
OFFLINE_R: FrameType
OFFLINE_A: FrameType
OFFLINE_ACK_R: FrameType
OFFLINE_ACK_A: FrameType
OFFLINE_SUMMARY_R: FrameType
OFFLINE_SUMMARY_A: FrameType
OFFLINE_NOTICE: FrameType
HISTORY_R: FrameType
HISTORY_A: FrameType
CHANGE_R: FrameType
CHANGE_A: FrameType
GROUP_R: FrameType
GROUP_A: FrameType
CONTACTS_R: FrameType
CONTACTS_A: FrameType
READ_R: FrameType
READ_A: FrameType
READ_N: FrameType
READERS_R: FrameType
READERS_A: FrameType
PUSH_R: FrameType
PUSH_A: FrameType
DEVICES_R: FrameType
DEVICES_A: FrameType
KICKED: FrameType
GOING_AWAY: FrameType
ERROR: FrameType
APP_STATE_R: FrameType
APP_STATE_A: FrameType
TYPING_R: FrameType
TYPING_A: FrameType
TYPING_N: FrameType
TEXT: MessageType
IMAGE: MessageType
VOICE: MessageType
FILE: MessageType
LOCATION: MessageType
SYSTEM: MessageType
CHANGE_NONE: ChangeKind
RECALL: ChangeKind
EDIT: ChangeKind
DELIVERY_STATUS_UNSPECIFIED: DeliveryStatus
DELIVERED: DeliveryStatus
STORED: DeliveryStatus
FAILED: DeliveryStatus
ACCEPTED: DeliveryStatus
APP_STATE_UNSPECIFIED: AppState
APP_FOREGROUND: AppState
APP_BACKGROUND: AppState
TYPING_STATE_UNSPECIFIED: TypingState
TYPING_STARTED: TypingState
TYPING_STOPPED: TypingState

class ClientHello(_message.Message):
    __slots__ = ("version", "offered_suites", "suite", "client_nonce", "key_fingerprint", "sealed_key", "resume_ticket", "resume_proof", "resume_device")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFERED_SUITES_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SEALED_KEY_FIELD_NUMBER: _ClassVar[int]
    RESUME_TICKET_FIELD_NUMBER: _ClassVar[int]
    RESUME_PROOF_FIELD_NUMBER: _ClassVar[int]
    RESUME_DEVICE_FIELD_NUMBER: _ClassVar[int]
    version: int
    offered_suites: _containers.RepeatedScalarFieldContainer[str]
    suite: str
    client_nonce: bytes
    key_fingerprint: bytes
    sealed_key: bytes
    resume_ticket: bytes
    resume_proof: bytes
    resume_device: str
    def __init__(self, version: _Optional[int] = ..., offered_suites: _Optional[_Iterable[str]] = ..., suite: _Optional[str] = ..., client_nonce: _Optional[bytes] = ..., key_fingerprint: _Optional[bytes] = ..., sealed_key: _Optional[bytes] = ..., resume_ticket: _Optional[bytes] = ..., resume_proof: _Optional[bytes] = ..., resume_device: _Optional[str] = ...) -> None: ...

class KeyMaterial(_message.Message):
    __slots__ = ("secret", "token", "timestamp_ms", "device", "hello_digest")
    SECRET_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HELLO_DIGEST_FIELD_NUMBER: _ClassVar[int]
    secret: bytes
    token: str
    timestamp_ms: int
    device: str
    hello_digest: bytes
    def __init__(self, secret: _Optional[bytes] = ..., token: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., device: _Optional[str] = ..., hello_digest: _Optional[bytes] = ...) -> None: ...

class HandshakeError(_message.Message):
    __slots__ = ("reason", "message", "allowed_suites", "retry_after_ms")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[HandshakeError.Reason]
        UNSUPPORTED_VERSION: _ClassVar[HandshakeError.Reason]
        SUITE_NOT_ALLOWED: _ClassVar[HandshakeError.Reason]
        UNKNOWN_KEY: _ClassVar[HandshakeError.Reason]
        BAD_HELLO: _ClassVar[HandshakeError.Reason]
        TOO_MANY_CONNECTIONS: _ClassVar[HandshakeError.Reason]
        RATE_LIMITED: _ClassVar[HandshakeError.Reason]
        RESUME_REFUSED: _ClassVar[HandshakeError.Reason]
    REASON_UNSPECIFIED: HandshakeError.Reason
    UNSUPPORTED_VERSION: HandshakeError.Reason
    SUITE_NOT_ALLOWED: HandshakeError.Reason
    UNKNOWN_KEY: HandshakeError.Reason
    BAD_HELLO: HandshakeError.Reason
    TOO_MANY_CONNECTIONS: HandshakeError.Reason
    RATE_LIMITED: HandshakeError.Reason
    RESUME_REFUSED: HandshakeError.Reason
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_SUITES_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    reason: HandshakeError.Reason
    message: str
    allowed_suites: _containers.RepeatedScalarFieldContainer[str]
    retry_after_ms: int
    def __init__(self, reason: _Optional[_Union[HandshakeError.Reason, str]] = ..., message: _Optional[str] = ..., allowed_suites: _Optional[_Iterable[str]] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class NodeAddress(_message.Message):
    __slots__ = ("id", "host", "port", "ws_url")
    ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    WS_URL_FIELD_NUMBER: _ClassVar[int]
    id: str
    host: str
    port: int
    ws_url: str
    def __init__(self, id: _Optional[str] = ..., host: _Optional[str] = ..., port: _Optional[int] = ..., ws_url: _Optional[str] = ...) -> None: ...

class LoginResult(_message.Message):
    __slots__ = ("status", "message", "user", "device", "heartbeat_interval_ms", "heartbeat_timeout_ms", "node", "server_time_ms", "resume_ticket", "resume_window_ms")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[LoginResult.Status]
        INVALID_TOKEN: _ClassVar[LoginResult.Status]
        LOGGED_IN_ELSEWHERE: _ClassVar[LoginResult.Status]
        WRONG_NODE: _ClassVar[LoginResult.Status]
        REPLAYED_HELLO: _ClassVar[LoginResult.Status]
    OK: LoginResult.Status
    INVALID_TOKEN: LoginResult.Status
    LOGGED_IN_ELSEWHERE: LoginResult.Status
    WRONG_NODE: LoginResult.Status
    REPLAYED_HELLO: LoginResult.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TICKET_FIELD_NUMBER: _ClassVar[int]
    RESUME_WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    status: LoginResult.Status
    message: str
    user: str
    device: str
    heartbeat_interval_ms: int
    heartbeat_timeout_ms: int
    node: NodeAddress
    server_time_ms: int
    resume_ticket: bytes
    resume_window_ms: int
    def __init__(self, status: _Optional[_Union[LoginResult.Status, str]] = ..., message: _Optional[str] = ..., user: _Optional[str] = ..., device: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., heartbeat_timeout_ms: _Optional[int] = ..., node: _Optional[_Union[NodeAddress, _Mapping]] = ..., server_time_ms: _Optional[int] = ..., resume_ticket: _Optional[bytes] = ..., resume_window_ms: _Optional[int] = ...) -> None: ...

class Media(_message.Message):
    __slots__ = ("url", "size", "mime", "name", "thumbnail_url", "duration_ms", "width", "height", "file_id")
    URL_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MIME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_URL_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    url: str
    size: int
    mime: str
    name: str
    thumbnail_url: str
    duration_ms: int
    width: int
    height: int
    file_id: str
    def __init__(self, url: _Optional[str] = ..., size: _Optional[int] = ..., mime: _Optional[str] = ..., name: _Optional[str] = ..., thumbnail_url: _Optional[str] = ..., duration_ms: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., file_id: _Optional[str] = ...) -> None: ...

class Location(_message.Message):
    __slots__ = ("lat", "lon", "accuracy_m", "name")
    LAT_FIELD_NUMBER: _ClassVar[int]
    LON_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_M_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    lat: float
    lon: float
    accuracy_m: float
    name: str
    def __init__(self, lat: _Optional[float] = ..., lon: _Optional[float] = ..., accuracy_m: _Optional[float] = ..., name: _Optional[str] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("id", "to", "type", "text", "client_seq", "sent_at_ms", "device", "client_time_ms", "group", "media", "location", "prev_seq", "group_seq", "conversation", "seq", "change", "replaces", "replaces_seq", "recalled", "edited", "changed_at_ms", "changed_by")
    ID_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SEQ_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    PREV_SEQ_FIELD_NUMBER: _ClassVar[int]
    GROUP_SEQ_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    REPLACES_FIELD_NUMBER: _ClassVar[int]
    REPLACES_SEQ_FIELD_NUMBER: _ClassVar[int]
    RECALLED_FIELD_NUMBER: _ClassVar[int]
    EDITED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    CHANGED_BY_FIELD_NUMBER: _ClassVar[int]
    id: int
    to: str
    type: MessageType
    text: str
    client_seq: int
    sent_at_ms: int
    device: str
    client_time_ms: int
    group: str
    media: Media
    location: Location
    prev_seq: int
    group_seq: int
    conversation: str
    seq: int
    change: ChangeKind
    replaces: int
    replaces_seq: int
    recalled: bool
    edited: bool
    changed_at_ms: int
    changed_by: str
    def __init__(self, id: _Optional[int] = ..., to: _Optional[str] = ..., type: _Optional[_Union[MessageType, str]] = ..., text: _Optional[str] = ..., client_seq: _Optional[int] = ..., sent_at_ms: _Optional[int] = ..., device: _Optional[str] = ..., client_time_ms: _Optional[int] = ..., group: _Optional[str] = ..., media: _Optional[_Union[Media, _Mapping]] = ..., location: _Optional[_Union[Location, _Mapping]] = ..., prev_seq: _Optional[int] = ..., group_seq: _Optional[int] = ..., conversation: _Optional[str] = ..., seq: _Optional[int] = ..., change: _Optional[_Union[ChangeKind, str]] = ..., replaces: _Optional[int] = ..., replaces_seq: _Optional[int] = ..., recalled: _Optional[bool] = ..., edited: _Optional[bool] = ..., changed_at_ms: _Optional[int] = ..., changed_by: _Optional[str] = ..., **kwargs) -> None: ...

class MsgA(_message.Message):
    __slots__ = ("client_seq", "msg_id", "sent_at_ms", "conversation", "seq")
    CLIENT_SEQ_FIELD_NUMBER: _ClassVar[int]
    MSG_ID_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_MS_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    client_seq: int
    msg_id: int
    sent_at_ms: int
    conversation: str
    seq: int
    def __init__(self, client_seq: _Optional[int] = ..., msg_id: _Optional[int] = ..., sent_at_ms: _Optional[int] = ..., conversation: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class AckR(_message.Message):
    __slots__ = ("msg_id", "conversation", "through_seq")
    MSG_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    THROUGH_SEQ_FIELD_NUMBER: _ClassVar[int]
    msg_id: int
    conversation: str
    through_seq: int
    def __init__(self, msg_id: _Optional[int] = ..., conversation: _Optional[str] = ..., through_seq: _Optional[int] = ...) -> None: ...

class AckA(_message.Message):
    __slots__ = ("msg_id",)
    MSG_ID_FIELD_NUMBER: _ClassVar[int]
    msg_id: int
    def __init__(self, msg_id: _Optional[int] = ...) -> None: ...

class AckN(_message.Message):
    __slots__ = ("msg_id", "client_seq", "status", "reason", "to")
    MSG_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SEQ_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    msg_id: int
    client_seq: int
    status: DeliveryStatus
    reason: str
    to: str
    def __init__(self, msg_id: _Optional[int] = ..., client_seq: _Optional[int] = ..., status: _Optional[_Union[DeliveryStatus, str]] = ..., reason: _Optional[str] = ..., to: _Optional[str] = ...) -> None: ...

class OnlineR(_message.Message):
    __slots__ = ("offset", "limit")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    offset: int
    limit: int
    def __init__(self, offset: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class OnlineA(_message.Message):
    __slots__ = ("total", "users")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    total: int
    users: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, total: _Optional[int] = ..., users: _Optional[_Iterable[str]] = ...) -> None: ...

class DevicesR(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    def __init__(self, request_id: _Optional[int] = ...) -> None: ...

class DeviceOnline(_message.Message):
    __slots__ = ("device", "connected_at_ms", "active_at_ms", "this_device")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_AT_MS_FIELD_NUMBER: _ClassVar[int]
    THIS_DEVICE_FIELD_NUMBER: _ClassVar[int]
    device: str
    connected_at_ms: int
    active_at_ms: int
    this_device: bool
    def __init__(self, device: _Optional[str] = ..., connected_at_ms: _Optional[int] = ..., active_at_ms: _Optional[int] = ..., this_device: _Optional[bool] = ...) -> None: ...

class DevicesA(_message.Message):
    __slots__ = ("request_id", "devices")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    devices: _containers.RepeatedCompositeFieldContainer[DeviceOnline]
    def __init__(self, request_id: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[DeviceOnline, _Mapping]]] = ...) -> None: ...

class Cursor(_message.Message):
    __slots__ = ("conversation", "seq")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    conversation: str
    seq: int
    def __init__(self, conversation: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class OfflineR(_message.Message):
    __slots__ = ("before", "limit", "max_bytes", "acks", "conversation", "request_id")
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACKS_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    before: int
    limit: int
    max_bytes: int
    acks: _containers.RepeatedCompositeFieldContainer[Cursor]
    conversation: str
    request_id: int
    def __init__(self, before: _Optional[int] = ..., limit: _Optional[int] = ..., max_bytes: _Optional[int] = ..., acks: _Optional[_Iterable[_Union[Cursor, _Mapping]]] = ..., conversation: _Optional[str] = ..., request_id: _Optional[int] = ...) -> None: ...

class OfflineA(_message.Message):
    __slots__ = ("messages", "more", "next_before", "acknowledged", "conversation", "request_id")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    NEXT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    more: bool
    next_before: int
    acknowledged: int
    conversation: str
    request_id: int
    def __init__(self, messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., more: _Optional[bool] = ..., next_before: _Optional[int] = ..., acknowledged: _Optional[int] = ..., conversation: _Optional[str] = ..., request_id: _Optional[int] = ...) -> None: ...

class OfflineAckR(_message.Message):
    __slots__ = ("cursors", "request_id")
    CURSORS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    cursors: _containers.RepeatedCompositeFieldContainer[Cursor]
    request_id: int
    def __init__(self, cursors: _Optional[_Iterable[_Union[Cursor, _Mapping]]] = ..., request_id: _Optional[int] = ...) -> None: ...

class OfflineAckA(_message.Message):
    __slots__ = ("acknowledged", "request_id")
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    acknowledged: int
    request_id: int
    def __init__(self, acknowledged: _Optional[int] = ..., request_id: _Optional[int] = ...) -> None: ...

class OfflineSummaryR(_message.Message):
    __slots__ = ("request_id", "max_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    max_bytes: int
    def __init__(self, request_id: _Optional[int] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class ConversationSummary(_message.Message):
    __slots__ = ("conversation", "peer", "group", "count", "last_seq", "cursor", "newest", "newest_cut", "read_seq", "peer_read_seq")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    NEWEST_FIELD_NUMBER: _ClassVar[int]
    NEWEST_CUT_FIELD_NUMBER: _ClassVar[int]
    READ_SEQ_FIELD_NUMBER: _ClassVar[int]
    PEER_READ_SEQ_FIELD_NUMBER: _ClassVar[int]
    conversation: str
    peer: str
    group: str
    count: int
    last_seq: int
    cursor: int
    newest: Message
    newest_cut: bool
    read_seq: int
    peer_read_seq: int
    def __init__(self, conversation: _Optional[str] = ..., peer: _Optional[str] = ..., group: _Optional[str] = ..., count: _Optional[int] = ..., last_seq: _Optional[int] = ..., cursor: _Optional[int] = ..., newest: _Optional[_Union[Message, _Mapping]] = ..., newest_cut: _Optional[bool] = ..., read_seq: _Optional[int] = ..., peer_read_seq: _Optional[int] = ...) -> None: ...

class OfflineSummaryA(_message.Message):
    __slots__ = ("total", "conversations", "caught_up", "more", "request_id", "peer_reads")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    CAUGHT_UP_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_READS_FIELD_NUMBER: _ClassVar[int]
    total: int
    conversations: _containers.RepeatedCompositeFieldContainer[ConversationSummary]
    caught_up: _containers.RepeatedCompositeFieldContainer[Cursor]
    more: bool
    request_id: int
    peer_reads: _containers.RepeatedCompositeFieldContainer[Cursor]
    def __init__(self, total: _Optional[int] = ..., conversations: _Optional[_Iterable[_Union[ConversationSummary, _Mapping]]] = ..., caught_up: _Optional[_Iterable[_Union[Cursor, _Mapping]]] = ..., more: _Optional[bool] = ..., request_id: _Optional[int] = ..., peer_reads: _Optional[_Iterable[_Union[Cursor, _Mapping]]] = ...) -> None: ...

class OfflineNotice(_message.Message):
    __slots__ = ("conversation", "seq")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    conversation: str
    seq: int
    def __init__(self, conversation: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class HistoryR(_message.Message):
    __slots__ = ("peer", "group", "before", "limit", "max_bytes", "after", "request_id")
    PEER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    peer: str
    group: str
    before: int
    limit: int
    max_bytes: int
    after: int
    request_id: int
    def __init__(self, peer: _Optional[str] = ..., group: _Optional[str] = ..., before: _Optional[int] = ..., limit: _Optional[int] = ..., max_bytes: _Optional[int] = ..., after: _Optional[int] = ..., request_id: _Optional[int] = ...) -> None: ...

class HistoryA(_message.Message):
    __slots__ = ("messages", "more", "next_before", "error", "message", "request_id")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    NEXT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    more: bool
    next_before: int
    error: str
    message: str
    request_id: int
    def __init__(self, messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., more: _Optional[bool] = ..., next_before: _Optional[int] = ..., error: _Optional[str] = ..., message: _Optional[str] = ..., request_id: _Optional[int] = ...) -> None: ...

class ChangeR(_message.Message):
    __slots__ = ("request_id", "msg_id", "kind", "text")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MSG_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    msg_id: int
    kind: ChangeKind
    text: str
    def __init__(self, request_id: _Optional[int] = ..., msg_id: _Optional[int] = ..., kind: _Optional[_Union[ChangeKind, str]] = ..., text: _Optional[str] = ...) -> None: ...

class ChangeA(_message.Message):
    __slots__ = ("request_id", "msg_id", "kind", "conversation", "seq", "entry_id", "changed_at_ms", "replaces_seq")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MSG_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    CHANGED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    REPLACES_SEQ_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    msg_id: int
    kind: ChangeKind
    conversation: str
    seq: int
    entry_id: int
    changed_at_ms: int
    replaces_seq: int
    def __init__(self, request_id: _Optional[int] = ..., msg_id: _Optional[int] = ..., kind: _Optional[_Union[ChangeKind, str]] = ..., conversation: _Optional[str] = ..., seq: _Optional[int] = ..., entry_id: _Optional[int] = ..., changed_at_ms: _Optional[int] = ..., replaces_seq: _Optional[int] = ...) -> None: ...

class GroupRequest(_message.Message):
    __slots__ = ("request_id", "create", "rename", "add", "remove", "leave", "dissolve", "list", "members", "promote", "invite", "accept", "decline", "invitations")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_FIELD_NUMBER: _ClassVar[int]
    RENAME_FIELD_NUMBER: _ClassVar[int]
    ADD_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    LEAVE_FIELD_NUMBER: _ClassVar[int]
    DISSOLVE_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    PROMOTE_FIELD_NUMBER: _ClassVar[int]
    INVITE_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    DECLINE_FIELD_NUMBER: _ClassVar[int]
    INVITATIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    create: CreateGroup
    rename: RenameGroup
    add: ChangeMembers
    remove: ChangeMembers
    leave: GroupRef
    dissolve: GroupRef
    list: ListGroups
    members: GroupRef
    promote: ChangeMembers
    invite: ChangeMembers
    accept: GroupRef
    decline: GroupRef
    invitations: ListInvitations
    def __init__(self, request_id: _Optional[int] = ..., create: _Optional[_Union[CreateGroup, _Mapping]] = ..., rename: _Optional[_Union[RenameGroup, _Mapping]] = ..., add: _Optional[_Union[ChangeMembers, _Mapping]] = ..., remove: _Optional[_Union[ChangeMembers, _Mapping]] = ..., leave: _Optional[_Union[GroupRef, _Mapping]] = ..., dissolve: _Optional[_Union[GroupRef, _Mapping]] = ..., list: _Optional[_Union[ListGroups, _Mapping]] = ..., members: _Optional[_Union[GroupRef, _Mapping]] = ..., promote: _Optional[_Union[ChangeMembers, _Mapping]] = ..., invite: _Optional[_Union[ChangeMembers, _Mapping]] = ..., accept: _Optional[_Union[GroupRef, _Mapping]] = ..., decline: _Optional[_Union[GroupRef, _Mapping]] = ..., invitations: _Optional[_Union[ListInvitations, _Mapping]] = ...) -> None: ...

class CreateGroup(_message.Message):
    __slots__ = ("name", "members")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class RenameGroup(_message.Message):
    __slots__ = ("group", "name")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    group: str
    name: str
    def __init__(self, group: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ChangeMembers(_message.Message):
    __slots__ = ("group", "users")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    group: str
    users: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, group: _Optional[str] = ..., users: _Optional[_Iterable[str]] = ...) -> None: ...

class GroupRef(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: str
    def __init__(self, group: _Optional[str] = ...) -> None: ...

class ListGroups(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListInvitations(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GroupInvitation(_message.Message):
    __slots__ = ("group", "invited_by", "invited_at_ms")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    INVITED_BY_FIELD_NUMBER: _ClassVar[int]
    INVITED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    group: GroupInfo
    invited_by: str
    invited_at_ms: int
    def __init__(self, group: _Optional[_Union[GroupInfo, _Mapping]] = ..., invited_by: _Optional[str] = ..., invited_at_ms: _Optional[int] = ...) -> None: ...

class GroupInfo(_message.Message):
    __slots__ = ("id", "name", "owner", "admins", "member_count", "created_at_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    ADMINS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    owner: str
    admins: _containers.RepeatedScalarFieldContainer[str]
    member_count: int
    created_at_ms: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., owner: _Optional[str] = ..., admins: _Optional[_Iterable[str]] = ..., member_count: _Optional[int] = ..., created_at_ms: _Optional[int] = ...) -> None: ...

class GroupMember(_message.Message):
    __slots__ = ("user", "role")
    USER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    user: str
    role: str
    def __init__(self, user: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class GroupAnswer(_message.Message):
    __slots__ = ("request_id", "ok", "error", "message", "group", "groups", "members", "invited", "invitations")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    INVITED_FIELD_NUMBER: _ClassVar[int]
    INVITATIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    ok: bool
    error: str
    message: str
    group: GroupInfo
    groups: _containers.RepeatedCompositeFieldContainer[GroupInfo]
    members: _containers.RepeatedCompositeFieldContainer[GroupMember]
    invited: _containers.RepeatedScalarFieldContainer[str]
    invitations: _containers.RepeatedCompositeFieldContainer[GroupInvitation]
    def __init__(self, request_id: _Optional[int] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., message: _Optional[str] = ..., group: _Optional[_Union[GroupInfo, _Mapping]] = ..., groups: _Optional[_Iterable[_Union[GroupInfo, _Mapping]]] = ..., members: _Optional[_Iterable[_Union[GroupMember, _Mapping]]] = ..., invited: _Optional[_Iterable[str]] = ..., invitations: _Optional[_Iterable[_Union[GroupInvitation, _Mapping]]] = ...) -> None: ...

class ContactsRequest(_message.Message):
    __slots__ = ("request_id", "device", "list", "request", "accept", "decline", "remove", "block", "unblock", "settings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    DECLINE_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    UNBLOCK_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    device: str
    list: ListContacts
    request: ContactRef
    accept: ContactRef
    decline: ContactRef
    remove: ContactRef
    block: ContactRef
    unblock: ContactRef
    settings: PrivacySettings
    def __init__(self, request_id: _Optional[int] = ..., device: _Optional[str] = ..., list: _Optional[_Union[ListContacts, _Mapping]] = ..., request: _Optional[_Union[ContactRef, _Mapping]] = ..., accept: _Optional[_Union[ContactRef, _Mapping]] = ..., decline: _Optional[_Union[ContactRef, _Mapping]] = ..., remove: _Optional[_Union[ContactRef, _Mapping]] = ..., block: _Optional[_Union[ContactRef, _Mapping]] = ..., unblock: _Optional[_Union[ContactRef, _Mapping]] = ..., settings: _Optional[_Union[PrivacySettings, _Mapping]] = ...) -> None: ...

class ListContacts(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ContactRef(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: str
    def __init__(self, user: _Optional[str] = ...) -> None: ...

class PrivacySettings(_message.Message):
    __slots__ = ("messages", "group_adds", "read_receipts")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    GROUP_ADDS_FIELD_NUMBER: _ClassVar[int]
    READ_RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    messages: str
    group_adds: str
    read_receipts: str
    def __init__(self, messages: _Optional[str] = ..., group_adds: _Optional[str] = ..., read_receipts: _Optional[str] = ...) -> None: ...

class ReadR(_message.Message):
    __slots__ = ("request_id", "conversation", "seq")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    conversation: str
    seq: int
    def __init__(self, request_id: _Optional[int] = ..., conversation: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class ReadA(_message.Message):
    __slots__ = ("request_id", "conversation", "seq", "moved", "last_seq")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    conversation: str
    seq: int
    moved: bool
    last_seq: int
    def __init__(self, request_id: _Optional[int] = ..., conversation: _Optional[str] = ..., seq: _Optional[int] = ..., moved: _Optional[bool] = ..., last_seq: _Optional[int] = ...) -> None: ...

class ReadNotice(_message.Message):
    __slots__ = ("conversation", "reader", "seq", "last_seq", "peer", "group")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    READER_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    conversation: str
    reader: str
    seq: int
    last_seq: int
    peer: str
    group: str
    def __init__(self, conversation: _Optional[str] = ..., reader: _Optional[str] = ..., seq: _Optional[int] = ..., last_seq: _Optional[int] = ..., peer: _Optional[str] = ..., group: _Optional[str] = ...) -> None: ...

class ReadersR(_message.Message):
    __slots__ = ("request_id", "conversation", "seq")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    conversation: str
    seq: int
    def __init__(self, request_id: _Optional[int] = ..., conversation: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class ReadersA(_message.Message):
    __slots__ = ("request_id", "conversation", "seq", "count", "readers", "members")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    READERS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    conversation: str
    seq: int
    count: int
    readers: _containers.RepeatedScalarFieldContainer[str]
    members: int
    def __init__(self, request_id: _Optional[int] = ..., conversation: _Optional[str] = ..., seq: _Optional[int] = ..., count: _Optional[int] = ..., readers: _Optional[_Iterable[str]] = ..., members: _Optional[int] = ...) -> None: ...

class Contact(_message.Message):
    __slots__ = ("user", "since_ms", "approved_by")
    USER_FIELD_NUMBER: _ClassVar[int]
    SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    APPROVED_BY_FIELD_NUMBER: _ClassVar[int]
    user: str
    since_ms: int
    approved_by: str
    def __init__(self, user: _Optional[str] = ..., since_ms: _Optional[int] = ..., approved_by: _Optional[str] = ...) -> None: ...

class PendingContact(_message.Message):
    __slots__ = ("user", "device", "at_ms", "requested_by")
    USER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    user: str
    device: str
    at_ms: int
    requested_by: str
    def __init__(self, user: _Optional[str] = ..., device: _Optional[str] = ..., at_ms: _Optional[int] = ..., requested_by: _Optional[str] = ...) -> None: ...

class ContactBook(_message.Message):
    __slots__ = ("contacts", "incoming", "outgoing", "blocked", "settings")
    CONTACTS_FIELD_NUMBER: _ClassVar[int]
    INCOMING_FIELD_NUMBER: _ClassVar[int]
    OUTGOING_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    contacts: _containers.RepeatedCompositeFieldContainer[Contact]
    incoming: _containers.RepeatedCompositeFieldContainer[PendingContact]
    outgoing: _containers.RepeatedCompositeFieldContainer[PendingContact]
    blocked: _containers.RepeatedScalarFieldContainer[str]
    settings: PrivacySettings
    def __init__(self, contacts: _Optional[_Iterable[_Union[Contact, _Mapping]]] = ..., incoming: _Optional[_Iterable[_Union[PendingContact, _Mapping]]] = ..., outgoing: _Optional[_Iterable[_Union[PendingContact, _Mapping]]] = ..., blocked: _Optional[_Iterable[str]] = ..., settings: _Optional[_Union[PrivacySettings, _Mapping]] = ...) -> None: ...

class ContactsAnswer(_message.Message):
    __slots__ = ("request_id", "ok", "error", "message", "status", "book", "settings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BOOK_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    ok: bool
    error: str
    message: str
    status: str
    book: ContactBook
    settings: PrivacySettings
    def __init__(self, request_id: _Optional[int] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., message: _Optional[str] = ..., status: _Optional[str] = ..., book: _Optional[_Union[ContactBook, _Mapping]] = ..., settings: _Optional[_Union[PrivacySettings, _Mapping]] = ...) -> None: ...

class AppStateR(_message.Message):
    __slots__ = ("state", "request_id")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    state: AppState
    request_id: int
    def __init__(self, state: _Optional[_Union[AppState, str]] = ..., request_id: _Optional[int] = ...) -> None: ...

class AppStateA(_message.Message):
    __slots__ = ("state", "heartbeat_interval_ms", "heartbeat_timeout_ms", "request_id")
    STATE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    state: AppState
    heartbeat_interval_ms: int
    heartbeat_timeout_ms: int
    request_id: int
    def __init__(self, state: _Optional[_Union[AppState, str]] = ..., heartbeat_interval_ms: _Optional[int] = ..., heartbeat_timeout_ms: _Optional[int] = ..., request_id: _Optional[int] = ...) -> None: ...

class TypingR(_message.Message):
    __slots__ = ("to", "group", "state", "request_id")
    TO_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    to: str
    group: str
    state: TypingState
    request_id: int
    def __init__(self, to: _Optional[str] = ..., group: _Optional[str] = ..., state: _Optional[_Union[TypingState, str]] = ..., request_id: _Optional[int] = ...) -> None: ...

class TypingA(_message.Message):
    __slots__ = ("request_id", "dropped")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    dropped: bool
    def __init__(self, request_id: _Optional[int] = ..., dropped: _Optional[bool] = ...) -> None: ...

class TypingN(_message.Message):
    __slots__ = ("device", "to", "group", "state", "conversation")
    FROM_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    device: str
    to: str
    group: str
    state: TypingState
    conversation: str
    def __init__(self, device: _Optional[str] = ..., to: _Optional[str] = ..., group: _Optional[str] = ..., state: _Optional[_Union[TypingState, str]] = ..., conversation: _Optional[str] = ..., **kwargs) -> None: ...

class BusEnvelope(_message.Message):
    __slots__ = ("origin_node", "deliver", "outcome", "stored", "typing", "read")
    ORIGIN_NODE_FIELD_NUMBER: _ClassVar[int]
    DELIVER_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    TYPING_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    origin_node: str
    deliver: BusDelivery
    outcome: BusOutcome
    stored: OfflineReady
    typing: BusTyping
    read: BusRead
    def __init__(self, origin_node: _Optional[str] = ..., deliver: _Optional[_Union[BusDelivery, _Mapping]] = ..., outcome: _Optional[_Union[BusOutcome, _Mapping]] = ..., stored: _Optional[_Union[OfflineReady, _Mapping]] = ..., typing: _Optional[_Union[BusTyping, _Mapping]] = ..., read: _Optional[_Union[BusRead, _Mapping]] = ...) -> None: ...

class BusRead(_message.Message):
    __slots__ = ("receivers", "notice")
    RECEIVERS_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    receivers: _containers.RepeatedScalarFieldContainer[str]
    notice: ReadNotice
    def __init__(self, receivers: _Optional[_Iterable[str]] = ..., notice: _Optional[_Union[ReadNotice, _Mapping]] = ...) -> None: ...

class BusDelivery(_message.Message):
    __slots__ = ("message", "receivers", "sender_device")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RECEIVERS_FIELD_NUMBER: _ClassVar[int]
    SENDER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    message: Message
    receivers: _containers.RepeatedScalarFieldContainer[str]
    sender_device: str
    def __init__(self, message: _Optional[_Union[Message, _Mapping]] = ..., receivers: _Optional[_Iterable[str]] = ..., sender_device: _Optional[str] = ...) -> None: ...

class OfflineReady(_message.Message):
    __slots__ = ("receivers", "conversation", "seq")
    RECEIVERS_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    receivers: _containers.RepeatedScalarFieldContainer[str]
    conversation: str
    seq: int
    def __init__(self, receivers: _Optional[_Iterable[str]] = ..., conversation: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class BusTyping(_message.Message):
    __slots__ = ("notice", "receivers")
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    RECEIVERS_FIELD_NUMBER: _ClassVar[int]
    notice: TypingN
    receivers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, notice: _Optional[_Union[TypingN, _Mapping]] = ..., receivers: _Optional[_Iterable[str]] = ...) -> None: ...

class BusOutcome(_message.Message):
    __slots__ = ("sender", "sender_device", "ack")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    SENDER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    sender: str
    sender_device: str
    ack: AckN
    def __init__(self, sender: _Optional[str] = ..., sender_device: _Optional[str] = ..., ack: _Optional[_Union[AckN, _Mapping]] = ...) -> None: ...

class Kicked(_message.Message):
    __slots__ = ("reason", "code")
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CODE_UNSPECIFIED: _ClassVar[Kicked.Code]
        LOGGED_IN_ELSEWHERE: _ClassVar[Kicked.Code]
        LOGGED_OUT: _ClassVar[Kicked.Code]
        SESSION_EXPIRED: _ClassVar[Kicked.Code]
        REPLACED: _ClassVar[Kicked.Code]
        BY_ADMIN: _ClassVar[Kicked.Code]
        TOO_MANY_DEVICES: _ClassVar[Kicked.Code]
    CODE_UNSPECIFIED: Kicked.Code
    LOGGED_IN_ELSEWHERE: Kicked.Code
    LOGGED_OUT: Kicked.Code
    SESSION_EXPIRED: Kicked.Code
    REPLACED: Kicked.Code
    BY_ADMIN: Kicked.Code
    TOO_MANY_DEVICES: Kicked.Code
    REASON_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    code: Kicked.Code
    def __init__(self, reason: _Optional[str] = ..., code: _Optional[_Union[Kicked.Code, str]] = ...) -> None: ...

class GoingAway(_message.Message):
    __slots__ = ("reason", "reconnect_after_ms")
    REASON_FIELD_NUMBER: _ClassVar[int]
    RECONNECT_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    reconnect_after_ms: int
    def __init__(self, reason: _Optional[str] = ..., reconnect_after_ms: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "request_type", "client_seq", "retry_after_ms", "request_id", "reason")
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CODE_UNSPECIFIED: _ClassVar[Error.Code]
        BAD_REQUEST: _ClassVar[Error.Code]
        RATE_LIMITED: _ClassVar[Error.Code]
        INTERNAL: _ClassVar[Error.Code]
        UNAVAILABLE: _ClassVar[Error.Code]
        FORBIDDEN: _ClassVar[Error.Code]
    CODE_UNSPECIFIED: Error.Code
    BAD_REQUEST: Error.Code
    RATE_LIMITED: Error.Code
    INTERNAL: Error.Code
    UNAVAILABLE: Error.Code
    FORBIDDEN: Error.Code
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TYPE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SEQ_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: Error.Code
    message: str
    request_type: FrameType
    client_seq: int
    retry_after_ms: int
    request_id: int
    reason: str
    def __init__(self, code: _Optional[_Union[Error.Code, str]] = ..., message: _Optional[str] = ..., request_type: _Optional[_Union[FrameType, str]] = ..., client_seq: _Optional[int] = ..., retry_after_ms: _Optional[int] = ..., request_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("request_id", "register", "remove", "show")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    SHOW_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    register: PushRegistration
    remove: PushRemove
    show: PushShow
    def __init__(self, request_id: _Optional[int] = ..., register: _Optional[_Union[PushRegistration, _Mapping]] = ..., remove: _Optional[_Union[PushRemove, _Mapping]] = ..., show: _Optional[_Union[PushShow, _Mapping]] = ...) -> None: ...

class PushRegistration(_message.Message):
    __slots__ = ("provider", "token", "app", "locale")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    LOCALE_FIELD_NUMBER: _ClassVar[int]
    provider: str
    token: str
    app: str
    locale: str
    def __init__(self, provider: _Optional[str] = ..., token: _Optional[str] = ..., app: _Optional[str] = ..., locale: _Optional[str] = ...) -> None: ...

class PushRemove(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PushShow(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PushAnswer(_message.Message):
    __slots__ = ("request_id", "ok", "error", "message", "registration", "registered")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REGISTRATION_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    ok: bool
    error: str
    message: str
    registration: PushRegistration
    registered: bool
    def __init__(self, request_id: _Optional[int] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., message: _Optional[str] = ..., registration: _Optional[_Union[PushRegistration, _Mapping]] = ..., registered: _Optional[bool] = ...) -> None: ...
