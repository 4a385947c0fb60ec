"""A request's block keys, as the worker will see its prompt.

With a tokenizer (``--tokenizer``: a ``tokenizer.json`` or a model directory holding one), prompts are
tokenised like the worker does: chat messages are rendered with the model's chat template from
``tokenizer_config.json`` when present, so the router's keys equal those it re-derives from the workers'
KV events. Without one, the router hashes *character blocks* of a canonical rendering (4 characters per
token): only approximate (routing-decision) matching works then, not matching against engine events.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.hashing import block_hashes
from kvtier.router.signals import marker_offsets

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Prompt:
    """A chat prompt as the worker will see it: its token ids, its rendered text and (with a tokenizer) where
    each token ends in that text."""

    tokens: np.ndarray
    text: str
    token_ends: list[int] | None = None


class PromptHasher:
    def __init__(self, block_size: int, tokenizer_path: str | None = None) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self._tokenizer = None
        self._template = None
        self._special: dict[str, str] = {}
        if tokenizer_path:
            self._load(Path(tokenizer_path))

    @property
    def exact(self) -> bool:
        """True when keys come from real token ids (and can match engines' KV events)."""
        return self._tokenizer is not None

    def _load(self, path: Path) -> None:
        from tokenizers import Tokenizer

        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"no tokenizer file at {file}")
        self._tokenizer = Tokenizer.from_file(str(file))
        config = file.parent / "tokenizer_config.json"
        jinja = file.parent / "chat_template.jinja"  # where transformers >= 4.43 saves the template
        if config.is_file() or jinja.is_file():
            data = json.loads(config.read_text()) if config.is_file() else {}
            template = jinja.read_text() if jinja.is_file() else data.get("chat_template")
            if isinstance(template, list):  # named templates: take the default one
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
            if isinstance(template, str):
                self._template = chat_template_environment().from_string(template)
            for name in ("bos_token", "eos_token"):
                value = data.get(name)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    self._special[name] = value

    # --- tokens -----------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], tools: list | None = None) -> Prompt:
        text = self._render(messages, tools)
        if self._tokenizer is None:
            return Prompt(_code_points(text), text)
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return Prompt(np.asarray(encoding.ids, dtype=np.uint32), text, [end for _, end in encoding.offsets])

    def chat_tokens(self, messages: list[dict], tools: list | None = None) -> np.ndarray:
        return self.chat_prompt(messages, tools).tokens

    def marker_offsets(self, prompt: Prompt, marked_chat: dict, n_marks: int) -> list[int] | None:
        """The token offset of each of ``n_marks`` markers in ``marked_chat`` (``prompt``'s chat with markers in
        its text, see :mod:`kvtier.router.signals`); None without a tokenizer (offsets in the worker's tokens
        are unknown) or when the markers do not come out where they went in."""
        if prompt.token_ends is None:
            return None
        marked = self._render(marked_chat.get("messages") or [], marked_chat.get("tools"))
        return marker_offsets(marked, prompt.text, prompt.token_ends, n_marks)

    def completion_tokens(self, prompt: Any) -> np.ndarray:
        """``prompt`` as the completions API takes it: text, token ids, or a batch (routed by its first)."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, str)):
            prompt = prompt[0]
        if isinstance(prompt, list):
            if self._tokenizer is None:
                return _code_points(" ".join(map(str, prompt)))
            return np.asarray(prompt, dtype=np.uint32)
        if self._tokenizer is None:
            return _code_points(str(prompt))
        return np.asarray(self._tokenizer.encode(str(prompt), add_special_tokens=True).ids, dtype=np.uint32)

    def hashes(self, tokens: Sequence[int] | np.ndarray, salt: str | None = None) -> list[int]:
        size = self.block_size if self.exact else self.block_size * CHARS_PER_TOKEN
        return block_hashes(tokens, size, salt)

    # --- rendering ----------------------------------------------------------------------------------------
    def _render(self, messages: list[dict], tools: list | None) -> str:
        if self._template is not None:
            try:
                return self._template.render(messages=messages, tools=tools, add_generation_prompt=True, **self._special)
            except Exception as exc:  # noqa: BLE001 - templates raise anything (raise_exception, type errors)
                log.debug("chat template failed (%s); using the canonical rendering", exc)
        return canonical_rendering(messages, tools)


def chat_template_environment():
    """A Jinja environment that renders chat templates as Hugging Face ``apply_chat_template`` does (what vLLM
    and SGLang use), so the router's tokens equal the worker's: ``tojson`` without Jinja's HTML escaping and
    key sorting, loop controls, ``raise_exception``."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def canonical_rendering(messages: list[dict], tools: list | None) -> str:
    """A stable text for a chat: equal histories give equal text, and an appended turn only appends."""
    parts = [_stable(tools) + "\n"] if tools else []
    for msg in messages:
        parts.append(f"<|{msg.get('role')}|>\n")
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        if isinstance(reasoning, str):
            parts.append(f"<think>{reasoning}</think>")
        content = msg.get("content")
        if isinstance(content, list):
            parts.extend(p["text"] if isinstance(p, dict) and isinstance(p.get("text"), str) else _stable(p) for p in content)
        elif content is not None:
            parts.append(content if isinstance(content, str) else _stable(content))
        calls = msg.get("tool_calls")
        if calls:
            parts.extend(_stable(c.get("function") if isinstance(c, dict) else c) for c in calls) if isinstance(calls, list) \
                else parts.append(_stable(calls))
        parts.append("\n")
    return "".join(parts)


def _stable(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
