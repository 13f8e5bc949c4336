"""The OpenAI wire format: request models (strictly typed), their translation into SamplingParams,
response and stream-chunk bodies, and OpenAI-style errors.

No request field is silently dropped: an unknown field is a 400 naming it (`unknown_parameter`);
documented OpenAI fields that ask nothing of a model (`user`; chat's `metadata`, `store`,
`service_tier`) are listed and accepted; known fields this engine cannot
honour are refused with 400 unless they hold their no-op value (`suffix=""`, ...). Penalties and
biases (OpenAI's presence/frequency_penalty and logit_bias, whose string keys become token ids;
vLLM's repetition_penalty, min_tokens, bad_words, allowed_token_ids) map onto SamplingParams' fields.
Logprobs (the completions API's `logprobs: k`, chat's `logprobs: true` + `top_logprobs: k`) map
onto SamplingParams.logprobs and come back in each API's own shape (`completion_logprobs`,
`chat_logprobs`); completions' `echo` and vLLM's `prompt_logprobs` onto SamplingParams.prompt_logprobs
(`completion_logprobs` over the prompt's tokens too, `prompt_logprobs_body`).
Structured outputs (OpenAI's `response_format`, vLLM's `structured_outputs` and older `guided_*`
fields) become SamplingParams.structured_outputs; two fields constraining one output are a 400.
Chat's `tools` and `tool_choice` become a `ToolUse` (`tool_use`: the checks), messages' tool calls
objects for the chat template (`chat_messages`); server/chat_output.py parses the reply.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict

from engine.request import SamplingParams
from engine.structured_output import StructuredOutputs

# ---- errors ----------------------------------------------------------------------------------


class APIError(Exception):
    """An HTTP error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):  # noqa: A002 (the OpenAI field's name)
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,  # noqa: A002
               code: str | None = None) -> dict:
    """{"error": {"message", "type", "param", "code"}}, as the OpenAI API answers errors."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """The request body as `model`, or a 400 naming the first field that is wrong (an unknown one:
    `code: unknown_parameter`)."""
    try:
        return model.model_validate_json(raw)
    except pydantic.ValidationError as e:
        errors = e.errors(include_url=False)
        err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])  # also inside a union
        if err["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {err['msg']}", code="invalid_json") from None
        if not err["loc"]:
            raise APIError(400, f"the request body must be a JSON object: {err['msg']}") from None
        where = ".".join(str(x) for x in err["loc"] if isinstance(x, int) or str(x).isidentifier())  # no union tags
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"unknown parameter {where!r}: this server does not support it (docs/server.md "
                                f"lists the fields it accepts)", param=str(err["loc"][0]),
                           code="unknown_parameter") from None
        raise APIError(400, f"{where}: {err['msg']}", param=str(err["loc"][0])) from None


# ---- requests --------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")  # an unknown field is a 400, never dropped


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM: usage (tokens so far) in every chunk
    include_obfuscation: bool | None = None  # OpenAI's padding against side channels: no effect here


class JsonSchemaFormat(_Strict):
    """response_format's json_schema: the output is JSON matching `schema`."""

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = pydantic.Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced here


class ResponseFormat(_Strict):
    """OpenAI's response_format: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(_Strict):
    """vLLM's structured_outputs: one of json, regex, choice, grammar or json_object."""

    json_: dict[str, Any] | str | None = pydantic.Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None


