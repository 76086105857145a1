from proto import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Error(_message.Message):
    __slots__ = ("kind", "message")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    message: str
    def __init__(self, kind: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Part(_message.Message):
    __slots__ = ("data", "index", "count")
    DATA_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    index: int
    count: int
    def __init__(self, data: _Optional[bytes] = ..., index: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model", "start", "end", "version", "codecs", "cache_tokens_left", "cache_tokens_total", "state", "quant", "hidden_size", "num_blocks", "throughput", "max_request_tokens", "dtype", "error")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    CACHE_TOKENS_LEFT_FIELD_NUMBER: _ClassVar[int]
    CACHE_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    model: str
    start: int
    end: int
    version: str
    codecs: _containers.RepeatedScalarFieldContainer[str]
    cache_tokens_left: int
    cache_tokens_total: int
    state: str
    quant: str
    hidden_size: int
    num_blocks: int
    throughput: float
    max_request_tokens: int
    dtype: str
    error: Error
    def __init__(self, model: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., version: _Optional[str] = ..., codecs: _Optional[_Iterable[str]] = ..., cache_tokens_left: _Optional[int] = ..., cache_tokens_total: _Optional[int] = ..., state: _Optional[str] = ..., quant: _Optional[str] = ..., hidden_size: _Optional[int] = ..., num_blocks: _Optional[int] = ..., throughput: _Optional[float] = ..., max_request_tokens: _Optional[int] = ..., dtype: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("hidden", "first", "last", "reply_codec", "adapter")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    REPLY_CODEC_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    hidden: _tensor_pb2.Tensor
    first: int
    last: int
    reply_codec: str
    adapter: Adapter
    def __init__(self, hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., first: _Optional[int] = ..., last: _Optional[int] = ..., reply_codec: _Optional[str] = ..., adapter: _Optional[_Union[Adapter, _Mapping]] = ...) -> None: ...

class AdapterTensor(_message.Message):
    __slots__ = ("block", "name", "value")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    block: int
    name: str
    value: _tensor_pb2.Tensor
    def __init__(self, block: _Optional[int] = ..., name: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("hash", "rank", "alpha", "dropout", "targets", "pre_seq_len", "tensors", "seed")
    HASH_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    PRE_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    hash: str
    rank: int
    alpha: float
    dropout: float
    targets: _containers.RepeatedScalarFieldContainer[str]
    pre_seq_len: int
    tensors: _containers.RepeatedCompositeFieldContainer[AdapterTensor]
    seed: int
    def __init__(self, hash: _Optional[str] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., targets: _Optional[_Iterable[str]] = ..., pre_seq_len: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[AdapterTensor, _Mapping]]] = ..., seed: _Optional[int] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden", "error", "adapter")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    hidden: _tensor_pb2.Tensor
    error: Error
    adapter: str
    def __init__(self, hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., adapter: _Optional[str] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("hidden", "grad_output", "first", "last", "reply_codec", "timeout_s", "step", "adapter")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    REPLY_CODEC_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    hidden: _tensor_pb2.Tensor
    grad_output: _tensor_pb2.Tensor
    first: int
    last: int
    reply_codec: str
    timeout_s: float
    step: int
    adapter: Adapter
    def __init__(self, hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., grad_output: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., first: _Optional[int] = ..., last: _Optional[int] = ..., reply_codec: _Optional[str] = ..., timeout_s: _Optional[float] = ..., step: _Optional[int] = ..., adapter: _Optional[_Union[Adapter, _Mapping]] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("grad_input", "error", "step", "adapter_grads")
    GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_GRADS_FIELD_NUMBER: _ClassVar[int]
    grad_input: _tensor_pb2.Tensor
    error: Error
    step: int
    adapter_grads: _containers.RepeatedCompositeFieldContainer[AdapterTensor]
    def __init__(self, grad_input: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., step: _Optional[int] = ..., adapter_grads: _Optional[_Iterable[_Union[AdapterTensor, _Mapping]]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("session_id", "first", "last", "max_length", "batch_size", "reply_codec", "adapter", "prev_peer")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    REPLY_CODEC_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PREV_PEER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    first: int
    last: int
    max_length: int
    batch_size: int
    reply_codec: str
    adapter: Adapter
    prev_peer: str
    def __init__(self, session_id: _Optional[str] = ..., first: _Optional[int] = ..., last: _Optional[int] = ..., max_length: _Optional[int] = ..., batch_size: _Optional[int] = ..., reply_codec: _Optional[str] = ..., adapter: _Optional[_Union[Adapter, _Mapping]] = ..., prev_peer: _Optional[str] = ...) -> None: ...

class InferenceStep(_message.Message):
    __slots__ = ("session_id", "hidden", "position", "step_id", "pushed", "length", "prev_peer", "push_peer", "push_session", "steps")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    PUSHED_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    PREV_PEER_FIELD_NUMBER: _ClassVar[int]
    PUSH_PEER_FIELD_NUMBER: _ClassVar[int]
    PUSH_SESSION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    hidden: _tensor_pb2.Tensor
    position: int
    step_id: int
    pushed: bool
    length: int
    prev_peer: str
    push_peer: str
    push_session: str
    steps: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., position: _Optional[int] = ..., step_id: _Optional[int] = ..., pushed: _Optional[bool] = ..., length: _Optional[int] = ..., prev_peer: _Optional[str] = ..., push_peer: _Optional[str] = ..., push_session: _Optional[str] = ..., steps: _Optional[_Iterable[int]] = ...) -> None: ...

class PushStep(_message.Message):
    __slots__ = ("session_id", "hidden", "position")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    hidden: _tensor_pb2.Tensor
    position: int
    def __init__(self, session_id: _Optional[str] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., position: _Optional[int] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: Error
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class CloseSession(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("open", "step", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    step: InferenceStep
    close: CloseSession
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., step: _Optional[_Union[InferenceStep, _Mapping]] = ..., close: _Optional[_Union[CloseSession, _Mapping]] = ...) -> None: ...

class InferenceResponse(_message.Message):
    __slots__ = ("hidden", "step_id", "error", "opened", "closed", "length", "adapter", "push", "push_failed")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PUSH_FAILED_FIELD_NUMBER: _ClassVar[int]
    hidden: _tensor_pb2.Tensor
    step_id: int
    error: Error
    opened: bool
    closed: bool
    length: int
    adapter: str
    push: bool
    push_failed: Error
    def __init__(self, hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., step_id: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., opened: _Optional[bool] = ..., closed: _Optional[bool] = ..., length: _Optional[int] = ..., adapter: _Optional[str] = ..., push: _Optional[bool] = ..., push_failed: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class DirectTicketRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DirectTicket(_message.Message):
    __slots__ = ("ticket_id", "secret", "port", "ttl", "error")
    TICKET_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ticket_id: bytes
    secret: bytes
    port: int
    ttl: float
    error: Error
    def __init__(self, ticket_id: _Optional[bytes] = ..., secret: _Optional[bytes] = ..., port: _Optional[int] = ..., ttl: _Optional[float] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...
