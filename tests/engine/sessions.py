"""A tiny reference model with three runners around one engine: the building blocks of the engine tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kvtier.config import KvtierConfig
from kvtier.engine import EngineRequest, KvtierEngine
from kvtier.events import EventPublisher
from kvtier.hashing import Namespace
from kvtier.hints import AgentHints
from kvtier.layout import paired_kv_layout
from kvtier.runner.kv_cache import PagedKVPool
from kvtier.runner.model import LlamaModel, ModelConfig
from kvtier.runner.offload import EngineHooks
from kvtier.runner.runner import Generation, Runner

BLOCK, CHUNK_BLOCKS = 4, 4
CHUNK_TOKENS = BLOCK * CHUNK_BLOCKS
MAX_TOKENS = 240
NEW = 3


def random_tokens(n: int, seed: int, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@dataclass
class Rig:
    """``reference`` keeps everything in G1; ``recompute`` reuses nothing; ``runner()`` makes a fresh small G1
    (nothing cached) in front of ``engine``."""

    model: LlamaModel
    engine: KvtierEngine
    reference: Runner
    recompute: Runner
    pool: PagedKVPool                 # the small G1 the engine's layout describes
    calls: int = 0

    def runner(self, salt: str | None = None) -> Runner:
        """The small G1 with its prefix cache dropped and its bytes poisoned: reuse must come from kvtier."""
        self.pool.reset_prefix_cache(poison=0xA5)
        return Runner(self.model, self.pool, CHUNK_BLOCKS, salt=salt)

    def call(self, runner: Runner, prompt: list[int], salt: str | None = None, session: str | None = None
             ) -> tuple[Generation, EngineHooks]:
        self.calls += 1
        hooks = EngineHooks(self.engine, EngineRequest(f"call-{self.calls}-{session}", prompt,
                                                       AgentHints(session_id=session), salt))
        return runner.generate(prompt, NEW, kv_hooks=hooks), hooks

    def same_as_reference(self, prompt: list[int], got: Generation) -> bool:
        """Logits bitwise equal to the all-in-G1 run, tokens equal to the recompute run."""
        warm = self.reference.generate(prompt, NEW)
        cold = self.recompute.generate(prompt, NEW)
        return torch.equal(got.first_logits, warm.first_logits) and got.tokens == cold.tokens


def make_rig(tmp: Path, *, host_chunks: int = 64, disk: bool = False, remote_url: str = "",
             events: EventPublisher | None = None, device: str = "cpu", **config: object) -> Rig:
    model = LlamaModel(ModelConfig.tiny(), torch.device(device))
    reference = Runner(model, PagedKVPool(model.config, 4096, BLOCK, model.device), CHUNK_BLOCKS)
    recompute = Runner(model, PagedKVPool(model.config, 128, BLOCK, model.device), CHUNK_BLOCKS, prefix_caching=False)
    rig_pool = PagedKVPool(model.config, -(-(MAX_TOKENS + NEW) // BLOCK), BLOCK, model.device)
    layout = paired_kv_layout(rig_pool.per_layer_views())
    slot = -(-layout.block_bytes * CHUNK_BLOCKS // 4096) * 4096
    # tests of late reads set their own deadline; elsewhere a loaded CI machine must not turn hits into misses
    config.setdefault("lower_tier_deadline_ms", 5000.0)
    config.setdefault("disk_capacity_bytes", 64 * 2**20)
    cfg = KvtierConfig(block_size=BLOCK, chunk_blocks=CHUNK_BLOCKS, host_capacity_bytes=(host_chunks + 4) * slot,
                       disk_path=str(tmp / "disk") if disk else "", remote_url=remote_url, admission_min_hits=0,
                       **config)
    engine = KvtierEngine(cfg, layout, Namespace("tiny", "float32", layout.name), events=events)
    return Rig(model, engine, reference, recompute, rig_pool)
