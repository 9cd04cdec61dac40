"""Wire models: every value the NeMo Relay runtime stores in Redis.

The models mirror the Rust serde types of `nemo-relay` 0.10.x so that what we
write parses in a real agent (SPEC section 6c: all-or-nothing per key) and
what the runtime wrote parses here. Fidelity rules, all tested over every
captured fixture value:

- unknown fields survive (``extra="allow"``);
- optional fields the runtime skips when absent stay omitted, never ``null``
  (`None` on input is accepted as absent); the few `Option` fields the runtime
  writes as ``null`` are listed in ``_keep_null``;
- timestamps stay the exact strings given (nanoseconds included);
- map keys that look like integers stay strings.

The models are for the storage boundary. The learning engine keeps its own
slotted classes for the hot path and converts at the edges.
"""

from __future__ import annotations

import uuid
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, NotRequired, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    model_serializer,
    with_config,
)
from typing_extensions import TypedDict  # pydantic needs it before Python 3.12

from adaptive_worker_client.errors import InvalidRecord
from adaptive_worker_client.timestamps import parse_ns

__all__ = [
    "AccumulatorState",
    "AnnotatedRequestJson",
    "BlockStabilityScore",
    "CallRecord",
    "Centroid",
    "ExecutionPlan",
    "KeepNull",
    "LlmCallPrediction",
    "MetadataEnvelope",
    "NodeAccumulators",
    "NonEmptyStr",
    "ParallelGroup",
    "ParallelHint",
    "PredictionMetrics",
    "PredictionTrieNode",
    "PromptBlock",
    "PromptIR",
    "RunRecord",
    "RunningStatsWire",
    "StabilityAnalysisResult",
    "TDigestWire",
    "Timestamp",
    "TokenizationMetadata",
    "ToolSchemaHash",
    "TrieEnvelope",
    "UuidStr",
    "WireModel",
    "observations_json",
    "parse_observations",
    "parse_wire",
]

# --------------------------------------------------------------------------- base


