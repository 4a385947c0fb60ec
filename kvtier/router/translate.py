"""Anthropic Messages and OpenAI Responses <-> OpenAI chat completions (what vLLM and SGLang workers serve).

Why care about order: an agent re-sends its whole history every call. If thinking, text and tool calls of
an assistant turn were regrouped, the rendered prompt would change between calls and the worker's cached
prefix would be lost. So an assistant turn becomes as many consecutive chat messages as it takes to keep
its blocks in their original order, and tool-call arguments go back to the worker as the exact string the
model wrote (remembered by call id), not re-serialised JSON.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
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


# --- blocks: the common shape of an assistant turn -------------------------------------------------------
@dataclass
class Block:
    kind: str            # "thinking" | "text" | "tool"
    text: str = ""       # thinking or text; for a tool: its arguments string
    id: str = ""
    name: str = ""


class ToolArgsMemo:
    """call id -> the argument string the model produced, so a replayed history renders identically."""

    def __init__(self, capacity: int = 50_000) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, str] = OrderedDict()

    def remember(self, call_id: str, arguments: str) -> None:
        self._items[call_id] = arguments
        self._items.move_to_end(call_id)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def arguments(self, call_id: str, value: Any) -> str:
        raw = self._items.get(call_id)
        if raw is not None:
            try:
                if json.loads(raw) == value:
                    return raw
            except ValueError:
                pass
        return json.dumps(value, ensure_ascii=False)


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
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
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


def anthropic_to_chat(body: dict, memo: ToolArgsMemo) -> dict:
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
            messages.extend(assistant_messages(_anthropic_assistant_blocks(content, where, memo)))
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
    thinking = field_of(body, "thinking", dict, "body", required=False)
    if thinking is not None:
        chat["chat_template_kwargs"] = {"enable_thinking": thinking.get("type") == "enabled"}
    return chat


def _anthropic_assistant_blocks(content: list, where: str, memo: ToolArgsMemo) -> list[Block]:
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
            call_id = field_of(block, "id", str, w)
            args = field_of(block, "input", dict, w, required=False) or {}
            blocks.append(Block("tool", memo.arguments(call_id, args), call_id, field_of(block, "name", str, w)))
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
            out.append({"role": "tool", "tool_call_id": field_of(block, "tool_use_id", str, w), "content": text})
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
    return {"type": "tool_use", "id": block.id, "name": block.name, "input": _parse_args(block.text)}


def chat_to_anthropic(resp: dict, model: str, memo: ToolArgsMemo) -> dict:
    choice = (resp.get("choices") or [{}])[0]
    blocks = blocks_from_chat_message(choice.get("message") or {})
    for b in blocks:
        if b.kind == "tool":
            memo.remember(b.id, b.text)
    return {"id": _new_id("msg"), "type": "message", "role": "assistant", "model": resp.get("model") or model,
            "content": [anthropic_block(b) for b in blocks],
            "stop_reason": ANTHROPIC_STOP.get(choice.get("finish_reason"), "end_turn"), "stop_sequence": None,
            "usage": _anthropic_usage(resp.get("usage"))}


# --- OpenAI Responses ------------------------------------------------------------------------------------
def responses_to_chat(body: dict, memo: ToolArgsMemo) -> dict:
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
            block = _responses_assistant_block(item, where, memo)
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
    if isinstance(choice, str):
        need(choice in ("auto", "required", "none"), f"body.tool_choice {choice!r} is not supported")
        chat["tool_choice"] = choice
    elif isinstance(choice, dict):
        chat["tool_choice"] = {"type": "function", "function": {"name": field_of(choice, "name", str, "body.tool_choice")}}
    return chat


def _responses_assistant_block(item: dict, where: str, memo: ToolArgsMemo) -> Block | None:
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
                    created: int | None = None, in_progress: bool = False) -> dict:
    incomplete = finish_reason == "length"
    status = "in_progress" if in_progress else ("incomplete" if incomplete else "completed")
    return {"id": resp_id, "object": "response", "created_at": created or int(time.time()), "model": model,
            "status": status, "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if incomplete and not in_progress else None,
            "usage": None if in_progress else _responses_usage(usage)}


def chat_to_responses(resp: dict, model: str, memo: ToolArgsMemo) -> dict:
    choice = (resp.get("choices") or [{}])[0]
    blocks = blocks_from_chat_message(choice.get("message") or {})
    prefixes = {"thinking": "rs", "text": "msg", "tool": "fc"}
    for b in blocks:
        if b.kind == "tool":
            memo.remember(b.id, b.text)
    output = [responses_item(b, _new_id(prefixes[b.kind])) for b in blocks]
    return response_object(_new_id("resp"), resp.get("model") or model, output, choice.get("finish_reason"), resp.get("usage"))


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
        self.model = chunk.get("model") or self.model
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                self._grow(events, "thinking", reasoning)
            content = delta.get("content")
            if isinstance(content, str) and content:
                self._grow(events, "text", content)
            for call in delta.get("tool_calls") or []:
                self._grow_tool(events, call)
            if choice.get("finish_reason"):
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
        fn = call.get("function") or {}
        slot = call.get("index", 0)
        i = self._tool_slots.get(slot)
        if i is None or (call.get("id") and i != len(self.blocks) - 1):
            i = self._open(events, Block("tool", "", call.get("id") or _new_id("call"), fn.get("name") or ""))
            self._tool_slots[slot] = i
        args = fn.get("arguments") or ""
        if args:
            self.blocks[i].text += args
            events.append(("delta", i, args))


def sse(event: str | None, data: dict) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class AnthropicStreamWriter:
    """Chat chunks -> Anthropic Messages stream events (message_start ... message_stop)."""

    def __init__(self, model: str, memo: ToolArgsMemo) -> None:
        self.state = StreamState(model=model)
        self._memo = memo
        self._id = _new_id("msg")

    def start(self) -> list[bytes]:
        message = {"id": self._id, "type": "message", "role": "assistant", "model": self.state.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
        return [sse("message_start", {"type": "message_start", "message": message})]

    def chunk(self, chunk: dict) -> list[bytes]:
        return self._render(self.state.feed(chunk))

    def finish(self) -> list[bytes]:
        out = self._render(self.state.close())
        usage = _anthropic_usage(self.state.usage)
        out.append(sse("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": ANTHROPIC_STOP.get(self.state.finish_reason, "end_turn"),
                                                   "stop_sequence": None}, "usage": usage}))
        out.append(sse("message_stop", {"type": "message_stop"}))
        return out

    def _render(self, events: list[tuple[str, int, str]]) -> list[bytes]:
        out = []
        for kind, i, text in events:
            block = self.state.blocks[i]
            if kind == "open":
                start = {"thinking": {"type": "thinking", "thinking": "", "signature": ""},
                         "text": {"type": "text", "text": ""},
                         "tool": {"type": "tool_use", "id": block.id, "name": block.name, "input": {}}}[block.kind]
                out.append(sse("content_block_start", {"type": "content_block_start", "index": i, "content_block": start}))
            elif kind == "delta":
                delta = {"thinking": {"type": "thinking_delta", "thinking": text}, "text": {"type": "text_delta", "text": text},
                         "tool": {"type": "input_json_delta", "partial_json": text}}[block.kind]
                out.append(sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta}))
            else:
                if block.kind == "thinking":
                    out.append(sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                        "type": "signature_delta", "signature": thinking_signature(block.text)}}))
                elif block.kind == "tool":
                    self._memo.remember(block.id, block.text)
                out.append(sse("content_block_stop", {"type": "content_block_stop", "index": i}))
        return out


class ResponsesStreamWriter:
    """Chat chunks -> OpenAI Responses stream events (response.created ... response.completed)."""

    _PREFIX = {"thinking": "rs", "text": "msg", "tool": "fc"}

    def __init__(self, model: str, memo: ToolArgsMemo) -> None:
        self.state = StreamState(model=model)
        self._memo = memo
        self._id = _new_id("resp")
        self._created = int(time.time())
        self._item_ids: list[str] = []
        self._seq = 0

    def _event(self, kind: str, **data: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._seq, **data}
        self._seq += 1
        return sse(kind, payload)

    def _response(self, in_progress: bool) -> dict:
        output = [responses_item(b, self._item_ids[i]) for i, b in enumerate(self.state.blocks)]
        return response_object(self._id, self.state.model, output, self.state.finish_reason, self.state.usage,
                               self._created, in_progress)

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
                self._memo.remember(block.id, block.text)
                out.append(self._event("response.function_call_arguments.done", item_id=item_id, output_index=i,
                                       arguments=block.text, name=block.name))
            out.append(self._event("response.output_item.done", output_index=i, item=responses_item(block, item_id)))
        return out
