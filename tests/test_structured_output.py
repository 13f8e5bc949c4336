"""Structured outputs (engine/structured_output.py; the server's fields in server/protocol.py) on a
tiny random-weight model that speaks SmolLM2's tokenizer. Its garbage at temperature 1 is what a
grammar must tame: whatever the weights prefer, every output must parse and validate. The same
check without the mask fails (the negative control), so it would catch a mask not applied."""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import openai
import pytest
from flax import nnx

from engine import SamplingParams, StructuredOutputs
from engine.constraints import ConstraintError, allow_all, is_allowed
from engine.structured_output import GrammarCompiler, compiler_for, constraint as grammar
from models import LoadedModel, get_preset
from models.loaded_model import embedded_weights_path
from models.loading.gguf import GGUFCheckpoint
from models.loading.tokenizer import tokenizer_from_gguf
from models.registry import random_model
from server import protocol
from server.app import create_app, serving
from server.engine_loop import EngineLoop
from server.metrics import ServerMetrics
from tests.engine_helpers import tiny_llm

SEEDS = (0, 1, 2)
MAX_NEW = 120  # above the longest output the schemas below allow
REGEXES = (r"[a-z]{1,5}@[a-z]{2,4}\.(com|org)", r"-?[0-9]{1,4}(\.[0-9]{1,2})?",
           r"(yes|no|maybe)( [A-Z][a-z]{0,3}){0,2}")
CHOICES = ("red", "green", "blue channel", 'say "hi"')


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    """tiny-llama's shape, random weights, SmolLM2's tokenizer (and vocabulary)."""
    tokenizer = tokenizer_from_gguf(GGUFCheckpoint(embedded_weights_path("smollm2-135m-instruct")).fields)
    config = dataclasses.replace(get_preset("tiny-llama"), vocab_size=tokenizer.vocab_size)
    return LoadedModel(config, random_model(config, jnp.float32, 0), tokenizer, jnp.float32)


def random_schema(rng: random.Random) -> dict:
    """A small object schema whose every instance is short (bounded strings, ranges and arrays; no
    extra properties): a garbage model still ends it within MAX_NEW tokens."""
    kinds = {
        "string": lambda: {"type": "string", "maxLength": rng.randint(1, 6)},
        "integer": lambda: {"type": "integer", "minimum": rng.randint(-50, 0), "maximum": rng.randint(1, 500)},
        "boolean": lambda: {"type": "boolean"},
        "enum": lambda: {"enum": rng.sample(["red", "green", "blue", 1, 2, True, None], rng.randint(1, 4))},
        "array": lambda: {"type": "array", "maxItems": rng.randint(0, 3), "minItems": 0,
                          "items": rng.choice([{"type": "boolean"}, {"type": "integer", "minimum": 0, "maximum": 9},
                                               {"enum": ["a", "b"]}])},
    }
    props = {f"p{i}": kinds[rng.choice(sorted(kinds))]() for i in range(rng.randint(1, 4))}
    required = rng.sample(sorted(props), rng.randint(0, len(props)))
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


SCHEMAS = [random_schema(random.Random(i)) for i in range(20)]


def matches(spec: StructuredOutputs, text: str) -> bool:
    """Whether `text` is what `spec` asks for (JSON parsed and validated against its schema)."""
    if spec.regex is not None:
        return re.fullmatch(spec.regex, text) is not None
    if spec.choice is not None:
        return text in spec.choice
    try:
        jsonschema.validate(json.loads(text), json.loads(spec.json))
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """Each row's logits after its last token (rows right-padded: one compile)."""
    net = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, _ = net(tokens, positions)
    return net.logits(hidden[jnp.arange(tokens.shape[0]), lengths - 1][:, None])[:, 0]