class WireModel(BaseModel):
    """Base: keeps unknown fields and omits absent optionals on output.

    Output uses pydantic's native `exclude_none` (fast: run records are
    re-serialized on every ingest); it applies to model fields and extras,
    never inside plain dict values, which are kept exactly.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True, ser_json_inf_nan="null")

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict the runtime would store."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_json(self) -> str:
        """Compact JSON, the layout serde_json writes."""
        return self.model_dump_json(by_alias=True, exclude_none=True)


class KeepNull(WireModel):
    """For the runtime's `Option` fields without `skip_serializing_if`: written as `null`.

    `exclude_none` drops them first; this puts them back.
    """

    _keep_null: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _restore_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in self._keep_null:
            if getattr(self, name) is None:
                data[name] = None
        return data


M = TypeVar("M", bound=WireModel)


def parse_wire(
    model: type[M], data: str | bytes | dict[str, Any] | list[Any], *, trusted: bool = False
) -> M:
    """Validate JSON text or parsed JSON into `model`, raising InvalidRecord.

    `trusted` skips the deep check of recorded LLM requests, for values that
    passed it once already (runs read back for learning). The shape of the
    record itself is always checked.
    """
    context = {"trusted": True} if trusted else None
    try:
        if isinstance(data, str | bytes | bytearray):
            return model.model_validate_json(data, context=context)
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise InvalidRecord.from_validation_error(model.__name__, exc) from None


# ------------------------------------------------------------------ scalar types


def _check_timestamp(value: str) -> str:
    parse_ns(value)
    return value


def _check_uuid(value: str) -> str:
    # The runtime parses ids into `Uuid` and writes them back lowercase and
    # hyphenated, so a run submitted as `{ABC...}` is stored as the runtime
    # would store it.
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"not a UUID: {value!r}") from None


def _check_u32_key(value: str) -> str:
    if not value.isdigit() or int(value) > 0xFFFFFFFF:
        raise ValueError(f"map key must be an unsigned 32-bit integer, got {value!r}")
    return value


Timestamp = Annotated[
    str, AfterValidator(_check_timestamp), Field(json_schema_extra={"format": "date-time"})
]
"""RFC 3339, kept as the exact string (Python datetime would drop nanoseconds)."""
UuidStr = Annotated[str, AfterValidator(_check_uuid), Field(json_schema_extra={"format": "uuid"})]
U32 = Annotated[int, Field(ge=0, le=0xFFFFFFFF)]
U32Key = Annotated[str, AfterValidator(_check_u32_key)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


# ------------------------------------------------------- annotated LLM requests
# Validation-only mirror of `nemo_relay::codec::request::AnnotatedLlmRequest`.
# The call record keeps the request as the plain dict it was given (the ACG
# learner hashes it exactly as stored); these types only decide whether the
# runtime itself could have parsed it, and say where it could not.


# TypedDicts, not models: validation builds plain dicts instead of model
# instances (~5 us per capture-shaped request instead of ~8.5, on every run
# ingested). Unknown keys are allowed, as serde ignores them.
_LENIENT = ConfigDict(extra="allow")


@with_config(_LENIENT)
class _TextPart(TypedDict):
    type: Literal["text"]
    text: str


@with_config(_LENIENT)
class _ImageUrl(TypedDict):
    url: str
    detail: NotRequired[str | None]


@with_config(_LENIENT)
class _ImageUrlPart(TypedDict):
    type: Literal["image_url"]
    image_url: _ImageUrl


@with_config(_LENIENT)
class _OpaquePart(TypedDict):
    type: Literal["image", "audio", "file"]


@with_config(_LENIENT)
class _RefusalPart(TypedDict):
    type: Literal["refusal"]
    refusal: str


@with_config(_LENIENT)
class _ToolUsePart(TypedDict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: Any


@with_config(_LENIENT)
class _ToolResultPart(TypedDict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Any
    is_error: NotRequired[bool | None]


@with_config(_LENIENT)
class _ProviderNative(TypedDict):
    provider: str
    kind: str
    value: Any


@with_config(_LENIENT)
class _ProviderNativePart(_ProviderNative):
    type: Literal["provider_native"]


_Part = Annotated[
    _TextPart
    | _ImageUrlPart
    | _OpaquePart
    | _RefusalPart
    | _ToolUsePart
    | _ToolResultPart
    | _ProviderNativePart,
    Field(discriminator="type"),
]
_Content = str | list[_Part]


@with_config(_LENIENT)
class _FunctionCall(TypedDict):
    name: str
    arguments: str


@with_config(_LENIENT)
class _ToolCall(TypedDict):
    id: str
    type: str
    function: _FunctionCall


@with_config(_LENIENT)
class _ContentMessage(TypedDict):
    role: Literal["system", "user", "developer"]
    content: _Content
    name: NotRequired[str | None]


@with_config(_LENIENT)
class _AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: NotRequired[_Content | None]
    tool_calls: NotRequired[list[_ToolCall] | None]
    name: NotRequired[str | None]


@with_config(_LENIENT)
class _ToolMessage(TypedDict):
    role: Literal["tool"]
    content: _Content
    tool_call_id: str


@with_config(_LENIENT)
class _FunctionMessage(TypedDict):
    role: Literal["function"]
    content: str | None
    name: str


@with_config(_LENIENT)
class _ToolCallItem(TypedDict):
    role: Literal["tool_call"]
    call_id: str
    name: str
    arguments: Any


@with_config(_LENIENT)
class _ToolResultItem(TypedDict):
    role: Literal["tool_result"]
    call_id: str
    output: Any


@with_config(_LENIENT)
class _ProviderNativeMessage(_ProviderNative):
    role: Literal["provider_native"]


_Message = Annotated[
    _ContentMessage
    | _AssistantMessage
    | _ToolMessage
    | _FunctionMessage
    | _ToolCallItem
    | _ToolResultItem
    | _ProviderNativeMessage,
    Field(discriminator="role"),
]


@with_config(_LENIENT)
class _FunctionDefinition(TypedDict):
    name: str
    description: NotRequired[str | None]
    parameters: NotRequired[Any]


@with_config(_LENIENT)
class _ToolDefinition(TypedDict):
    type: str
    function: _FunctionDefinition


@with_config(_LENIENT)
class _AnnotatedRequest(TypedDict):
    messages: NotRequired[list[_Message]]
    instructions: NotRequired[_Content | None]
    model: NotRequired[str | None]
    tools: NotRequired[list[_ToolDefinition] | None]


_REQUEST = TypeAdapter(_AnnotatedRequest)


def _validate_request(value: Any, handler: Any, info: ValidationInfo) -> dict[str, Any]:
    data = handler(value)
    if info.context and info.context.get("trusted"):
        return data  # validated on ingest already (a third of a learn's parse time)
    try:
        _REQUEST.validate_python(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(
            f"{where}: {first['msg']}"
            + (f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else "")
        ) from None
    return data


AnnotatedRequestJson = Annotated[dict[str, Any], WrapValidator(_validate_request)]


# ------------------------------------------------------------------- run records


class _Timed:
    """Start/end as integer nanoseconds, parsed once, for the learners' arithmetic."""

    if TYPE_CHECKING:  # the models' fields; annotated here, pydantic would add them
        started_at: str
        ended_at: str | None

    @cached_property
    def start_ns(self) -> int:
        return parse_ns(self.started_at)

    @cached_property
    def end_ns(self) -> int | None:
        return None if self.ended_at is None else parse_ns(self.ended_at)


