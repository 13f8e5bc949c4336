"""Tokenizer (a `tokenizers` object) plus the checkpoint's chat template, rendered with jinja2."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import jinja2.sandbox
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


class Tokenizer:
    """encode/decode text and render chat messages into prompt token ids."""

    def __init__(self, backend: HFTokenizer, *, eos_token_ids: Sequence[int], bos_token_id: int | None,
                 add_bos: bool, chat_template: str | None):
        self.backend = backend
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> str:
        """The chat template rendered as transformers' apply_chat_template renders it (its `tojson`,
        `strftime_now`, loop controls; `tools` as given: OpenAI's {"type": "function", ...} dicts)."""
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template")
        token = lambda i: None if i is None else self.backend.id_to_token(i)  # noqa: E731
        return _template_environment().from_string(self.chat_template).render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
            bos_token=token(self.bos_token_id) or "", eos_token=token(self.eos_token_ids[0]) or "")

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Prompt ids for `messages` with the generation prompt appended (as HF tokenize=True)."""
        return self.encode(self.render_chat(messages, tools=tools), add_special_tokens=False)

    def template_reads(self, name: str) -> bool:
        """Whether the chat template reads the variable `name` (e.g. `tools`: it can render them)."""
        if not self.chat_template:
            return False
        return name in jinja2.meta.find_undeclared_variables(_template_environment().parse(self.chat_template))

    def save(self, directory: Path) -> None:
        self.backend.save(str(directory / "tokenizer.json"))
        meta = {"eos_token_ids": list(self.eos_token_ids), "bos_token_id": self.bos_token_id,
                "add_bos": self.add_bos, "chat_template": self.chat_template}
        (directory / "tokenizer_meta.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path) -> "Tokenizer":
        """The inverse of `save` (orbax checkpoints carry their tokenizer this way)."""
        meta = json.loads((directory / "tokenizer_meta.json").read_text())
        return cls(HFTokenizer.from_file(str(directory / "tokenizer.json")), **meta)


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' `tojson` filter: plain json.dumps, keys in order (jinja2's own sorts them and
    escapes HTML characters, which would render tools unlike the model was trained on)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 (transformers' name for it)
    """transformers' `strftime_now` global: today's date in the template's format (Llama 3.x's system prompt)."""
    return datetime.datetime.now().strftime(format)


def _template_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """A sandboxed jinja2 environment with transformers' chat-template additions."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_template_error, strftime_now=_strftime_now)
    return env


def tokenizer_from_gguf(fields: dict[str, Any]) -> Tokenizer:
    """Build the byte-level BPE that a GGUF embeds (`tokenizer.ggml.model == "gpt2"`)."""
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {model!r} (supported: gpt2 byte-level BPE)")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    backend = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if fields.get("tokenizer.ggml.pre") == "smollm":  # StarCoder-style: every digit on its own
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == _GGUF_USER_DEFINED])
    eos = [fields["tokenizer.ggml.eos_token_id"]]
    if "tokenizer.ggml.eot_token_id" in fields and fields["tokenizer.ggml.eot_token_id"] not in eos:
        eos.append(fields["tokenizer.ggml.eot_token_id"])
    return Tokenizer(backend, eos_token_ids=eos, bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
                     add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
                     chat_template=fields.get("tokenizer.chat_template"))


def _token_text(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def tokenizer_from_hf_dir(directory: Path, eos_from_config: Sequence[int]) -> Tokenizer | None:
    """`tokenizer.json` + `tokenizer_config.json` of an HF checkpoint (None if there is none)."""
    if not (directory / "tokenizer.json").exists():
        return None
    backend = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
    eos_ids = list(eos_from_config) or ([backend.token_to_id(eos)] if eos else [])
    template = cfg.get("chat_template")
    if template is None and (directory / "chat_template.jinja").exists():
        template = (directory / "chat_template.jinja").read_text()
    return Tokenizer(backend, eos_token_ids=eos_ids, bos_token_id=backend.token_to_id(bos) if bos else None,
                     add_bos=bool(cfg.get("add_bos_token", False)), chat_template=template)