def host_generate(model: LoadedModel, specs: list[StructuredOutputs], seeds: tuple[int, ...], *,
                  apply_mask: bool = True) -> list[tuple[StructuredOutputs, str]]:
    """Sample every (spec, seed) at temperature 1 on the host, the constraint's mask applied to the
    logits (or, apply_mask=False, computed and ignored): the constraint tested apart from the engine."""
    vocab, tokenizer = model.config.vocab_size, model.tokenizer
    rows = [(spec, seed) for spec in specs for seed in seeds]
    constraints = [grammar(spec, tokenizer, vocab) for spec, _ in rows]
    rngs = [np.random.default_rng(seed) for _, seed in rows]
    prompt = tokenizer.encode("Answer:")
    outputs: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    graphdef, state = nnx.split(model.model)
    for _ in range(MAX_NEW):
        batch = np.zeros((len(rows), len(prompt) + MAX_NEW), np.int32)
        for i, out in enumerate(outputs):
            batch[i, :len(prompt) + len(out)] = prompt + out
        lengths = np.array([len(prompt) + len(out) for out in outputs], np.int32)
        logits = np.asarray(_last_logits(graphdef, state, batch, lengths), np.float64)
        for i in (i for i in range(len(rows)) if not done[i]):
            token = _sample(logits[i], constraints[i], rngs[i], apply_mask)
            done[i] = token in tokenizer.eos_token_ids
            if not done[i]:
                if apply_mask:
                    constraints[i].accept(token)
                outputs[i].append(token)
        if all(done):
            break
    return [(spec, tokenizer.decode(out)) for (spec, _), out in zip(rows, outputs)]


def _sample(logits: np.ndarray, constraint, rng: np.random.Generator, apply_mask: bool) -> int:
    """One token at temperature 1 under the constraint's mask (when applied)."""
    words = allow_all(1, len(logits))[0]
    constraint.fill_mask(words)
    if apply_mask:
        allowed = np.unpackbits(words.view(np.uint8), bitorder="little")[:len(logits)].astype(bool)
        logits = np.where(allowed, logits, -np.inf)
    p = np.exp(logits - logits.max())
    return int(rng.choice(len(logits), p=p / p.sum()))


# ---- the constraint, on the host -------------------------------------------------------------


def json_specs() -> list[StructuredOutputs]:
    """The random schemas, compact: flexible whitespace lets garbage weights pad forever."""
    return [StructuredOutputs(json=schema, disable_any_whitespace=True) for schema in SCHEMAS]


def test_random_schemas_always_validate_on_the_host(model):
    """20 random schemas x 3 seeds at temperature 1: every output parses and validates."""
    results = host_generate(model, json_specs(), SEEDS)
    bad = [(json.loads(spec.json), text) for spec, text in results if not matches(spec, text)]
    assert not bad, bad[:3]
    assert len({text for _, text in results}) > len(SCHEMAS)  # sampled, not one greedy answer per schema


def test_regex_and_choice_always_match_on_the_host(model):
    """Every regex output fully matches; every choice output is one of the choices."""
    specs = [StructuredOutputs(regex=r) for r in REGEXES] + [StructuredOutputs(choice=CHOICES)]
    results = host_generate(model, specs, SEEDS)
    bad = [(spec, text) for spec, text in results if not matches(spec, text)]
    assert not bad, bad


def test_the_check_fails_without_the_mask(model):
    """The negative control: the same sampling with the mask computed but not applied."""
    specs = json_specs()[:4] + [StructuredOutputs(regex=REGEXES[0]), StructuredOutputs(choice=CHOICES)]
    results = host_generate(model, specs, SEEDS[:1], apply_mask=False)
    assert not any(matches(spec, text) for spec, text in results), results


# ---- through the engine --------------------------------------------------------------------------


def engine_generate(llm, specs: list[StructuredOutputs], seeds: tuple[int, ...]) -> list:
    """Every (spec, seed) through LLM.generate at temperature 1; the outputs in that order."""
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=MAX_NEW, structured_outputs=spec)
              for spec in specs for seed in seeds]
    return llm.generate(["Answer:"] * len(params), params, use_tqdm=False)


def check_outputs(specs: list[StructuredOutputs], seeds: tuple[int, ...], outputs: list) -> None:
    """Every output matches its spec and ended at EOS once the grammar was complete."""
    rows = [spec for spec in specs for _ in seeds]
    bad = [(spec, o.text, o.finish_reason, o.error) for spec, o in zip(rows, outputs)
           if not matches(spec, o.text) or o.finish_reason != "stop"]
    assert not bad, bad[:3]


