"""A synthetic agentic-coding workload, for stress tests and for runs without the real traces.

What it models: one system prompt and tool-definition prefix shared by every session (and a smaller one
shared by subagents); contexts that grow call by call (each call re-sends the previous input, the visible part
of the previous output and a tool result); tool calls with log-normal delays and occasional long user pauses;
reasoning output that is stored but never re-sent (an ephemeral tail); when each response ends and why (a
tool call, or the end of a turn before a user pause or the session's end: what a server sees); subagents that run their own short
sessions while the parent waits. Sessions run back to back in ``slots`` concurrent slots. Blocks are ids:
a block id stands for the whole prefix up to it, as a chained hash would, and ids are global (the shared
prefix is one set of blocks across sessions, as in Weka traces with ``hash_id_scope: "global"``).

``REGIMES`` names the workloads a policy is developed against, so none is tuned to one trace: few and many
concurrent sessions, tight and heavy-tailed gaps, slow and fast context growth, many subagents, a large
shared prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvtier.sim.trace import STOP_REASONS, Trace

SOURCE = "kvtier synthetic agentic-coding generator"
_TOOL_USE, _END_TURN = STOP_REASONS.index("tool_use"), STOP_REASONS.index("end_turn")


@dataclass(frozen=True)
class SyntheticSpec:
    sessions: int = 64
    slots: int = 8
    system_blocks: int = 40          # system prompt + tool definitions, shared by all sessions
    subagent_system_blocks: int = 12
    mean_calls: float = 30.0          # calls per session (geometric)
    tool_result_blocks: float = 6.0   # mean new input blocks per call (log-normal)
    output_blocks: int = 1            # visible output re-sent next call
    reasoning_prob: float = 0.5
    reasoning_blocks: int = 2         # reasoning output: stored, never re-sent
    tool_delay_s: float = 4.0         # median tool-call delay
    tool_delay_sigma: float = 1.0     # log-normal spread of the tool-call delay
    user_pause_prob: float = 0.05
    user_pause_s: float = 120.0
    subagent_prob: float = 0.03
    subagent_calls: int = 8
    block_tokens: int = 64

    def __post_init__(self) -> None:
        if self.sessions <= 0 or self.slots <= 0 or self.mean_calls < 1:
            raise ValueError("sessions and slots must be positive and mean_calls >= 1")
        for name in ("reasoning_prob", "user_pause_prob", "subagent_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")


class _Ids:
    def __init__(self, start: int) -> None:
        self.next = start

    def take(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


REGIMES: dict[str, SyntheticSpec] = {
    "agentic": SyntheticSpec(),
    "crowded": SyntheticSpec(sessions=160, slots=32),                      # 32 sessions cycling: the cliff
    "heavy-tail": SyntheticSpec(sessions=96, slots=16, tool_delay_sigma=1.8, user_pause_prob=0.15,
                                user_pause_s=600.0),
    "long-context": SyntheticSpec(sessions=48, slots=16, tool_result_blocks=16.0, mean_calls=40.0),
    "subagents": SyntheticSpec(sessions=64, slots=16, subagent_prob=0.3, subagent_calls=12),
    "shared-prefix": SyntheticSpec(sessions=128, slots=32, system_blocks=240, mean_calls=20.0),
}


def generate(spec: SyntheticSpec = SyntheticSpec(), seed: int = 0, regime: str = "") -> Trace:
    rng = np.random.default_rng(seed)
    system = list(range(spec.system_blocks))
    sub_system = list(range(spec.system_blocks, spec.system_blocks + spec.subagent_system_blocks))
    ids = _Ids(spec.system_blocks + spec.subagent_system_blocks)
    # (t, session, blocks, prefix, reasoning, response end, stop reason)
    requests: list[tuple[float, int, list[int], int, int, float, int]] = []
    session_counter = [0]

    def run_session(t: float, prefix: list[int], calls: int) -> float:
        sid = session_counter[0]
        session_counter[0] += 1
        context = prefix + ids.take(1 + int(rng.poisson(2)))   # first user message
        for call in range(calls):
            reasoning = spec.reasoning_blocks if rng.random() < spec.reasoning_prob else 0
            visible = ids.take(spec.output_blocks)
            thought = ids.take(reasoning)
            api_time = 1.0 + 0.02 * len(context) + 2.0 * (reasoning + spec.output_blocks)
            start, t = t, t + api_time
            subagent = prefix is system and rng.random() < spec.subagent_prob
            pause = not subagent and rng.random() < spec.user_pause_prob
            # the response ends in a tool call (a subagent is one) unless a person answers next
            stop = _END_TURN if pause or call == calls - 1 else _TOOL_USE
            requests.append((start, sid, context + visible + thought, len(prefix), reasoning, t, stop))
            if subagent:
                t = run_session(t, sub_system, spec.subagent_calls)
            elif pause:
                t += rng.exponential(spec.user_pause_s)
            else:
                t += rng.lognormal(np.log(spec.tool_delay_s), spec.tool_delay_sigma)
            new_input = max(1, int(round(rng.lognormal(np.log(spec.tool_result_blocks), 0.8))))
            context = context + visible + ids.take(new_input)
        return t

    slot_free = [0.0] * spec.slots
    for _ in range(spec.sessions):
        slot = int(np.argmin(slot_free))
        calls = int(rng.geometric(1.0 / spec.mean_calls))
        slot_free[slot] = run_session(slot_free[slot], system, calls)
    requests.sort(key=lambda r: r[0])
    blocks = [r[2] for r in requests]
    offsets = np.zeros(len(requests) + 1, np.int64)
    np.cumsum([len(b) for b in blocks], out=offsets[1:])
    return Trace(name=f"synthetic{' ' + regime if regime else ''} seed={seed}", source=SOURCE, block_tokens=spec.block_tokens,
                 keys=np.fromiter((k for b in blocks for k in b), np.int64, count=int(offsets[-1])),
                 offsets=offsets, times=np.asarray([r[0] for r in requests]),
                 sessions=np.asarray([r[1] for r in requests], np.int32),
                 prefix_blocks=np.asarray([r[3] for r in requests], np.int32),
                 ephemeral_tail=np.asarray([r[4] for r in requests], np.int32),
                 ends=np.asarray([r[5] for r in requests]), stop_reasons=np.asarray([r[6] for r in requests], np.int8))
