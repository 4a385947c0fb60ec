"""Anthropic Messages and OpenAI Responses <-> OpenAI chat completions (what vLLM and SGLang workers serve).

Why care about order: an agent re-sends its whole history every call. If thinking, text and tool calls of
an assistant turn were regrouped, the rendered prompt would change between calls and the worker's cached
prefix would be lost. So an assistant turn becomes as many consecutive chat messages as it takes to keep
its blocks in their original order, and tool-call arguments go back to the worker as the exact string the
model wrote, not re-serialised JSON. Anthropic clients send tool input back as parsed JSON, so the router
carries the model's string inside the ``tool_use`` id it hands out (compressed, bounded): replay is exact
without router state, across router restarts and replicas. Responses clients send the string itself.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

import xxhash


class BadRequest(ValueError):
    """The client's request is malformed; the message says what is wrong (answered with HTTP 400)."""


# --- small validators ------------------------------------------------------------------------------------
def need(cond: bool, message: str) -> None:
    if not cond:
        raise BadRequest(message)


def field_of(obj: dict, name: str, types: type | tuple[type, ...], where: str, required: bool = True) -> Any:
    value = obj.get(name)
    if value is None:
        need(not required, f"{where}.{name} is required")
        return None
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)))
    need(ok, f"{where}.{name} must be {_type_names(types)}, got {type(value).__name__}")
    return value


def _type_names(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _number(obj: dict, name: str, where: str) -> float | None:
    return field_of(obj, name, (int, float), where, required=False)


def worker_body(kind: str, body: dict, stream: bool) -> dict:
    """What the worker gets, before the router adds hints and salt: chat and completions bodies as sent, Anthropic
    and Responses ones translated to chat (streams ask for usage: on every chunk for Anthropic's message_start, at
    the end for Responses). ``nvext`` is Dynamo's and read by the router; workers never see it."""
    if kind not in ("messages", "responses"):
        return {k: v for k, v in body.items() if k != "nvext"}
    chat = anthropic_to_chat(body) if kind == "messages" else responses_to_chat(body)
    chat["stream"] = stream
    if stream:
        chat["stream_options"] = {"include_usage": True, "continuous_usage_stats": kind == "messages"}
    return chat


# --- blocks: the common shape of an assistant turn -------------------------------------------------------
@dataclass
class Block:
    kind: str            # "thinking" | "text" | "tool"
    text: str = ""       # thinking or text; for a tool: its arguments string
    id: str = ""
    name: str = ""


TOOL_ID_PREFIX = "toolu_kv1"       # a tool_use id that carries the model's argument string
_TOOL_ID_HEAD = len(TOOL_ID_PREFIX) + 16
MAX_TOOL_ID_PAYLOAD = 4096         # base64url characters; longer arguments get a plain id (replayed re-serialised)
MAX_TOOL_ARGS_BYTES = 1 << 20      # a decompressed payload is never larger (no zip bombs)


def encode_tool_id(arguments: str) -> str:
    """A fresh ``tool_use`` id carrying ``arguments`` (zlib + base64url: the id alphabet Anthropic allows)."""
    head = f"{TOOL_ID_PREFIX}{secrets.token_hex(8)}"
    payload = base64.urlsafe_b64encode(zlib.compress(arguments.encode(), 9)).rstrip(b"=").decode()
    return head + payload if len(payload) <= MAX_TOOL_ID_PAYLOAD else head


def decode_tool_id(call_id: str) -> tuple[str, str | None]:
    """(the id the worker sees, the argument string it carries or None). The worker gets the short head so a
    chat template that renders ids renders the same text for the call and for its result."""
    if not call_id.startswith(TOOL_ID_PREFIX) or len(call_id) <= _TOOL_ID_HEAD:
        return call_id, None
    payload = call_id[_TOOL_ID_HEAD:]
    try:
        packed = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, MAX_TOOL_ARGS_BYTES)
        if inflater.unconsumed_tail or not inflater.eof:
            return call_id[:_TOOL_ID_HEAD], None
        return call_id[:_TOOL_ID_HEAD], raw.decode()
    except (ValueError, zlib.error):  # bad base64 (binascii.Error), bad UTF-8, bad zlib
        return call_id[:_TOOL_ID_HEAD], None


