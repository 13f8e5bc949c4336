"""Tool calls and reasoning on /v1/chat/completions: each parser on hand-written outputs (whole and
streamed, split at every character boundary: the deltas add up to the whole output's message),
chat templates rendering tools, tool calls and tool messages as transformers does, the request
checks, and end to end through the `openai` client: the real SmolLM2 served with a Qwen3-style
template calls a tool by itself (auto, one example in the conversation), and through a grammar
when tool_choice names a function or is "required"; a template that opens `<think>` in the prompt
sends the output to reasoning_content.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import httpx
import openai
import pytest
from tokenizers import Tokenizer as HFTokenizer, models

from engine import LLM, SamplingParams
from models.loading.tokenizer import Tokenizer
from server import protocol
from server.app import create_app, serving
from server.chat_output import ChatOutput, chat_output
from server.engine_loop import EngineLoop
from server.reasoning_parsers import REASONING_PARSERS
from server.tool_parsers import TOOL_PARSERS, NamedCall, RequiredCalls

# ---- parsers on hand-written outputs ----------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"], "additionalProperties": False}}}
CALL_F = {"name": "f", "arguments": '{"a": 1}'}
CALL_G = {"name": "g", "arguments": '{"b": "<x>", "c": [1, 2]}'}
HARMONY_CALL = ('<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary '
                'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}')
PARIS = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
DS_BEGIN, DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL = '<｜tool▁call▁begin｜>function<｜tool▁sep｜>{}\n```json\n{}\n```<｜tool▁call▁end｜>'

# (reasoning parser, tool parser, prompt, output, expected: reasoning_content, content, calls)
CASES = [
    (None, "hermes", "", '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', (None, None, [CALL_F])),
    (None, "hermes", "", 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>'
     '\n{"name": "g", "arguments": {"b": "<x>", "c": [1, 2]}}\n</tool_call>\nDone.',
     (None, "Let me check.\n\n\nDone.", [CALL_F, CALL_G])),
    (None, "hermes", "", 'A <tool_call>{"name": "f", "arguments": {"a": 1}</tool_call> B',  # a brace short
     (None, 'A <tool_call>{"name": "f", "arguments": {"a": 1}</tool_call> B', [])),
    (None, "hermes", "", '<tool_call>\n{"name": "f", "arguments": {"a": 1}}',  # stopped on EOS before the tag
     (None, None, [CALL_F])),
    (None, "hermes", "", '<tool_call>\n{"name": "f", "argu', (None, '<tool_call>\n{"name": "f", "argu', [])),
    (None, "hermes", "", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',  # arguments as text
     (None, None, [CALL_F])),
    (None, "hermes", "", "No tools needed: 1 < 2.\n", (None, "No tools needed: 1 < 2.\n", [])),
    ("qwen3", "hermes", "", '<think>\nThe user wants weather.\n</think>\n\n<tool_call>\n{"name": "f", "arguments": '
     '{"a": 1}}\n</tool_call>', ("\nThe user wants weather.\n", None, [CALL_F])),
    ("qwen3", None, "", "<think>\nEasy.\n</think>\n\nParis.", ("\nEasy.\n", "\n\nParis.", [])),
    ("qwen3", None, "", "<think>\nStill thinking", ("\nStill thinking", "", [])),
    ("qwen3", None, "", "Paris, no thinking </think>", (None, "Paris, no thinking </think>", [])),
    ("qwen3", None, "<|im_start|>assistant\n<think>\n", "Opened by the prompt.\n</think>\n\nParis.",
     ("Opened by the prompt.\n", "\n\nParis.", [])),
    (None, "llama3_json", "", '{"name": "f", "parameters": {"a": 1}}', (None, None, [CALL_F])),
    (None, "llama3_json", "", '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {"b": "<x>", '
     '"c": [1, 2]}}', (None, None, [CALL_F, CALL_G])),
    (None, "llama3_json", "", 'Calling.<|python_tag|>{"name": "f", "parameters": {"a": 1}}',
     (None, "Calling.", [CALL_F])),
    (None, "llama3_json", "", '{"name": "f", "parameters": {"a": 1}',
     (None, '{"name": "f", "parameters": {"a": 1}', [])),
    (None, "llama3_json", "", '{"answer": 42}', (None, '{"answer": 42}', [])),
    (None, "llama3_json", "", "Paris is the capital.", (None, "Paris is the capital.", [])),
    ("openai_gptoss", "openai", "", HARMONY_CALL, ("Need the weather.", None, [PARIS])),
    ("openai_gptoss", "openai", "", "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant "
     'to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}',  # recipient in the role
     (None, "Checking.", [PARIS])),
    ("openai_gptoss", "openai", "", "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final"
     "<|message|>Paris.", ("Think.", "Paris.", [])),
    ("openai_gptoss", None, "", "<|channel|>analysis<|message|>One.<|end|><|start|>assistant<|channel|>analysis"
     "<|message|>Two.<|end|><|start|>assistant<|channel|>final<|message|>Paris.", ("One.\nTwo.", "Paris.", [])),
    ("openai_gptoss", "openai", "", HARMONY_CALL[:-2],  # cut short: the call stays text
     ("Need the weather.", HARMONY_CALL[HARMONY_CALL.index("<|start|>"):-2], [])),
    (None, "openai", "", HARMONY_CALL,  # no reasoning parser: the analysis message stays as written
     (None, HARMONY_CALL[:HARMONY_CALL.index("<|start|>")], [PARIS])),
    (None, "deepseek_v3", "", f"Sure.{DS_BEGIN}{DS_CALL.format('f', '{\"a\": 1}')}\n"
     f"{DS_CALL.format('g', '{\"b\": \"<x>\", \"c\": [1, 2]}')}{DS_END}", (None, "Sure.", [CALL_F, CALL_G])),
    (None, "deepseek_v3", "", DS_BEGIN + DS_CALL.format("f", "{oops}") + DS_END,
     (None, DS_BEGIN + DS_CALL.format("f", "{oops}") + DS_END, [])),
    (None, NamedCall(WEATHER), "", '{"city": "Paris"}', (None, None, [PARIS])),
    (None, NamedCall(WEATHER), "", '{"city": "Par', (None, '{"city": "Par', [])),
    (None, RequiredCalls([WEATHER]), "", '[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
     '{"name": "get_weather", "parameters": {"city": "Rome"}}]',
     (None, None, [PARIS, {"name": "get_weather", "arguments": '{"city": "Rome"}'}])),
]


def output(reasoning: str | None, tools, prompt: str) -> ChatOutput:
    """A ChatOutput with the named (or given) parsers."""
    return ChatOutput(REASONING_PARSERS.get(reasoning), TOOL_PARSERS[tools] if isinstance(tools, str) else tools,
                      prompt)


def fields(message: dict) -> tuple[str | None, str | None, list[dict]]:
    """A message's reasoning, content and calls (name, arguments)."""
    return (message.get("reasoning_content"), message["content"],
            [c["function"] for c in message.get("tool_calls", [])])