class _Sampling(_Strict):
    """What both endpoints share. None means "not given": the OpenAI default applies."""

    model: str | None = None  # None: the served model
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension
    min_p: float | None = None  # vLLM extension
    seed: int | None = None
    stop: Any = None  # str or list of str: SamplingParams checks it
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool | None = None  # vLLM extension
    n: int | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM extension
    logit_bias: dict[str, float] | None = None  # {token id as a string: bias} (OpenAI)
    min_tokens: int | None = None  # vLLM extension
    bad_words: list[str] | None = None  # vLLM extension
    allowed_token_ids: list[int] | None = None  # vLLM extension
    # {processor name: {argument: value}} for the engine's registered logits processors (ours)
    logits_processor_args: dict[str, dict[str, Any]] | None = None
    user: str | None = None  # an end-user id for OpenAI's abuse monitoring: accepted, no effect
    response_format: ResponseFormat | None = None  # structured outputs: OpenAI's field
    structured_outputs: StructuredOutputsField | None = None  # vLLM's field, and its older guided_* ones:
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and (self.stream_options.include_usage
                                             or self.stream_options.continuous_usage_stats))

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(_Sampling):
    prompt: Any  # a string, strings, token ids or lists of them: completion_prompts checks it
    logprobs: int | None = None
    echo: bool | None = None  # the prompt (and with logprobs its tokens' logprobs) before the output
    suffix: str | None = None
    prompt_logprobs: int | None = None  # vLLM extension: each choice's `prompt_logprobs`
    return_token_ids: bool | None = None  # vLLM extension: each choice's prompt_token_ids and token_ids

    @property
    def score_only(self) -> bool:
        """echo with max_tokens 0: the prompt scored, nothing generated (vLLM samples one token and
        drops it; so does this server)."""
        return bool(self.echo) and self.max_tokens == 0

    @property
    def requested_max_tokens(self) -> int | None:
        """The max_tokens to budget: 1 to score a prompt (score_only); 0 without echo is a 400."""
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens must be >= 1, got 0 (0 is allowed with echo=true: the prompt is "
                                "scored, nothing generated)", param="max_tokens")
        return 1 if self.score_only else self.max_tokens

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """SamplingParams.prompt_logprobs: vLLM's field, else with echo the `logprobs` count."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None


class ContentPart(_Strict):
    type: str
    text: str | None = None
    # Other part types' payloads: parsed so that chat_messages refuses the part by its type.
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    refusal: Any = None


class FunctionCall(_Strict):
    name: str
    arguments: str  # a JSON object's text


class ToolCallParam(_Strict):
    """A call an assistant message made (OpenAI's tool_calls item)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None  # passed to the chat template, which may use it
    tool_calls: list[ToolCallParam] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    reasoning_content: str | None = None  # an assistant's reasoning (vLLM's field), which templates may render


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    functions: list[Any] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    function_call: Any = None  # the deprecated tool_choice
    parallel_tool_calls: bool | None = None  # false: "required" makes one call (auto: every call is parsed)
    # Documented OpenAI fields that ask nothing of the model: accepted, no effect.
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None


# Known parameters and the values that ask nothing of the engine (None: not given).
_NO_OP = {
    "suffix": ("",), "functions": ([],), "function_call": ("none", "auto"),
}


def check_supported(request: _Sampling) -> None:
    """400 for a known parameter this server cannot honour (penalties, tools, streamed best_of...)."""
    for name, allowed in _NO_OP.items():
        value = getattr(request, name, None)
        if value is not None and value not in allowed:
            raise APIError(400, f"{name}={value!r} is not supported by this server (it accepts only "
                                f"{' or '.join(map(repr, allowed))})", param=name, code="unsupported_parameter")
    check_best_of(request)


def _constraint_sources(request: _Sampling) -> list[tuple[str, dict[str, Any]]]:
    """Each field that constrains the output: (its name as the client wrote it, StructuredOutputs kwargs)."""
    sources = []
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        sources.append(("response_format", {"json": True}))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format: type json_schema needs json_schema.schema", param="response_format")
        sources.append(("response_format.json_schema.schema", {"json": fmt.json_schema.schema_}))
    vllm = request.structured_outputs
    if vllm is not None:
        given = {"json": vllm.json_, "regex": vllm.regex, "choice": vllm.choice, "grammar": vllm.grammar,
                 "json_object": vllm.json_object or None}
        sources += [(f"structured_outputs.{k}", {"json" if k == "json_object" else k: v}) for k, v in given.items()
                    if v is not None]
    guided = {"guided_json": ("json", request.guided_json), "guided_regex": ("regex", request.guided_regex),
              "guided_choice": ("choice", request.guided_choice), "guided_grammar": ("grammar", request.guided_grammar)}
    return sources + [(name, {kind: v}) for name, (kind, v) in guided.items() if v is not None]


def structured_outputs_source(request: _Sampling) -> str | None:
    """The field that constrains the output, dotted (None: none does): what a compile error names."""
    sources = _constraint_sources(request)
    return sources[0][0] if sources else None


def structured_outputs(request: _Sampling) -> StructuredOutputs | None:
    """The output's constraint from response_format, structured_outputs or guided_*: at most one of
    them, or a 400 naming the second."""
    sources = _constraint_sources(request)
    if not sources:
        return None
    if len(sources) > 1:
        (first, _), (second, _) = sources[:2]
        raise APIError(400, f"{second} and {first} both constrain the output: send one of them",
                       param=second.split(".")[0])
    [(name, kwargs)] = sources
    whitespace = bool(request.structured_outputs and request.structured_outputs.disable_any_whitespace)
    try:
        return StructuredOutputs(**kwargs, disable_any_whitespace=whitespace)
    except ValueError as e:
        raise APIError(400, f"{name}: {e}", param=name.split(".")[0]) from None


def check_best_of(request: _Sampling) -> None:
    """400 for best_of > n with stream=true: the best n are known only once all best_of finished
    (OpenAI refuses it too)."""
    n = 1 if request.n is None else request.n
    if request.stream and request.best_of is not None and request.best_of > n:
        raise APIError(400, f"best_of={request.best_of} > n={n} cannot be streamed: the best {n} are known only "
                            f"once all {request.best_of} finished (send stream=false)", param="best_of")


def requested_logprobs(request: _Sampling) -> tuple[int | None, str]:
    """How many top alternatives per token the request asks for (None: no logprobs) and the
    parameter that names the count."""
    if isinstance(request, ChatCompletionRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        return ((request.top_logprobs or 0) if request.logprobs else None), "top_logprobs"
    return request.logprobs, "logprobs"


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)  # not bools


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """A completion request's prompts, one choice each: a string, a list of strings, a list of int
    token ids (one prompt; `[]` is one empty prompt, which the engine refuses) or a list of lists
    of ids (the OpenAI API's four forms)."""
    if isinstance(prompt, str):
        return [prompt]
    if _is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and (all(isinstance(p, str) for p in prompt) or all(map(_is_ids, prompt))):
        return list(prompt)
    raise APIError(400, "prompt must be a string, a list of strings, a list of int token ids or a list of lists "
                        f"of int token ids, got {json.dumps(prompt)[:80]}", param="prompt")


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages for the chat template: content as one string (text parts joined by newlines; null:
    empty), the other fields given, an assistant's tool calls with their arguments as objects (what
    templates read, as transformers and vLLM pass them)."""
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            bad = next((p.type for p in content if p.type != "text" or p.text is None), None)
            if bad is not None:
                raise APIError(400, f"messages.{i}.content: only text parts are supported, got type {bad!r}",
                               param="messages", code="unsupported_parameter")
            content = "\n".join(p.text for p in content)
        extra = {"name": m.name, "tool_call_id": m.tool_call_id, "reasoning_content": m.reasoning_content}
        out.append({"role": m.role, "content": content or ""} | {k: v for k, v in extra.items() if v is not None})
        if m.tool_calls is not None:
            out[-1]["tool_calls"] = [_template_call(c, f"messages.{i}.tool_calls.{j}")
                                     for j, c in enumerate(m.tool_calls)]
    return out


def _template_call(call: ToolCallParam, where: str) -> dict[str, Any]:
    """An assistant's tool call for the chat template: its arguments' JSON text parsed (a 400 unless an object)."""
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise APIError(400, f"{where}.function.arguments must be a JSON object's text, got "
                            f"{call.function.arguments[:80]!r}", param="messages")
    body = {"type": "function", "function": {"name": call.function.name, "arguments": arguments}}
    return body if call.id is None else {"id": call.id, **body}


@dataclasses.dataclass(frozen=True)
class ToolUse:
    """What a chat request asks of tools: the tools for the template (None: none) and tool_choice,
    "none", "auto", "required" or "named" (then `function` names the one to call)."""

    tools: list[dict[str, Any]] | None
    choice: str
    function: str | None = None
    parallel: bool = True  # parallel_tool_calls: false holds "required" to one call

    @property
    def forced(self) -> bool:
        """The reply must call a tool ("required", or a named function)."""
        return self.choice in ("required", "named")


def tool_use(request: ChatCompletionRequest, *, template_renders_tools: bool, parser: str | None) -> ToolUse:
    """The request's tools and tool_choice, or a 400 naming the field that makes no sense: a
    tool_choice without tools or naming a function not among them, two tools of one name, tools
    for a chat template that does not render them, "auto" without a tool-call parser, a forced
    call (its grammar) beside another constraint on the output (response_format...)."""
    choice = request.tool_choice
    label = choice if isinstance(choice, str) else "a named function"
    if not request.tools:
        if choice not in (None, "none"):
            raise APIError(400, f"tool_choice {label!r} needs tools", param="tool_choice")
        return ToolUse(None, "none")
    tools = [t.model_dump(exclude_none=True) for t in request.tools]
    names = [t["function"]["name"] for t in tools]
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise APIError(400, f"tools: two tools are named {twice!r}", param="tools")
    if not template_renders_tools:
        raise APIError(400, "tools: this model's chat template does not render tools", param="tools",
                       code="unsupported_parameter")
    parallel = request.parallel_tool_calls is not False
    use = (ToolUse(tools, "named", choice.function.name, parallel) if isinstance(choice, NamedToolChoice)
           else ToolUse(tools, choice or "auto", parallel=parallel))
    if use.function is not None and use.function not in names:
        raise APIError(400, f"tool_choice names the function {use.function!r}, which is not among the tools "
                            f"({', '.join(names)})", param="tool_choice")
    if use.choice == "auto" and parser is None:
        raise APIError(400, "tool_choice 'auto' needs a tool-call parser: this server runs without one "
                            "(scripts/serve.py --tool_call_parser)", param="tool_choice",
                       code="unsupported_parameter")
    if use.forced and _constraint_sources(request):
        raise APIError(400, f"tool_choice {label!r} constrains the output, and so does "
                            f"{_constraint_sources(request)[0][0]}: send one of them", param="tool_choice")
    return use


def max_tokens(requested: int | None, prompt_len: int, max_model_len: int, default: int | None,
               param: str) -> int:
    """The output budget: the request's (at least 1; `param` names it in errors), else `default`
    (None: the rest of the context), which must fit beside the prompt in max_model_len (400
    "context_length_exceeded" otherwise)."""
    if requested is not None and requested < 1:
        raise APIError(400, f"{param} must be >= 1, got {requested}", param=param)
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens, but the prompt "
                            f"has {prompt_len} (it and at least one output token must fit)",
                       param="prompt" if param == "max_tokens" else "messages", code="context_length_exceeded")
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens, but {prompt_len} "
                            f"prompt tokens + {param}={requested} is {prompt_len + requested}",
                       param=param, code="context_length_exceeded")
    return requested


_PARAM_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "stop_token_ids", "stop",
                 "ignore_eos", "prompt_logprobs", "n", "best_of", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "logit_bias", "min_tokens", "bad_words", "allowed_token_ids",
                 "logits_processor_args")


def _param_named(message: str) -> str | None:
    """The request field an engine ValueError names: the earliest of _PARAM_FIELDS in its message."""
    found = [(m.start(), f) for f in _PARAM_FIELDS if (m := re.search(rf"\b{f}\b", message))]
    return min(found)[1] if found else None


def logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias (token ids as JSON object keys) with int keys, or a 400 naming it."""
    if bias is None:
        return None
    bad = next((key for key in bias if not re.fullmatch(r"-?\d+", key.strip())), None)
    if bad is not None:
        raise APIError(400, f"logit_bias: keys must be token ids, got {bad!r}", param="logit_bias")
    return {int(key): value for key, value in bias.items()}