def replay_arguments(call_id: str, value: Any) -> tuple[str, str]:
    """(worker id, argument string) for a tool call a client sends back with parsed ``value``: the model's own
    string when the id carries one that parses to what the client sent (a partial string when it was cut
    off by max_tokens, which the client got as ``{}``), else ``value`` serialised."""
    worker_id, raw = decode_tool_id(call_id)
    if raw is not None and _parse_args(raw) == value:
        return worker_id, raw
    return worker_id, json.dumps(value, ensure_ascii=False)


def assistant_messages(blocks: list[Block]) -> list[dict]:
    """Chat messages for one assistant turn, split wherever one message could not keep the block order
    (chat messages hold reasoning, then text, then tool calls)."""
    out: list[dict] = []
    rank = {"thinking": 0, "text": 1, "tool": 2}
    current: dict | None = None
    last_rank = -1
    for block in blocks:
        r = rank[block.kind]
        if current is None or r < last_rank:
            current = {"role": "assistant", "content": None}
            out.append(current)
        last_rank = r
        if block.kind == "thinking":
            current["reasoning_content"] = current.get("reasoning_content", "") + block.text
        elif block.kind == "text":
            current["content"] = (current["content"] or "") + block.text
        else:
            current.setdefault("tool_calls", []).append(
                {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": block.text}})
    return out


def blocks_from_chat_message(message: dict) -> list[Block]:
    blocks: list[Block] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        blocks.append(Block("thinking", reasoning))
    content = message.get("content")
    if isinstance(content, str) and content:
        blocks.append(Block("text", content))
    for call in _dicts(message.get("tool_calls")):
        fn = call.get("function") if isinstance(call.get("function"), dict) else {}
        blocks.append(Block("tool", fn.get("arguments") or "", call.get("id") or _new_id("call"), fn.get("name") or ""))
    return blocks


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _parse_args(arguments: str) -> dict:
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _copy_sampling(src: dict, dst: dict, where: str) -> None:
    for name in ("temperature", "top_p"):
        value = _number(src, name, where)
        if value is not None:
            dst[name] = value


# --- Anthropic Messages ----------------------------------------------------------------------------------
ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use"}


def _anthropic_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    need(isinstance(content, list), f"{where} must be a string or an array of text blocks")
    parts = []
    for i, block in enumerate(content):
        need(isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str),
             f"{where}[{i}] must be a text block")
        parts.append(block["text"])
    return "".join(parts)


def anthropic_to_chat(body: dict) -> dict:
    need(isinstance(body, dict), "the request body must be a JSON object")
    model = field_of(body, "model", str, "body")
    max_tokens = field_of(body, "max_tokens", int, "body")
    need(max_tokens > 0, "body.max_tokens must be positive")
    raw_messages = field_of(body, "messages", list, "body")
    need(len(raw_messages) > 0, "body.messages must not be empty")
    messages: list[dict] = []
    system = body.get("system")
    if system is not None:
        messages.append({"role": "system", "content": _anthropic_text(system, "body.system")})
    for i, msg in enumerate(raw_messages):
        where = f"body.messages[{i}]"
        need(isinstance(msg, dict), f"{where} must be an object")
        role = field_of(msg, "role", str, where)
        need(role in ("user", "assistant"), f"{where}.role must be 'user' or 'assistant', got {role!r}")
        content = msg.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        need(isinstance(content, list), f"{where}.content must be a string or an array of blocks")
        if role == "assistant":
            messages.extend(assistant_messages(_anthropic_assistant_blocks(content, where)))
        else:
            messages.extend(_anthropic_user_messages(content, where))
    chat: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    _copy_sampling(body, chat, "body")
    top_k = field_of(body, "top_k", int, "body", required=False)
    if top_k is not None:
        chat["top_k"] = top_k
    stops = field_of(body, "stop_sequences", list, "body", required=False)
    if stops:
        need(all(isinstance(s, str) for s in stops), "body.stop_sequences must be strings")
        chat["stop"] = stops
    tools = field_of(body, "tools", list, "body", required=False)
    if tools:
        chat["tools"] = [_anthropic_tool(t, f"body.tools[{i}]") for i, t in enumerate(tools)]
    choice = field_of(body, "tool_choice", dict, "body", required=False)
    if choice is not None:
        chat["tool_choice"] = _anthropic_tool_choice(choice)
    chat.update(_anthropic_thinking(body, max_tokens))
    return chat


def _anthropic_thinking(body: dict, max_tokens: int) -> dict:
    """``thinking`` as vLLM takes it: the chat template's ``enable_thinking`` (off when absent, as Anthropic
    models do not think unless asked) and, since vLLM cannot cap thinking tokens per request, the budget
    as the nearest ``reasoning_effort`` (what reasoning models' templates read)."""
    thinking = field_of(body, "thinking", dict, "body", required=False) or {"type": "disabled"}
    kind = thinking.get("type")
    need(kind in ("enabled", "adaptive", "disabled"), f"body.thinking.type must be enabled, adaptive or disabled, got {kind!r}")
    out: dict[str, Any] = {"chat_template_kwargs": {"enable_thinking": kind != "disabled"}}
    if kind == "enabled":
        budget = field_of(thinking, "budget_tokens", int, "body.thinking")
        need(0 < budget < max_tokens, "body.thinking.budget_tokens must be positive and less than max_tokens")
        out["reasoning_effort"] = "low" if budget < 4096 else "medium" if budget < 16384 else "high"
    return out


def _anthropic_assistant_blocks(content: list, where: str) -> list[Block]:
    blocks = []
    for j, block in enumerate(content):
        w = f"{where}.content[{j}]"
        need(isinstance(block, dict), f"{w} must be an object")
        kind = block.get("type")
        if kind == "text":
            blocks.append(Block("text", field_of(block, "text", str, w)))
        elif kind == "thinking":
            blocks.append(Block("thinking", field_of(block, "thinking", str, w)))
        elif kind == "redacted_thinking":
            continue  # opaque to an open model; dropping it is what renders the same every call
        elif kind == "tool_use":
            value = field_of(block, "input", dict, w, required=False) or {}
            worker_id, arguments = replay_arguments(field_of(block, "id", str, w), value)
            blocks.append(Block("tool", arguments, worker_id, field_of(block, "name", str, w)))
        else:
            raise BadRequest(f"{w}.type {kind!r} is not supported in an assistant message")
    return blocks


def _anthropic_user_messages(content: list, where: str) -> list[dict]:
    out: list[dict] = []
    parts: list[dict] = []

    def flush() -> None:
        if parts:
            out.append({"role": "user", "content": list(parts)})
            parts.clear()

    for j, block in enumerate(content):
        w = f"{where}.content[{j}]"
        need(isinstance(block, dict), f"{w} must be an object")
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": field_of(block, "text", str, w)})
        elif kind == "image":
            source = field_of(block, "source", dict, w)
            if source.get("type") == "base64":
                url = f"data:{field_of(source, 'media_type', str, w + '.source')};base64,{field_of(source, 'data', str, w + '.source')}"
            else:
                url = field_of(source, "url", str, w + ".source")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "tool_result":
            flush()
            result = block.get("content", "")
            text = result if isinstance(result, str) else _anthropic_text(result, w + ".content")
            if field_of(block, "is_error", bool, w, required=False):
                text = "Error: " + text  # a chat tool message has no error flag; the model reads it here
            worker_id, _ = decode_tool_id(field_of(block, "tool_use_id", str, w))
            out.append({"role": "tool", "tool_call_id": worker_id, "content": text})
        else:
            raise BadRequest(f"{w}.type {kind!r} is not supported in a user message")
    flush()
    return out


def _anthropic_tool(tool: Any, where: str) -> dict:
    need(isinstance(tool, dict), f"{where} must be an object")
    fn = {"name": field_of(tool, "name", str, where),
          "parameters": field_of(tool, "input_schema", dict, where, required=False) or {"type": "object"}}
    description = field_of(tool, "description", str, where, required=False)
    if description is not None:
        fn["description"] = description
    return {"type": "function", "function": fn}


def _anthropic_tool_choice(choice: dict) -> Any:
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": field_of(choice, "name", str, "body.tool_choice")}}
    mapping = {"auto": "auto", "any": "required", "none": "none"}
    need(kind in mapping, f"body.tool_choice.type must be one of auto, any, tool, none; got {kind!r}")
    return mapping[kind]


def thinking_signature(text: str) -> str:
    """Anthropic clients require a signature on thinking blocks; ours names the text it covers."""
    return f"kvtier-{xxhash.xxh3_64_hexdigest(text.encode())}"


def _anthropic_usage(usage: dict | None) -> dict:
    usage = usage or {}
    cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
    return {"input_tokens": int(usage.get("prompt_tokens") or 0) - cached, "output_tokens": int(usage.get("completion_tokens") or 0),
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def anthropic_block(block: Block) -> dict:
    if block.kind == "thinking":
        return {"type": "thinking", "thinking": block.text, "signature": thinking_signature(block.text)}
    if block.kind == "text":
        return {"type": "text", "text": block.text}
    return {"type": "tool_use", "id": encode_tool_id(block.text), "name": block.name, "input": _parse_args(block.text)}


ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error_type(status: int) -> str:
    """The Anthropic error type for an HTTP status (Anthropic SDKs branch on it)."""
    return ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")


def chat_to_anthropic(resp: dict, model: str) -> dict:
    choice = _first_choice(resp)
    blocks = blocks_from_chat_message(choice.get("message") or {})
    return {"id": _new_id("msg"), "type": "message", "role": "assistant", "model": resp.get("model") or model,
            "content": [anthropic_block(b) for b in blocks],
            "stop_reason": ANTHROPIC_STOP.get(choice.get("finish_reason"), "end_turn"), "stop_sequence": None,
            "usage": _anthropic_usage(resp.get("usage"))}


# --- OpenAI Responses ------------------------------------------------------------------------------------
def responses_to_chat(body: dict) -> dict:
    need(isinstance(body, dict), "the request body must be a JSON object")
    model = field_of(body, "model", str, "body")
    need(body.get("previous_response_id") is None,
         "previous_response_id is not supported: the router keeps no conversation state; send the whole input")
    messages: list[dict] = []
    instructions = field_of(body, "instructions", str, "body", required=False)
    if instructions:
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    need(isinstance(items, (str, list)), "body.input must be a string or an array of items")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    else:
        turn: list[Block] = []
        for i, item in enumerate(items):
            where = f"body.input[{i}]"
            need(isinstance(item, dict), f"{where} must be an object")
            block = _responses_assistant_block(item, where)
            if block is not None:
                turn.append(block)
                continue
            messages.extend(assistant_messages(turn))
            turn = []
            messages.append(_responses_message(item, where))
        messages.extend(assistant_messages(turn))
    need(len(messages) > 0, "body.input must not be empty")
    chat: dict[str, Any] = {"model": model, "messages": messages}
    max_tokens = field_of(body, "max_output_tokens", int, "body", required=False)
    if max_tokens is not None:
        need(max_tokens > 0, "body.max_output_tokens must be positive")
        chat["max_tokens"] = max_tokens
    _copy_sampling(body, chat, "body")
    tools = field_of(body, "tools", list, "body", required=False)
    if tools:
        chat["tools"] = [_responses_tool(t, f"body.tools[{i}]") for i, t in enumerate(tools)]
    choice = body.get("tool_choice")
    need(choice is None or isinstance(choice, (str, dict)), "body.tool_choice must be a string or an object")
    if isinstance(choice, str):
        need(choice in ("auto", "required", "none"), f"body.tool_choice {choice!r} is not supported")
        chat["tool_choice"] = choice
    elif isinstance(choice, dict):
        chat["tool_choice"] = {"type": "function", "function": {"name": field_of(choice, "name", str, "body.tool_choice")}}
    chat.update(_responses_reasoning(body))
    return chat


REASONING_EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high"}


def _responses_reasoning(body: dict) -> dict:
    """``reasoning.effort`` as vLLM takes it: ``reasoning_effort`` (low, medium, high), or thinking off."""
    reasoning = field_of(body, "reasoning", dict, "body", required=False) or {}
    effort = reasoning.get("effort")
    if effort is None:
        return {}
    if effort == "none":
        return {"chat_template_kwargs": {"enable_thinking": False}}
    need(effort in REASONING_EFFORTS, f"body.reasoning.effort must be one of none, {', '.join(REASONING_EFFORTS)}; got {effort!r}")
    return {"reasoning_effort": REASONING_EFFORTS[effort]}


def responses_echo(body: dict) -> dict:
    """The request fields a Response object repeats back (``tools`` and ``tool_choice`` as sent)."""
    return {"tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto"}


def _responses_assistant_block(item: dict, where: str) -> Block | None:
    kind = item.get("type")
    if kind == "reasoning":
        parts = item.get("content") or item.get("summary") or []
        need(isinstance(parts, list), f"{where}.content must be an array")
        texts = [p.get("text") for p in parts if isinstance(p, dict)]
        need(all(isinstance(t, str) for t in texts), f"{where}: reasoning parts need a text")
        return Block("thinking", "".join(texts))
    if kind == "function_call":
        call_id = field_of(item, "call_id", str, where)
        arguments = field_of(item, "arguments", str, where)
        return Block("tool", arguments, call_id, field_of(item, "name", str, where))
    if item.get("role") == "assistant" and kind in (None, "message"):
        return Block("text", _responses_text(item.get("content"), where))
    return None


def _responses_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    need(isinstance(content, list), f"{where}.content must be a string or an array of parts")
    out = []
    for j, part in enumerate(content):
        need(isinstance(part, dict) and isinstance(part.get("text"), str)
             and part.get("type") in ("input_text", "output_text", "text"), f"{where}.content[{j}] must be a text part")
        out.append(part["text"])
    return "".join(out)


def _responses_message(item: dict, where: str) -> dict:
    kind = item.get("type")
    if kind == "function_call_output":
        output = item.get("output")
        need(isinstance(output, (str, list)), f"{where}.output must be a string or an array")
        text = output if isinstance(output, str) else _responses_text(output, where)
        return {"role": "tool", "tool_call_id": field_of(item, "call_id", str, where), "content": text}
    need(kind in (None, "message"), f"{where}.type {kind!r} is not supported")
    role = field_of(item, "role", str, where)
    need(role in ("user", "system", "developer"), f"{where}.role {role!r} is not supported")
    content = item.get("content")
    if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "input_image" for p in content):
        parts = []
        for j, p in enumerate(content):
            need(isinstance(p, dict), f"{where}.content[{j}] must be an object")
            if p.get("type") == "input_image":
                parts.append({"type": "image_url", "image_url": {"url": field_of(p, "image_url", str, f"{where}.content[{j}]")}})
            else:
                parts.append({"type": "text", "text": _responses_text([p], where)})
        return {"role": "user", "content": parts}
    return {"role": "system" if role == "developer" else role, "content": _responses_text(content, where)}


def _responses_tool(tool: Any, where: str) -> dict:
    need(isinstance(tool, dict) and tool.get("type") == "function", f"{where}: only function tools are supported")
    fn = {"name": field_of(tool, "name", str, where),
          "parameters": field_of(tool, "parameters", dict, where, required=False) or {"type": "object"}}
    description = field_of(tool, "description", str, where, required=False)
    if description is not None:
        fn["description"] = description
    return {"type": "function", "function": fn}


def responses_item(block: Block, item_id: str, status: str = "completed") -> dict:
    if block.kind == "thinking":
        return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": block.text}]}
    if block.kind == "text":
        return {"type": "message", "id": item_id, "role": "assistant", "status": status,
                "content": [{"type": "output_text", "text": block.text, "annotations": []}]}
    return {"type": "function_call", "id": item_id, "call_id": block.id, "name": block.name,
            "arguments": block.text, "status": status}


def _responses_usage(usage: dict | None) -> dict:
    usage = usage or {}
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
    return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": cached}, "output_tokens_details": {"reasoning_tokens": 0}}


def response_object(resp_id: str, model: str, output: list[dict], finish_reason: str | None, usage: dict | None,
                    echo: dict, created: int | None = None, in_progress: bool = False,
                    error: dict | None = None) -> dict:
    incomplete = finish_reason == "length"
    status = ("failed" if error else "in_progress" if in_progress else "incomplete" if incomplete else "completed")
    return {"id": resp_id, "object": "response", "created_at": created or int(time.time()), "model": model,
            "status": status, "output": output, "parallel_tool_calls": True, **echo, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "usage": None if in_progress or error else _responses_usage(usage)}


def chat_to_responses(resp: dict, model: str, echo: dict) -> dict:
    choice = _first_choice(resp)
    blocks = blocks_from_chat_message(choice.get("message") or {})
    prefixes = {"thinking": "rs", "text": "msg", "tool": "fc"}
    output = [responses_item(b, _new_id(prefixes[b.kind])) for b in blocks]
    return response_object(_new_id("resp"), resp.get("model") or model, output, choice.get("finish_reason"),
                           resp.get("usage"), echo)


class WorkerError(Exception):
    """The worker answered 2xx with something that is not a chat completion (or its stream failed)."""


def _first_choice(resp: dict) -> dict:
    choices = resp.get("choices")
    if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)
            and isinstance(choices[0].get("message"), dict)):
        raise WorkerError("the worker's answer has no choices[0].message")
    return choices[0]


