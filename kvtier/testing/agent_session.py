"""Scripted agent sessions in OpenAI chat format: a system prompt and tool definitions, then turns that each
append the assistant's reasoning and tool call and the tool's result, as coding agents do.

The script, not the model's output, decides what is appended, so the same session sends the same prompts to
every server configuration compared; each call's output tokens are recorded and compared separately.
Text is drawn from the tiny model's training words (``tiny_model.WORDS``), sized in words (about one token
each).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from kvtier.testing.tiny_model import WORDS

TOOLS = [{"type": "function", "function": {
    "name": name, "description": desc,
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "text": {"type": "string"}},
                   "required": ["path"]}}}
    for name, desc in (("read_file", "read a file of the repository"), ("edit_file", "replace text in a file"),
                       ("bash", "run a shell command in the sandbox"), ("grep", "search the repository"))]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@dataclass
class AgentSession:
    """One session: ``system_words`` of system prompt (shared by sessions with the same ``system_seed``),
    a task, then ``turns`` calls whose tool results add ``tool_words`` each."""

    seed: int
    system_words: int = 600
    tool_words: int = 200
    reasoning_words: int = 30
    turns: int = 4
    system_seed: int | None = None
    messages: list[dict] = field(default_factory=list)
    calls: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        system = words(random.Random(self.seed if self.system_seed is None else self.system_seed), self.system_words)
        self.messages = [{"role": "system", "content": "You are a coding agent. " + system},
                         {"role": "user", "content": f"task {self.seed}: " + words(self._rng, 40)}]

    @property
    def session_id(self) -> str:
        return f"session-{self.seed}"

    def done(self) -> bool:
        return self.calls >= self.turns

    def request(self) -> dict:
        """The next call's body fields: messages and tools (the conversation so far). The tiny model has no tool-call
        parser, so its calls are scripted and ``tool_choice`` is "none"."""
        return {"messages": [dict(m) for m in self.messages], "tools": TOOLS, "tool_choice": "none"}

    def advance(self) -> None:
        """Append this call's scripted answer (reasoning + tool call) and the tool's result."""
        rng = self._rng
        tool = rng.choice(TOOLS)["function"]["name"]
        call_id = f"call_{self.seed}_{self.calls}"
        self.messages.append({"role": "assistant", "content": "", "reasoning_content": words(rng, self.reasoning_words),
                              "tool_calls": [{"id": call_id, "type": "function", "function": {
                                  "name": tool, "arguments": json.dumps({"path": f"src/{rng.choice(WORDS)}.py"})}}]})
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": words(rng, self.tool_words)})
        self.calls += 1