def reassembled(deltas: list[dict]) -> tuple[str, str, list[dict]]:
    """A stream's reasoning, content and calls, put together as a client does."""
    calls: dict[int, dict] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            if "id" in c:
                assert c["id"].startswith("call_") and c["type"] == "function" and c["function"]["arguments"] == ""
                assert c["index"] == len(calls)  # a call's name and id come first, once
                calls[c["index"]] = {"name": c["function"]["name"], "arguments": ""}
            calls[c["index"]]["arguments"] += c["function"]["arguments"]
    return ("".join(d.get("reasoning_content", "") for d in deltas), "".join(d.get("content", "") for d in deltas),
            [calls[i] for i in sorted(calls)])


@pytest.mark.parametrize("reasoning, tools, prompt, text, expected", CASES)
def test_parse_whole_and_streamed_at_every_split(reasoning, tools, prompt, text, expected):
    out = output(reasoning, tools, prompt)
    message = out.message(text)
    assert fields(message) == expected
    assert message.get("tool_calls", [{}])[0].get("id", "call_").startswith("call_")
    assert out.finish_reason("stop") == ("tool_calls" if expected[2] else "stop")
    assert out.finish_reason("length") == "length"
    want = (expected[0] or "", expected[1] or "", expected[2])
    for cut in range(len(text) + 1):
        streamed = output(reasoning, tools, prompt)
        got = reassembled(streamed.feed(text[:cut]) + streamed.feed(text[cut:]) + streamed.finish())
        assert got == want, cut
    one_by_one = output(reasoning, tools, prompt)
    deltas = [d for ch in text for d in one_by_one.feed(ch)] + one_by_one.finish()
    assert reassembled(deltas) == want
    assert all(len(d) == 1 and next(iter(d.values())) for d in deltas)  # one field per delta, never empty