def test_random_schemas_regexes_and_choices_always_match_through_the_engine(model):
    """The host tests' specs through LLM.generate (the engine's packed mask and accept path)."""
    specs = json_specs() + [StructuredOutputs(regex=r) for r in REGEXES] + [StructuredOutputs(choice=CHOICES)]
    check_outputs(specs, SEEDS, engine_generate(tiny_llm(model, max_model_len=256), specs, SEEDS))


def test_speculative_drafts_keep_outputs_valid(model):
    """n-gram drafts are walked through the grammar and rolled back before the verified tokens are kept."""
    specs = json_specs()[:6] + [StructuredOutputs(choice=CHOICES)]
    llm = tiny_llm(model, max_model_len=256, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    outputs = engine_generate(llm, specs, SEEDS[:2])
    check_outputs(specs, SEEDS[:2], outputs)
    assert sum(o.metrics.speculation.proposed for o in outputs) > 0


def test_a_grammar_complete_before_min_tokens_ends_that_request_alone(model):
    """min_tokens bans EOS where a complete grammar allows only EOS: that request ends with an error
    naming min_tokens; a request beside it finishes normally."""
    llm = tiny_llm(model, max_model_len=256)
    choice = StructuredOutputs(choice=CHOICES)
    short, fine = llm.generate(["Answer:"] * 2, [
        SamplingParams(temperature=1.0, seed=1, max_tokens=MAX_NEW, min_tokens=MAX_NEW - 1, structured_outputs=choice),
        SamplingParams(temperature=1.0, seed=1, max_tokens=MAX_NEW, structured_outputs=choice)], use_tqdm=False)
    assert short.finish_reason == "error" and "min_tokens" in short.error, (short.finish_reason, short.error)
    assert fine.finish_reason == "stop" and fine.text in CHOICES


def test_a_spec_llguidance_refuses_is_refused_before_any_prompt_runs(model):
    """generate validates every prompt's spec before it enqueues any (none is left running)."""
    llm = tiny_llm(model, max_model_len=256)
    good = SamplingParams(structured_outputs=StructuredOutputs(json=True))
    bad = SamplingParams(structured_outputs=StructuredOutputs(regex="(unclosed"))
    with pytest.raises(ValueError, match="prompt 1: invalid regex"):
        llm.generate(["a", "b"], [good, bad], use_tqdm=False)
    assert not llm.has_unfinished()


# ---- compiling ---------------------------------------------------------------------------------


def test_compile_cache_hits_on_a_repeated_schema(model):
    """One llguidance tokenizer per tokenizer; a schema seen again (as dict or text) is a cache hit."""
    compiler = compiler_for(model.tokenizer, model.config.vocab_size)
    assert compiler is compiler_for(model.tokenizer, model.config.vocab_size)  # one llguidance tokenizer
    schema = {"type": "object", "properties": {"cached": {"type": "integer"}}}
    before = compiler.compile.cache_info()
    first = grammar(StructuredOutputs(json=schema), model.tokenizer, model.config.vocab_size)
    second = grammar(StructuredOutputs(json=json.dumps(schema)), model.tokenizer, model.config.vocab_size)
    after = compiler.compile.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    first.accept(model.tokenizer.encode('{"')[0])  # copies: advancing one leaves the other at the start
    words = allow_all(1, model.config.vocab_size)[0]
    second.fill_mask(words)
    assert is_allowed(words, model.tokenizer.encode("{")[0])


@pytest.mark.parametrize("spec,message", [
    (StructuredOutputs(json={"type": "nonsense"}), "invalid json: .*nonsense"),
    (StructuredOutputs(json={"$ref": "#/nowhere"}), "invalid json: .*nowhere"),
    (StructuredOutputs(regex="a(b"), "invalid regex: .*unclosed group"),
    (StructuredOutputs(grammar="start: undefined_rule"), "invalid grammar: .*undefined_rule"),
])
def test_specs_llguidance_refuses_are_value_errors(model, spec, message):
    """A schema, regex or grammar llguidance refuses is a ValueError naming the kind and the problem."""
    with pytest.raises(ValueError, match="(?s)" + message):
        grammar(spec, model.tokenizer, model.config.vocab_size)


@pytest.mark.parametrize("kwargs,message", [
    ({}, "exactly one of json, regex, choice, grammar; got none"),
    ({"json": True, "regex": "a"}, "got json, regex"),
    ({"json": False}, "json must be a JSON schema object or True"),
    ({"json": "{not json"}, "the schema is not valid JSON"),
    ({"json": [1]}, "json must be a JSON schema object"),
    ({"choice": []}, "choice must be a non-empty list"),
    ({"choice": "ab"}, "choice must be a non-empty list"),
    ({"choice": ["a", 1]}, "choice must hold str only"),
    ({"regex": ""}, "regex must be a non-empty str"),
    ({"grammar": 3}, "grammar must be a non-empty str"),
    ({"regex": "a", "disable_any_whitespace": 1}, "disable_any_whitespace must be a bool"),
])
def test_bad_specs_are_refused_on_construction(kwargs, message):
    """StructuredOutputs checks kinds and types before any compile."""
    with pytest.raises(ValueError, match=re.escape(message)):
        StructuredOutputs(**kwargs)


def test_sampling_params_take_only_a_spec():
    """SamplingParams.structured_outputs is a StructuredOutputs (hashable, choice as a tuple) or None."""
    spec = StructuredOutputs(choice=["a", "b"])
    assert SamplingParams(structured_outputs=spec).structured_outputs == spec
    assert spec.choice == ("a", "b") and hash(spec) == hash(StructuredOutputs(choice=("a", "b")))
    with pytest.raises(ValueError, match="structured_outputs must be StructuredOutputs"):
        SamplingParams(structured_outputs={"choice": ["a"]})


def test_no_spec_no_constraint_and_no_tokenizer_is_a_value_error():
    """No spec builds no constraint; a spec on a model without a tokenizer is refused."""
    assert grammar(None, None, 256) is None
    with pytest.raises(ValueError, match="need the model's tokenizer"):
        grammar(StructuredOutputs(json=True), None, 256)


# ---- the constraint's protocol -------------------------------------------------------------------


def walk(model: LoadedModel, spec: StructuredOutputs, text: str):
    """A fresh constraint for `spec` advanced over `text`'s tokens, each checked against the mask
    first (None: the mask refused one)."""
    constraint = grammar(spec, model.tokenizer, model.config.vocab_size)
    for token in model.tokenizer.encode(text):
        words = allow_all(1, model.config.vocab_size)[0]
        constraint.fill_mask(words)
        if not is_allowed(words, token):
            return None
        constraint.accept(token)
    return constraint


def allowed_tokens(model: LoadedModel, constraint) -> set[int]:
    """Every token the constraint allows next."""
    words = allow_all(1, model.config.vocab_size)[0]
    constraint.fill_mask(words)
    return set(np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[:model.config.vocab_size]))