# --- streaming -------------------------------------------------------------------------------------------
@dataclass
class StreamState:
    """Chat completion chunks folded into blocks; each ``feed`` reports what opened, grew and closed."""

    blocks: list[Block] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict | None = None
    model: str = ""
    _tool_slots: dict[int, int] = field(default_factory=dict)  # chat tool-call index -> block index

    def feed(self, chunk: dict) -> list[tuple[str, int, str]]:
        """Events ``("open", i, "")``, ``("delta", i, text)``, ``("close", i, "")`` in order."""
        events: list[tuple[str, int, str]] = []
        if isinstance(chunk.get("model"), str):
            self.model = chunk["model"] or self.model
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in _dicts(chunk.get("choices")):
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                self._grow(events, "thinking", reasoning)
            content = delta.get("content")
            if isinstance(content, str) and content:
                self._grow(events, "text", content)
            for call in _dicts(delta.get("tool_calls")):
                self._grow_tool(events, call)
            if isinstance(choice.get("finish_reason"), str):
                self.finish_reason = choice["finish_reason"]
        return events

    def close(self) -> list[tuple[str, int, str]]:
        return [("close", len(self.blocks) - 1, "")] if self.blocks else []

    def _open(self, events: list, block: Block) -> int:
        if self.blocks:
            events.append(("close", len(self.blocks) - 1, ""))
        self.blocks.append(block)
        events.append(("open", len(self.blocks) - 1, ""))
        return len(self.blocks) - 1

    def _grow(self, events: list, kind: str, text: str) -> None:
        if not self.blocks or self.blocks[-1].kind != kind:
            self._open(events, Block(kind))
        self.blocks[-1].text += text
        events.append(("delta", len(self.blocks) - 1, text))

    def _grow_tool(self, events: list, call: dict) -> None:
        fn = call.get("function") if isinstance(call.get("function"), dict) else {}
        slot = call.get("index", 0)
        i = self._tool_slots.get(slot)
        if i is None or (call.get("id") and i != len(self.blocks) - 1):
            i = self._open(events, Block("tool", "", call.get("id") or _new_id("call"), fn.get("name") or ""))
            self._tool_slots[slot] = i
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            self.blocks[i].text += args
            events.append(("delta", i, args))