class CallRecord(WireModel, _Timed):
    """One LLM or tool call inside a run (Rust `CallRecord`)."""

    kind: Literal["llm", "tool"] = Field(description="`llm` for a model call, `tool` for a tool.")
    name: str = Field(
        description="The call's name: the trie path of an LLM call, the tool's name for a tool."
    )
    started_at: Timestamp = Field(description="RFC 3339 start time (nanoseconds kept).")
    ended_at: Timestamp | None = Field(
        default=None, description="RFC 3339 end time; absent while unknown."
    )
    metadata_snapshot: dict[str, Any] | None = Field(
        default=None, description="Free-form metadata the runtime captured with the call."
    )
    output_tokens: U32 | None = Field(
        default=None, description="Tokens the model emitted (learned as `osl`)."
    )
    prompt_tokens: U32 | None = Field(default=None, description="Tokens in the prompt.")
    total_tokens: U32 | None = Field(default=None, description="prompt + output tokens.")
    model_name: str | None = Field(default=None, description="The model that answered.")
    tool_call_count: U32 | None = Field(
        default=None, description="Tool calls the model asked for in this response."
    )
    annotated_request: AnnotatedRequestJson | None = Field(
        default=None,
        description=(
            "The LLM request as the runtime annotates it (OpenAI chat or Anthropic messages"
            " shape): what prompt-stability learning reads."
        ),
    )
    annotated_response: dict[str, Any] | None = Field(
        default=None, description="The LLM response, kept as given."
    )


class RunRecord(WireModel, _Timed):
    """One finished agent run (Rust `RunRecord`): the unit that is submitted and learned."""

    id: UuidStr = Field(description="The run's UUID; a run id is stored once (runs are immutable).")
    agent_id: NonEmptyStr = Field(
        description="Whose run this is; every learned value is per agent. Must not contain `::`.",
        json_schema_extra={"pattern": "^(?!.*::)"},
    )
    calls: list[CallRecord] = Field(description="The run's LLM and tool calls, in start order.")
    started_at: Timestamp = Field(description="RFC 3339 start time of the run.")
    ended_at: Timestamp | None = Field(default=None, description="RFC 3339 end time of the run.")


# ------------------------------------------------------------------ the plan


class ParallelGroup(WireModel):
    group_id: str
    tool_names: list[str]


class ParallelHint(WireModel):
    tool_name: str
    group_id: str
    explicit: bool


class MetadataEnvelope(KeepNull):
    run_id: UuidStr
    agent_id: str
    parallel_hints: list[ParallelHint]
    extensions: Any

    _keep_null = ("extensions",)


class ExecutionPlan(WireModel):
    """Tool-parallelism plan (`plan:{agent}`), read by a starting agent."""

    agent_id: str
    parallel_groups: list[ParallelGroup]
    metadata_template: MetadataEnvelope


# ------------------------------------------------------------------ the trie