def test_stream_holds_markers_and_whitespace_only():
    """Text streams as it settles: held back only while it may still be a marker, a call or whitespace beside one."""
    out = output("qwen3", "hermes", "")
    assert out.feed("<thi") == []
    assert out.feed("nk>Hmm") == [{"reasoning_content": "Hmm"}]
    assert out.feed("</thi") == []
    assert out.feed("nk>\n\nIt is") == [{"content": "\n\nIt is"}]
    assert out.feed(" \n<tool_") == []
    assert out.feed("call>\n{") == []
    assert out.feed('"name": "f", "arguments": {"a": 1}}\n</tool_call>')[0]["tool_calls"][0]["function"]["name"] == "f"
    assert out.finish() == [] and out.finish_reason("stop") == "tool_calls"
    plain = ChatOutput()
    assert plain.feed(" ") == [{"content": " "}] and plain.finish() == []  # no parser: nothing held


def test_sampling_params_follow_the_parsers():
    """Special tokens stay in the text for formats whose markers are special; a forced call holds
    the output to its schema (compact JSON); "none" parses no calls."""
    params = SamplingParams(max_tokens=8)
    assert output(None, None, "").sampling_params(params) == params
    assert not output("openai_gptoss", "openai", "").sampling_params(params).skip_special_tokens
    assert output("qwen3", None, "").sampling_params(params).skip_special_tokens
    use = protocol.ToolUse([WEATHER], "named", "get_weather")
    forced = chat_output(use, TOOL_PARSERS["hermes"], REASONING_PARSERS["qwen3"], "").sampling_params(params)
    assert json.loads(forced.structured_outputs.json) == WEATHER["function"]["parameters"]
    assert forced.structured_outputs.disable_any_whitespace and forced.skip_special_tokens
    required = chat_output(dataclasses.replace(use, choice="required", function=None), None, None, "")
    assert json.loads(required.sampling_params(params).structured_outputs.json)["minItems"] == 1
    assert chat_output(dataclasses.replace(use, choice="none"), TOOL_PARSERS["hermes"], None, "").tools is None


# ---- chat templates ---------------------------------------------------------------------------