def _dicts(value: Any) -> list[dict]:
    """The objects of a worker's list field (anything else in it is ignored, not a crash)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def sse(event: str | None, data: dict) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class AnthropicReply:
    """A worker's chat completion -> an Anthropic message; its chunks -> Messages stream events
    (message_start ... message_stop).

    ``message_start`` waits for the worker's first chunk, whose usage (vLLM ``continuous_usage_stats``)
    gives the prompt's token count; without it, the router's own count (``prompt_tokens``) when it has a
    tokenizer. A tool block is sent when it closes: its id carries the finished argument string."""

    def __init__(self, model: str, prompt_tokens: int | None = None) -> None:
        self.state = StreamState(model=model)
        self._prompt_tokens = prompt_tokens
        self._id = _new_id("msg")
        self._started = False

    def plain(self, resp: dict) -> dict:
        return chat_to_anthropic(resp, self.state.model)

    def start(self) -> list[bytes]:
        return []

    def chunk(self, chunk: dict) -> list[bytes]:
        events = self.state.feed(chunk)
        return self._message_start() + self._render(events)

    def finish(self) -> list[bytes]:
        out = self._message_start() + self._render(self.state.close())
        usage = _anthropic_usage(self.state.usage)
        out.append(sse("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": ANTHROPIC_STOP.get(self.state.finish_reason, "end_turn"),
                                                   "stop_sequence": None}, "usage": usage}))
        out.append(sse("message_stop", {"type": "message_stop"}))
        return out

    def fail(self, message: str) -> list[bytes]:
        return [sse("error", {"type": "error", "error": {"type": "api_error", "message": message}})]

    def _message_start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        usage = self.state.usage or ({"prompt_tokens": self._prompt_tokens} if self._prompt_tokens else {})
        usage = {**_anthropic_usage(usage), "output_tokens": 0}
        message = {"id": self._id, "type": "message", "role": "assistant", "model": self.state.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": usage}
        return [sse("message_start", {"type": "message_start", "message": message})]

    def _render(self, events: list[tuple[str, int, str]]) -> list[bytes]:
        out = []
        for kind, i, text in events:
            block = self.state.blocks[i]
            if block.kind == "tool":
                if kind == "close":
                    out += self._tool_block(i, block)
            elif kind == "open":
                start = {"thinking": {"type": "thinking", "thinking": "", "signature": ""},
                         "text": {"type": "text", "text": ""}}[block.kind]
                out.append(sse("content_block_start", {"type": "content_block_start", "index": i, "content_block": start}))
            elif kind == "delta":
                delta = {"thinking": {"type": "thinking_delta", "thinking": text},
                         "text": {"type": "text_delta", "text": text}}[block.kind]
                out.append(sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta}))
            else:
                if block.kind == "thinking":
                    out.append(sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                        "type": "signature_delta", "signature": thinking_signature(block.text)}}))
                out.append(sse("content_block_stop", {"type": "content_block_stop", "index": i}))
        return out

    @staticmethod
    def _tool_block(i: int, block: Block) -> list[bytes]:
        start = {"type": "tool_use", "id": encode_tool_id(block.text), "name": block.name, "input": {}}
        delta = {"type": "input_json_delta", "partial_json": block.text}
        return [sse("content_block_start", {"type": "content_block_start", "index": i, "content_block": start}),
                sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta}),
                sse("content_block_stop", {"type": "content_block_stop", "index": i})]


class ResponsesReply:
    """A worker's chat completion -> an OpenAI Response; its chunks -> Responses stream events
    (response.created ... response.completed)."""

    _PREFIX = {"thinking": "rs", "text": "msg", "tool": "fc"}

    def __init__(self, model: str, echo: dict) -> None:
        self.state = StreamState(model=model)
        self._echo = echo
        self._id = _new_id("resp")
        self._created = int(time.time())
        self._item_ids: list[str] = []
        self._seq = 0

    def _event(self, kind: str, **data: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._seq, **data}
        self._seq += 1
        return sse(kind, payload)

    def _response(self, in_progress: bool, error: dict | None = None) -> dict:
        output = [responses_item(b, self._item_ids[i]) for i, b in enumerate(self.state.blocks)]
        return response_object(self._id, self.state.model, output, self.state.finish_reason, self.state.usage,
                               self._echo, self._created, in_progress, error)

    def plain(self, resp: dict) -> dict:
        return chat_to_responses(resp, self.state.model, self._echo)

    def start(self) -> list[bytes]:
        return [self._event("response.created", response=self._response(True)),
                self._event("response.in_progress", response=self._response(True))]

    def chunk(self, chunk: dict) -> list[bytes]:
        return self._render(self.state.feed(chunk))

    def finish(self) -> list[bytes]:
        out = self._render(self.state.close())
        done = "response.incomplete" if self.state.finish_reason == "length" else "response.completed"
        out.append(self._event(done, response=self._response(False)))
        return out

    def fail(self, message: str) -> list[bytes]:
        """An ``error`` event, then ``response.failed`` with the error on the response (as OpenAI streams fail)."""
        error = {"code": "server_error", "message": message}
        return [self._event("error", code="server_error", message=message, param=None),
                self._event("response.failed", response=self._response(False, error))]

    def _render(self, events: list[tuple[str, int, str]]) -> list[bytes]:
        out = []
        for kind, i, text in events:
            block = self.state.blocks[i]
            if kind == "open":
                self._item_ids.append(_new_id(self._PREFIX[block.kind]))
                item_id = self._item_ids[i]
                empty = Block(block.kind, "", block.id, block.name)
                out.append(self._event("response.output_item.added", output_index=i,
                                       item=responses_item(empty, item_id, "in_progress")))
                if block.kind == "text":
                    out.append(self._event("response.content_part.added", item_id=item_id, output_index=i, content_index=0,
                                           part={"type": "output_text", "text": "", "annotations": []}))
                continue
            item_id = self._item_ids[i]
            if kind == "delta":
                name = {"thinking": "response.reasoning_text.delta", "text": "response.output_text.delta",
                        "tool": "response.function_call_arguments.delta"}[block.kind]
                extra = {"logprobs": []} if block.kind == "text" else {}
                index = {} if block.kind == "tool" else {"content_index": 0}
                out.append(self._event(name, item_id=item_id, output_index=i, delta=text, **index, **extra))
                continue
            if block.kind == "thinking":
                out.append(self._event("response.reasoning_text.done", item_id=item_id, output_index=i, content_index=0,
                                       text=block.text))
            elif block.kind == "text":
                out.append(self._event("response.output_text.done", item_id=item_id, output_index=i, content_index=0,
                                       text=block.text, logprobs=[]))
                out.append(self._event("response.content_part.done", item_id=item_id, output_index=i, content_index=0,
                                       part={"type": "output_text", "text": block.text, "annotations": []}))
            else:
                out.append(self._event("response.function_call_arguments.done", item_id=item_id, output_index=i,
                                       arguments=block.text, name=block.name))
            out.append(self._event("response.output_item.done", output_index=i, item=responses_item(block, item_id)))
        return out


class ChatReply:
    """Chat and completions answers pass through unchanged; only a stream's failure needs writing (OpenAI's
    shape). No ``chunk``: the server relays these streams' bytes as they come."""

    def plain(self, resp: dict) -> dict:
        if not isinstance(resp.get("choices"), list):
            raise WorkerError("the worker's answer has no choices")
        return resp

    def start(self) -> list[bytes]:
        return []

    def finish(self) -> list[bytes]:
        return []

    def fail(self, message: str) -> list[bytes]:
        return [sse(None, {"error": {"message": message, "type": "api_error", "code": 502}})]