def sampling_params(request: _Sampling, budget: int, prompt_logprobs: int | None = None) -> SamplingParams:
    """SamplingParams with OpenAI's defaults (temperature 1, top_p 1) for what the request leaves
    out; a value the engine refuses is a 400 naming its parameter."""
    logprobs, logprobs_param = requested_logprobs(request)
    given = {
        "n": request.n, "best_of": request.best_of,
        "temperature": request.temperature, "top_p": request.top_p, "min_p": request.min_p,
        "top_k": -1 if request.top_k == 0 else request.top_k, "seed": request.seed, "stop": request.stop,
        "stop_token_ids": request.stop_token_ids, "ignore_eos": request.ignore_eos, "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs, "structured_outputs": structured_outputs(request),
        "presence_penalty": request.presence_penalty, "frequency_penalty": request.frequency_penalty,
        "repetition_penalty": request.repetition_penalty, "logit_bias": logit_bias(request.logit_bias),
        "min_tokens": request.min_tokens, "bad_words": request.bad_words,
        "allowed_token_ids": request.allowed_token_ids, "logits_processor_args": request.logits_processor_args,
    }
    try:
        return SamplingParams(max_tokens=budget, **{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        message = str(e)
        if message.startswith("logprobs"):
            raise APIError(400, logprobs_param + message.removeprefix("logprobs"), param=logprobs_param) from None
        raise APIError(400, message, param=_param_named(message)) from None


# ---- responses -------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None,
                      prompt_logprobs: list | None = None) -> dict:
    """One choice of a (non-streamed) completion; `prompt_logprobs` is vLLM's (null unless asked)."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "prompt_logprobs": prompt_logprobs}


def token_ids_fields(prompt_ids: list[int] | None, token_ids: list[int]) -> dict:
    """vLLM's return_token_ids fields of a completion choice or chunk: the output's token ids, and
    the prompt's (a stream's first chunk of a choice; None: not in this chunk)."""
    return {"token_ids": list(token_ids)} | ({} if prompt_ids is None else {"prompt_token_ids": list(prompt_ids)})


def completion_body(rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": use}


def completion_chunk(rid: str, created: int, model: str, text: str, finish_reason: str | None = None,
                     logprobs: dict | None = None, index: int = 0) -> dict:
    """One streamed completion chunk, of choice `index`."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_choice(index: int, message: dict, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    """One choice of a (non-streamed) chat completion; `message` from server/chat_output.py."""
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_body(rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": use}


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               logprobs: dict | None = None, index: int = 0) -> dict:
    """One streamed chat chunk, of choice `index`."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