def test_a_finished_grammar_allows_eos_alone(model):
    """A complete JSON value allows EOS only; a complete regex that may go on allows EOS and more."""
    eos = set(model.tokenizer.eos_token_ids)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    constraint = walk(model, StructuredOutputs(json=schema, disable_any_whitespace=True), '{"a":12')
    assert not constraint.is_finished() and not allowed_tokens(model, constraint) & eos
    constraint.accept(model.tokenizer.encode("}")[0])
    assert constraint.is_finished() and allowed_tokens(model, constraint) == eos
    prefix = walk(model, StructuredOutputs(regex="a+"), "a")  # complete, yet more may follow
    assert not prefix.is_finished() and eos < allowed_tokens(model, prefix)


def test_rollback_undoes_accepts_eos_after_the_stop_included(model):
    """Speculative drafts are walked and rolled back; an EOS kept after the grammar stopped is not
    recorded by llguidance, so rolling it back must not undo the token before it."""
    spec = StructuredOutputs(choice=["yes", "no"])
    constraint = walk(model, spec, "yes")
    [eos] = model.tokenizer.eos_token_ids
    constraint.accept(eos)
    constraint.rollback(1)
    assert constraint.is_finished()  # still after "yes"
    constraint.rollback(len(model.tokenizer.encode("yes")))
    assert allowed_tokens(model, constraint) == allowed_tokens(model, grammar(
        spec, model.tokenizer, model.config.vocab_size))


