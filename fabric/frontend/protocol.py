"""The OpenAI-compatible request and response bodies (pydantic), as the OpenAPI spec shows them.

Owns the wire shapes of ``/v1/completions``, ``/v1/chat/completions`` (and their SSE chunks),
``/v1/models``, ``/health`` and the error body. Unknown request fields are ignored, as OpenAI's
own server does for fields it does not know; fields the fabric cannot honour are refused with a
400 naming them (``n`` > 1, ``stop``).

Invariant: a request body that validates holds only what the rest of the frontend can use
without failing: every string is valid Unicode (``Text``: a lone surrogate, which JSON's
``\\ud800`` escapes can carry, is a 400 naming its field, never a tokenizer error);
``max_tokens`` and ``seed`` fit the signal wire (msgpack's 64 bits; token ids are checked
against the vocabulary by ``api``).

``temperature``, ``top_p`` and ``seed`` are accepted and forwarded in ``GenerateRequest.sampling``;
the workers decode greedily today, so they do not change the output yet.

Beyond OpenAI's fields, both request bodies accept an optional ``fabric`` object that pins the
route of this one request (benchmarks, tests, operators)::

    "fabric": {"worker": "<serving worker id>", "prefill_worker": "<KV source id>" | ""}

* ``worker``: the decode or aggregated worker that serves the request (omitted: chosen by the
  router's policy, ``policy``).
* ``prefill_worker``: the prefill or aggregated worker whose KV the serving worker reads; ``""``
  makes the serving worker compute the prompt itself (with its own cached prefix). Omitted: the
  router's choice (a dedicated prefill worker for a decode worker, or a peer holding a longer
  cached prefix), also for a request that pins ``worker``.
* Unknown keys in ``fabric`` are refused. A worker that is not live, has the wrong role, or cannot
  exchange KV with the other one (compat hash, block size) is a 400 whose message names the live
  workers of that role (``param``: ``fabric.worker`` or ``fabric.prefill_worker``). With the
  OpenAI client: ``extra_body={"fabric": {"worker": "aggregated-1"}}``.

Responses carry ``fabric`` too: the route (``worker`` and ``decode_worker``: the serving worker;
``prefill_worker``: who supplied the KV, "" for the serving worker itself;
``routed_prefill_worker``: whom the router named; ``route``: ``local``, ``prefill``,
``peer_hit`` or ``node`` (the serving worker's prefix is in its node's tier); ``route_pinned``;
``routed_prefix_blocks`` / ``routed_local_blocks``: the prompt
blocks the router saw cached on the KV provider / the serving worker), the worker's statistics
(``cached_tokens``, ``computed_tokens``, ``kv_transfer_ms``, ``kv_wait_ms``, ``prefill_ms``,
``ttft_ms``, ``fallback``...) and the frontend's own ``frontend_ttft_ms``. In a stream it is on
the chunk that carries ``finish_reason``. OpenAI clients keep unknown fields (``response.fabric``).

``fabric.kv_trace`` (``KvTraceInfo``; ``fabric.frontend.traces``) is the request's KV trace::

    "kv_trace": {"segments": [{"source": "device", "start": 0, "end": 64, "worker": ""},
                              {"source": "recompute", "start": 64, "end": 100, "worker": ""}],
                 "steps_ms": {"route": ..., "queue": ..., "onboard": ..., "transfer": ...,
                              "transfer_wait": ..., "prefill": ..., "first_token": ...},
                 "fallback": ""}

``segments`` cover the prompt's token positions in order (end exclusive), each with its source:
``device`` / ``host`` / ``disk`` / ``g4`` (the serving worker's G1 prefix cache, G2, G3, the
shared G4 store), ``node`` (its host's node cache), ``peer`` / ``prefill`` (read over NIXL from
``worker``: an aggregated peer holding the prefix, or the P/D prefill worker), ``recompute``
(computed by the serving worker). ``fallback`` says why the prompt was recomputed (e.g. the
prefill worker timed out, reading its blocks failed). The same object, with the rest of the
``fabric`` field, is served by ``GET /v1/requests/{id}`` for the last ended requests.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

Scalar = float | int | str | bool
MAX_TOKENS_LIMIT = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"a lone surrogate ({text[exc.start]!r}) at character {exc.start} is not Unicode "
            "text; send UTF-8 text (a JSON \\u escape of a surrogate needs its pair)"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
"""A request string: valid Unicode (module docstring)."""


class StreamOptions(BaseModel):
    include_usage: bool = False


class FabricOptions(BaseModel):
    """The request's ``fabric`` object: a routing pin (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    worker: Text | None = Field(
        default=None,
        min_length=1,
        description="Serving worker (decode or aggregated) id; omitted: the router chooses.",
    )
    prefill_worker: Text | None = Field(
        default=None,
        description=(
            'KV source (prefill or aggregated worker) id; "" computes the prompt on the serving '
            "worker; omitted: the router chooses (a peer hit when one holds a longer prefix)."
        ),
    )


class GenerationParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text = Field(description="The served model's id (see /v1/models).")
    max_tokens: int | None = Field(
        default=None, ge=1, le=MAX_TOKENS_LIMIT, description="Most tokens to generate."
    )
    temperature: float | None = Field(
        default=None, ge=0.0, le=2.0, description="Accepted; workers decode greedily today."
    )
    top_p: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Accepted; workers decode greedily today."
    )
    seed: int | None = Field(
        default=None, ge=INT64_MIN, le=INT64_MAX, description="Accepted; forwarded to the workers."
    )
    n: int = Field(default=1, ge=1, le=1, description="Only 1 is supported.")
    stop: str | list[str] | None = Field(
        default=None, description="Not supported yet: null or empty only."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    fabric: FabricOptions | None = Field(
        default=None, description="KV Fabric extension: pin this request's route."
    )

    @field_validator("stop")
    @classmethod
    def _no_stop_sequences(cls, value: str | list[str] | None) -> None:
        if value:
            raise ValueError(
                "stop sequences are not supported yet (workers stop at the model's EOS token "
                "and at max_tokens)"
            )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationParams):
    prompt: Text | list[int] | list[Text] | list[list[int]] = Field(
        description="One prompt: text, or token ids (a batch of one is accepted)."
    )


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        default=None,
        ge=1,
        le=MAX_TOKENS_LIMIT,
        description="Preferred over max_tokens when both are given.",
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class KvSegmentInfo(BaseModel):
    """Prompt positions ``start .. end - 1`` and where their K/V came from."""

    source: Literal["device", "host", "disk", "g4", "node", "peer", "prefill", "recompute"]
    start: int
    end: int
    worker: str = Field(default="", description="The peer or prefill worker read over NIXL.")


class KvTraceInfo(BaseModel):
    """``fabric.kv_trace``: where the prompt's KV came from, step times, the fallback."""

    segments: list[KvSegmentInfo]
    steps_ms: dict[str, float] = Field(
        description="route, queue, onboard, transfer, transfer_wait, prefill, first_token (ms)."
    )
    fallback: str = Field(description="Why the serving worker recomputed the prompt; '' if not.")


FabricInfo = dict[str, Scalar | KvTraceInfo]
"""A response's ``fabric`` field: route and worker statistics, and ``kv_trace``."""


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    fabric: FabricInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    fabric: FabricInfo | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    fabric: FabricInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kv-fabric"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str
    workers: dict[str, int] = Field(description="Eligible workers by role.")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