class PredictionMetrics(WireModel):
    sample_count: U32
    mean: float
    p50: float
    p90: float
    p95: float


class LlmCallPrediction(KeepNull):
    remaining_calls: PredictionMetrics
    interarrival_ms: PredictionMetrics
    output_tokens: PredictionMetrics
    latency_sensitivity: U32 | None = None

    _keep_null = ("latency_sensitivity",)


class PredictionTrieNode(KeepNull):
    name: str
    children: dict[str, PredictionTrieNode]
    predictions_by_call_index: dict[U32Key, LlmCallPrediction]
    predictions_any_index: LlmCallPrediction | None = None

    _keep_null = ("predictions_any_index",)


class TrieEnvelope(WireModel):
    """Prediction trie (`trie:{agent}`); `generated_at` is kept as given."""

    version: str
    generated_at: str
    workflow_name: str
    root: PredictionTrieNode


# ------------------------------------------------------------ accumulators


class Centroid(WireModel):
    mean: float
    weight: float


class TDigestWire(WireModel):
    """Stored form of the Rust `tdigest` 0.2 crate's TDigest.

    The runtime writes an empty digest's NaN min/max as `0.0`; we store what we
    are given, so a value read and written back is unchanged.
    """

    centroids: list[Centroid]
    count: float
    max: float
    max_size: int
    min: float
    sum: float


class RunningStatsWire(WireModel):
    count: int = Field(ge=0)
    mean: float
    m2: float
    digest: TDigestWire


class NodeAccumulators(WireModel):
    remaining_calls: dict[U32Key, RunningStatsWire]
    interarrival_ms: dict[U32Key, RunningStatsWire]
    output_tokens: dict[U32Key, RunningStatsWire]
    sensitivity: dict[U32Key, RunningStatsWire]
    all_remaining_calls: RunningStatsWire
    all_interarrival_ms: RunningStatsWire
    all_output_tokens: RunningStatsWire
    all_sensitivity: RunningStatsWire


class AccumulatorState(WireModel):
    """Streaming statistics per trie path (`accumulators:{agent}`)."""

    nodes: dict[str, NodeAccumulators]


# ------------------------------------------------------------------------ ACG


class TokenizationMetadata(WireModel):
    model_family: str
    token_count: U32


class PromptBlock(WireModel):
    span_id: str
    sequence_index: U32
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    content_type: Literal["text", "tool_schema", "tool_result", "structured_output", "image"]
    provenance: Literal["system", "developer", "user", "tool", "retrieval", "memory"]
    sensitivity: Literal["public", "private", "restricted"] = "public"
    token_metadata: TokenizationMetadata | None = None


class ToolSchemaHash(WireModel):
    tool_name: str
    schema_hash: str


class PromptIR(WireModel):
    """One observed prompt, flattened into blocks (an ACG observation)."""

    ir_id: UuidStr
    blocks: list[PromptBlock]
    tool_schema_hashes: list[ToolSchemaHash] | None = None
    structured_output_schema_id: str | None = None
    source_request_hash: str | None = None
    created_at: Timestamp


class BlockStabilityScore(WireModel):
    span_id: str
    classification: Literal["stable", "semi_stable", "variable"]
    score: float
    confidence: float
    observation_count: U32


class StabilityAnalysisResult(WireModel):
    """ACG stability (`acg_stability:{key}`), read by a starting agent."""

    scores: list[BlockStabilityScore]
    stable_prefix_length: int = Field(ge=0)
    stable_prefix_fingerprint: str | None = None
    total_observations: U32


_OBSERVATIONS = TypeAdapter(list[PromptIR])


def parse_observations(data: str | bytes | list[Any]) -> list[PromptIR]:
    """`acg_observations:{key}` is a bare JSON list of PromptIR, oldest first."""
    try:
        if isinstance(data, str | bytes | bytearray):
            return _OBSERVATIONS.validate_json(data)
        return _OBSERVATIONS.validate_python(data)
    except ValidationError as exc:
        raise InvalidRecord.from_validation_error("PromptIR list", exc) from None


def observations_json(observations: list[PromptIR]) -> str:
    return _OBSERVATIONS.dump_json(observations, by_alias=True, exclude_none=True).decode()