# The engine's per-token logprobs: {chosen token: logprob, then its top alternatives} (engine/request.py);
# None for a prompt's first token, which nothing predicts.
Entries = list[dict[int, float] | None]
_MIN_LOGPROB = -9999.0  # vLLM's stand-in for -inf, which JSON cannot carry


def _finite(value: float) -> float:
    return max(value, _MIN_LOGPROB)


def completion_logprobs(entries: Entries, token_text: Callable[[int], str], text_offset: int = 0, *,
                        token_ids: list[int] | None = None, top: int | None = None) -> dict:
    """The completions API's logprobs for these tokens: their texts, logprobs, top alternatives by
    text (the chosen token's included, as vLLM) and character offsets counted from text_offset.
    With echo the entries start with the prompt's: a None entry (the first prompt token) has a
    null logprob and null top_logprobs, its token named by `token_ids` (every token's id, when
    given); `top` keeps each dict's first top + 1 items (the token's own and its top alternatives:
    vLLM's cut of prompt logprobs asked for more than `logprobs`)."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for i, entry in enumerate(entries):
        token = token_ids[i] if token_ids is not None else next(iter(entry))
        tokens.append(token_text(token))
        offsets.append(text_offset)
        text_offset += len(tokens[-1])
        if entry is None:
            logprobs.append(None)
            tops.append(None)
            continue
        logprobs.append(_finite(entry[token]))
        kept = list(entry.items())[:None if top is None else top + 1]
        tops.append({token_text(t): _finite(v) for t, v in kept})
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs_body(entries: Entries, k: int, token_text: Callable[[int], str]) -> list[dict | None]:
    """vLLM's `prompt_logprobs` of a choice: per prompt token None (the first) or {"token id":
    {logprob, rank, decoded_token}} of the token and its top k. A top-k token's rank is its place
    among them (1 = most likely); the prompt token's own rank is known only when it is among them
    (None otherwise: the engine returns the top k, not every token's rank)."""
    out: list[dict | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        items = list(entry.items())  # the prompt token first, then the top k not already listed
        top = items if len(items) <= k else items[1:]
        values = [v for _, v in top]
        ranks = {t: 1 + sum(u > v for u in values) for t, v in top}
        out.append({str(t): {"logprob": _finite(v), "rank": ranks.get(t), "decoded_token": token_text(t)}
                    for t, v in items})
    return out


def chat_logprobs(entries: Entries, top: int, token_text: Callable[[int], str]) -> dict:
    """Chat's logprobs for these tokens: per token its text, logprob and UTF-8 bytes, and the `top`
    most likely tokens in rank order (the chosen one among them where it ranks)."""
    def item(token: int, logprob: float) -> dict:
        text = token_text(token)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}
    return {"content": [{**item(*next(iter(e.items()))),
                         "top_logprobs": [item(t, v) for t, v in sorted(e.items(), key=lambda tv: -tv[1])[:top]]}
                        for e in entries]}


def usage_chunk(chunk: dict, use: dict) -> dict:
    """The final chunk of a stream with include_usage: no choices, the request's usage."""
    return {**chunk, "choices": [], "usage": use}


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"