def test_a_refused_token_is_a_constraint_error_and_changes_nothing(model):
    """accept() of a token the grammar refuses raises and leaves the matcher as it was."""
    constraint = walk(model, StructuredOutputs(choice=["yes", "no"]), "")
    before = allowed_tokens(model, constraint)
    with pytest.raises(ConstraintError, match="does not match the grammar"):
        constraint.accept(model.tokenizer.encode("maybe")[0])
    assert allowed_tokens(model, constraint) == before


def test_no_token_left_in_the_models_vocabulary_is_a_constraint_error(model):
    """A model whose logits stop before the only tokens the grammar allows (here: 17 of them)."""
    constraint = grammar(StructuredOutputs(regex="abc"), model.tokenizer, 17)
    with pytest.raises(ConstraintError, match="allows no token"):
        constraint.fill_mask(allow_all(1, 17)[0])


def test_gbnf_grammars_are_accepted(model):
    """A GBNF grammar (llama.cpp's) is converted to llguidance's Lark."""
    spec = StructuredOutputs(grammar='root ::= "yes" | "no" | digits\ndigits ::= [0-9]+')
    assert walk(model, spec, "no").is_finished()
    assert not walk(model, spec, "12").is_finished()


def test_any_json_object_and_whitespace_policies(model):
    """json=True is any object; flexible whitespace by default, none with disable_any_whitespace."""
    assert walk(model, StructuredOutputs(json=True), '{ "k" : [1, {"x": null}] }').is_finished()
    assert walk(model, StructuredOutputs(json=True, disable_any_whitespace=True), '{"k":[1,{"x":null}]}')
    assert walk(model, StructuredOutputs(json=True, disable_any_whitespace=True), '{ "k": 1}') is None
    assert walk(model, StructuredOutputs(json=True), '[1]') is None  # an object, not any JSON value


def test_one_compiler_per_tokenizer_and_vocabulary(model):
    """A tokenizer serving models of two vocabulary sizes gets a compiler for each."""
    assert isinstance(compiler_for(model.tokenizer, 17), GrammarCompiler)
    assert compiler_for(model.tokenizer, 17) is not compiler_for(model.tokenizer, model.config.vocab_size)


# ---- the server's fields -------------------------------------------------------------------------


def chat_request(**fields) -> protocol.ChatCompletionRequest:
    """A chat request body with these fields, parsed as the server parses it."""
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return protocol.parse(protocol.ChatCompletionRequest, json.dumps(body).encode())


def completion_request(**fields) -> protocol.CompletionRequest:
    """A completion request body with these fields, parsed as the server parses it."""
    return protocol.parse(protocol.CompletionRequest, json.dumps({"prompt": "hi", **fields}).encode())


SCHEMA = {"type": "object", "properties": {"x": {"type": "integer"}}}


@pytest.mark.parametrize("fields,expected", [
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredOutputs(json=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}},
     StructuredOutputs(json=SCHEMA)),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
     StructuredOutputs(json=SCHEMA, disable_any_whitespace=True)),
    ({"structured_outputs": {"json_object": True}}, StructuredOutputs(json=True)),
    ({"structured_outputs": {"regex": "a+"}}, StructuredOutputs(regex="a+")),
    ({"structured_outputs": {"choice": ["a", "b"]}}, StructuredOutputs(choice=["a", "b"])),
    ({"structured_outputs": {"grammar": "start: /a+/"}}, StructuredOutputs(grammar="start: /a+/")),
    ({"guided_json": json.dumps(SCHEMA)}, StructuredOutputs(json=SCHEMA)),
    ({"guided_regex": "a+"}, StructuredOutputs(regex="a+")),
    ({"guided_choice": ["a"], "structured_outputs": {"disable_any_whitespace": True}},
     StructuredOutputs(choice=["a"], disable_any_whitespace=True)),
    ({"guided_grammar": 'root ::= "a"'}, StructuredOutputs(grammar='root ::= "a"')),
])
def test_request_fields_become_the_spec(fields, expected):
    """Each server field (and vLLM's options) maps onto the same StructuredOutputs, for both endpoints."""
    for request in (chat_request(**fields), completion_request(**fields)):
        assert protocol.sampling_params(request, 8).structured_outputs == expected