# The tool parts of Qwen3's template (its thinking parts left out).
QWEN3_TEMPLATE = """
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
        '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
        '<args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' + message.content }}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if loop.first and message.content or not loop.first %}{{- '\\n' }}{%- endif %}
            {%- set tool_call = tool_call.function %}
            {{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' + tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
THINK_TEMPLATE = QWEN3_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' }}{%- endif %}",
                                        "{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")

# The tool parts of Llama 3.1's template (JSON calls; its date line from strftime_now).
LLAMA3_TEMPLATE = """
{{- bos_token }}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}
{{- 'Cutting Knowledge Date: December 2023\\n' }}
{{- 'Today Date: ' + strftime_now('%d %b %Y') + '\\n\\n<|eot_id|>' }}
{%- for message in messages %}
    {%- if loop.last and tools is not none and message.role == 'user' %}
        {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}
        {{- 'Given the following functions, please respond with a JSON for a function call with its proper '
            'arguments that best answers the given prompt.\\n\\n' }}
        {%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}
        {{- message.content | trim + '<|eot_id|>' }}
    {%- elif message.tool_calls %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + '}<|eot_id|>' }}
    {%- elif message.role == 'tool' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim }}
        {{- '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

TURNS = [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": None,
          "tool_calls": [{"id": "call_1", "type": "function",
                          "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
         {"role": "user", "content": "And in London?"}]


def bare_tokenizer(template: str) -> Tokenizer:
    """A tokenizer that only renders templates (a one-word vocabulary)."""
    backend = HFTokenizer(models.WordLevel({"<s>": 0}, unk_token="<s>"))
    return Tokenizer(backend, eos_token_ids=[0], bos_token_id=0, add_bos=False, chat_template=template)


def template_messages(turns: list[dict]) -> list[dict]:
    return protocol.chat_messages(protocol.ChatCompletionRequest.model_validate({"messages": turns}).messages)


def test_messages_for_the_template():
    """Tool calls' arguments become objects; tool_call_id and null content pass as transformers expects."""
    messages = template_messages(TURNS)
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    bad = [{**TURNS[1], "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]
    with pytest.raises(protocol.APIError, match=r"messages.0.tool_calls.0.function.arguments") as e:
        template_messages(bad)
    assert e.value.param == "messages"


def test_qwen3_template_renders_tools_calls_and_results():
    tokenizer = bare_tokenizer(QWEN3_TEMPLATE)
    assert tokenizer.template_reads("tools") and not bare_tokenizer("{{ messages }}").template_reads("tools")
    text = tokenizer.render_chat(template_messages(TURNS), tools=[WEATHER])
    assert text == (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou "
        "are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        # tojson as transformers': keys in the client's order, "<" not HTML-escaped
        '{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], '
        '"additionalProperties": false}}}\n'
        "</tools>\n\nFor each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>user\nAnd in London?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.render_chat(template_messages(TURNS[:1])) == "<|im_start|>user\nWeather in Paris?<|im_end|>\n" \
                                                                  "<|im_start|>assistant\n"


def test_llama3_template_renders_tools_calls_and_results():
    text = bare_tokenizer(LLAMA3_TEMPLATE).render_chat(template_messages(TURNS), tools=[WEATHER])
    header = "<s><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: " \
             "December 2023\nToday Date: "
    assert text.startswith(header)
    assert text[len(header):].split("\n", 1)[1] == (
        "\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
        "<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\nsunny<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for "
        "a function call with its proper arguments that best answers the given prompt.\n\n"
        + json.dumps(WEATHER, indent=4) + "\n\nAnd in London?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


# ---- request checks ---------------------------------------------------------------------------

REQUIRED = {"type": "function", "function": {"name": "get_weather"}}
BAD_TOOLS = [  # request fields, the error's param
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [], "tool_choice": REQUIRED}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
]


def tool_use(fields: dict, renders: bool = True, parser: str | None = "hermes") -> protocol.ToolUse:
    body = protocol.parse(protocol.ChatCompletionRequest, json.dumps({"messages": TURNS[:1], **fields}).encode())
    return protocol.tool_use(body, template_renders_tools=renders, parser=parser)


@pytest.mark.parametrize("fields, param", BAD_TOOLS)
def test_tool_requests_that_make_no_sense_are_400(fields, param):
    with pytest.raises(protocol.APIError) as e:
        tool_use(fields)
    assert (e.value.status, e.value.param) == (400, param), e.value.message


def test_tool_use():
    assert tool_use({}) == tool_use({"tool_choice": "none"}) == tool_use({"tools": []})
    assert tool_use({}) == protocol.ToolUse(None, "none")
    assert tool_use({"tools": [WEATHER]}) == protocol.ToolUse([WEATHER], "auto")  # OpenAI's default with tools
    assert tool_use({"tools": [WEATHER], "tool_choice": REQUIRED}).function == "get_weather"
    assert tool_use({"tools": [WEATHER], "tool_choice": "none"}, parser=None).choice == "none"
    with pytest.raises(protocol.APIError, match="does not render tools") as e:
        tool_use({"tools": [WEATHER]}, renders=False)
    assert e.value.param == "tools"
    with pytest.raises(protocol.APIError, match="needs a tool-call parser") as e:
        tool_use({"tools": [WEATHER]}, parser=None)
    assert e.value.param == "tool_choice"
    assert tool_use({"tools": [WEATHER], "tool_choice": "required"}, parser=None).forced
    assert not tool_use({"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}).parallel


# ---- end to end: SmolLM2 served with a tool-calling template ----------------------------------

MODEL = "smollm2"
# One sequence at a time, 8-token steps, one block-table width: few shapes to compile.
ENGINE = dict(page_size=16, max_model_len=496, min_context_bucket=512, num_pages=40, max_num_seqs=1,
              max_num_batched_tokens=8, prefill_chunk=8, decode_steps=1, attention_impl="xla")
EXAMPLE = [TURNS[0], TURNS[1], {"role": "user", "content": "Weather in London?"}]  # SmolLM2 follows the call
LONDON = {"name": "get_weather", "arguments": '{"city": "London"}'}
GREEDY = {"model": MODEL, "temperature": 0.0, "max_tokens": 40}


def with_template(smollm2, template: str):
    """SmolLM2 with another chat template (its own renders no tools)."""
    t = smollm2.tokenizer
    return dataclasses.replace(smollm2, tokenizer=Tokenizer(t.backend, eos_token_ids=t.eos_token_ids, add_bos=t.add_bos,
                                                            bos_token_id=t.bos_token_id, chat_template=template))


@pytest.fixture(scope="module")
def reference(smollm2) -> LLM:
    """An engine like the servers' (it shares their compiled steps), with the `<think>` template."""
    return LLM(with_template(smollm2, THINK_TEMPLATE), **ENGINE)


@pytest.fixture(scope="module")
def urls(smollm2):
    engines = [EngineLoop(LLM(with_template(smollm2, t), **ENGINE)).start() for t in (QWEN3_TEMPLATE, THINK_TEMPLATE)]
    apps = {"tools": create_app(engines[0], model_name=MODEL, tool_call_parser="hermes"),
            "plain": create_app(engines[0], model_name=MODEL),
            "think": create_app(engines[1], model_name=MODEL, reasoning_parser="qwen3")}
    try:
        with contextlib.ExitStack() as stack:
            yield {name: stack.enter_context(serving(app)) for name, app in apps.items()}
    finally:
        for engine in engines:
            engine.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def unset_dropped(value):
    """A dumped delta without its unset (None) fields."""
    if isinstance(value, dict):
        return {k: unset_dropped(v) for k, v in value.items() if v is not None}
    return [unset_dropped(v) for v in value] if isinstance(value, list) else value


def both(url: str, **request) -> tuple[openai.types.chat.ChatCompletion, tuple, tuple, list[dict]]:
    """The request answered whole and streamed: the response, its message and the stream's put
    together, each (reasoning, content, calls, finish reason), and the stream's deltas."""
    c = client(url)
    r = c.chat.completions.create(**GREEDY, **request)
    message = r.choices[0].message.model_dump()
    whole = (message.get("reasoning_content") or "", message["content"] or "",
             [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
              for c in message["tool_calls"] or []], r.choices[0].finish_reason)
    chunks = list(c.chat.completions.create(**GREEDY, **request, stream=True))
    deltas = [unset_dropped(ch.choices[0].delta.model_dump()) for ch in chunks[1:]]
    streamed = (*reassembled(deltas), chunks[-1].choices[0].finish_reason)
    return r, whole, streamed, [d for d in deltas if d]


def test_auto_tool_call_end_to_end(urls, smollm2):
    """SmolLM2 calls the tool by itself (auto): its `<tool_call>` parsed, streamed and not alike; the
    prompt is the template's rendering of the messages and tools. With tool_choice "none" the
    tools are rendered and nothing is parsed: the call is text."""
    r, whole, streamed, deltas = both(urls["tools"], messages=EXAMPLE, tools=[WEATHER])
    assert whole == streamed == ("", "", [LONDON], "tool_calls")
    assert r.choices[0].message.content is None and r.choices[0].message.tool_calls[0].id.startswith("call_")
    assert [list(d) for d in deltas] == [["tool_calls"]] * 2  # name and id, then the arguments
    tokenizer = with_template(smollm2, QWEN3_TEMPLATE).tokenizer
    assert r.usage.prompt_tokens == len(tokenizer.apply_chat_template(template_messages(EXAMPLE), tools=[WEATHER]))

    none = client(urls["tools"]).chat.completions.create(**GREEDY, messages=EXAMPLE, tools=[WEATHER],
                                                         tool_choice="none").choices[0]
    assert none.message.content == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "London"}}\n</tool_call>'
    assert none.message.tool_calls is None and none.finish_reason == "stop"


@pytest.mark.parametrize("choice", [{"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                                    {"tool_choice": "required", "parallel_tool_calls": False}])
def test_forced_tool_call_end_to_end(urls, choice):
    """A named function or "required": a grammar makes SmolLM2 call the tool without an example (on
    the app without a tool-call parser: the grammar's JSON is read, not a model's format)."""
    question = [{"role": "user", "content": "What is the weather in London?"}]
    _, whole, streamed, _ = both(urls["plain"], messages=question, tools=[WEATHER], **choice)
    assert whole == streamed == ("", "", [LONDON], "tool_calls")


def test_reasoning_end_to_end(urls, reference):
    """A template that opens `<think>` in the prompt: the output (no `</think>` from SmolLM2) is reasoning."""
    question = [{"role": "user", "content": "What is the capital of France?"}]
    _, whole, streamed, _ = both(urls["think"], messages=question, max_completion_tokens=12)
    expected = reference.chat(question, SamplingParams(temperature=0.0, max_tokens=12))
    assert whole == streamed == (expected.text, "", [], expected.finish_reason) and expected.text


def test_bad_tool_requests_are_400(urls):
    """Through the server: the request checks' 400s name their field; the plain app has no parser for "auto"."""
    ask = {"model": MODEL, "messages": EXAMPLE[:1], "max_tokens": 2}
    with httpx.Client(timeout=60) as http:
        for fields, param in BAD_TOOLS:
            r = http.post(f"{urls['tools']}/v1/chat/completions", json={**ask, **fields})
            assert (r.status_code, r.json()["error"]["param"]) == (400, param), r.json()
        r = http.post(f"{urls['plain']}/v1/chat/completions", json={**ask, "tools": [WEATHER]})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "tool_choice")
        r = http.post(f"{urls['plain']}/v1/chat/completions", json={**ask, "tools": [WEATHER], "tool_choice": "none"})
        assert r.status_code == 200


def test_special_tokens_kept_and_the_stop_token_left_out(smollm2, reference):
    """skip_special_tokens=False keeps special tokens in the text (harmony's markers), but the token
    that stops the output is not part of it (vLLM's)."""
    prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    greedy = dict(temperature=0.0, max_tokens=12)
    stopped, kept, past_eos = reference.generate([prompt] * 3, [
        SamplingParams(**greedy), SamplingParams(**greedy, skip_special_tokens=False),
        SamplingParams(**greedy, skip_special_tokens=False, ignore_eos=True)], use_tqdm=False)
    assert stopped.text == kept.text == "The capital of France is Paris." and kept.finish_reason == "stop"
    assert past_eos.text.startswith("The capital of France is Paris.<|im_end|>")