@pytest.mark.parametrize("fields,param,message", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex",
     "guided_regex and response_format both constrain the output"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
     "structured_outputs.choice and structured_outputs.regex both"),
    ({"guided_json": SCHEMA, "guided_choice": ["a"]}, "guided_choice", "guided_choice and guided_json both"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema.schema"),
    ({"guided_choice": []}, "guided_choice", "guided_choice: choice must be a non-empty list"),
    ({"guided_json": "{oops"}, "guided_json", "guided_json: json: the schema is not valid JSON"),
])
def test_contradictory_or_malformed_fields_are_400s_naming_them(fields, param, message):
    """Two constraining fields, or a malformed one, are a 400 naming the field."""
    with pytest.raises(protocol.APIError) as e:
        protocol.sampling_params(chat_request(**fields), 8)
    assert (e.value.status, e.value.param) == (400, param) and message in e.value.message, e.value.message


@pytest.mark.parametrize("fields,param", [
    ({"response_format": {"type": "structural_tag"}}, "response_format"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs"),
])
def test_unsupported_structured_fields_are_400s(fields, param):
    """response_format types and vLLM options this server lacks are refused by name."""
    with pytest.raises(protocol.APIError) as e:
        chat_request(**fields)
    assert (e.value.status, e.value.param) == (400, param)


# ---- over HTTP, through the openai client ---------------------------------------------------------


@pytest.fixture(scope="module")
def url(model):
    """The tiny model served (its tokenizer brings SmolLM2's chat template)."""
    llm = tiny_llm(model, max_model_len=256)
    engine = EngineLoop(llm, ServerMetrics("tiny", llm.config.num_pages)).start()
    try:
        with serving(create_app(engine, model_name="tiny")) as served:
            yield served
    finally:
        engine.stop()


def test_response_format_json_schema_through_the_openai_client(url):
    """OpenAI's response_format (and a streamed guided_json) through the real client: valid JSON."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    schema = SCHEMAS[3]
    for seed in SEEDS:
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "JSON please"}], seed=seed, max_tokens=MAX_NEW,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                                    "strict": True}},
            extra_body={"structured_outputs": {"disable_any_whitespace": True}})
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
        assert reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "JSON please"}], seed=0, max_tokens=MAX_NEW, stream=True,
        extra_body={"guided_json": schema, "structured_outputs": {"disable_any_whitespace": True}})
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), schema)


def test_guided_choice_and_regex_through_the_openai_client(url):
    """guided_choice over a batch of prompts and a structured_outputs regex, through extra_body."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    completion = client.completions.create(model="tiny", prompt=["Pick:", "Choose:"], seed=1, max_tokens=MAX_NEW,
                                           extra_body={"guided_choice": list(CHOICES)})
    assert all(c.text in CHOICES and c.finish_reason == "stop" for c in completion.choices), completion
    completion = client.completions.create(model="tiny", prompt="Mail:", seed=2, max_tokens=MAX_NEW,
                                           extra_body={"structured_outputs": {"regex": REGEXES[0]}})
    assert re.fullmatch(REGEXES[0], completion.choices[0].text), completion


@pytest.mark.parametrize("extra,param,message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "response_format.json_schema.schema: invalid json"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "guided_regex: invalid regex"),
    ({"guided_grammar": "start: nowhere"}, "guided_grammar", "guided_grammar: invalid grammar"),
    ({"guided_choice": ["a"], "guided_json": {"type": "object"}}, "guided_choice", "both constrain the output"),
])
def test_refused_specs_are_400s_naming_their_field(url, extra, param, message):
    """A spec llguidance refuses is a 400 naming its field, before the engine sees it."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       extra_body=extra)
    error = e.value.body
    assert error["param"] == param and message in error["message"], error
