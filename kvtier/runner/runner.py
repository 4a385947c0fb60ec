"""The reference runner: greedy generation for one sequence at a time over a paged KV cache.

Determinism contract. A prompt is prefilled in chunks of ``chunk_tokens`` tokens whose boundaries are fixed
absolute positions (multiples of ``chunk_tokens``; only the last chunk may be shorter), and KV is reused only
in whole chunks. A chunk's computation depends only on its tokens and the KV bytes of earlier positions (see
``attention.py``), and a full chunk is computed by the same ops on the same shapes whenever it is computed;
so by induction every chunk's KV bytes are a function of the prompt prefix alone. Hence, for a given prompt,
whether a chunk is recomputed, taken from G1's prefix cache or loaded by ``KVHooks``, the logits are bitwise
identical. KV written by decode steps or by a short last chunk was computed with other shapes; it is never
indexed or stored, so it can never stand in for a full chunk's KV.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from kvtier.hashing import block_hashes
from kvtier.runner.attention import PagedAttention
from kvtier.runner.hooks import KVHooks
from kvtier.runner.kv_cache import PagedKVPool, PoolExhaustedError
from kvtier.runner.model import LlamaModel, ModelConfig

G1, LOADED, COMPUTED = "g1", "loaded", "computed"


@dataclass
class TurnStats:
    """Where one request's prompt KV came from, and how long it took."""

    prompt_tokens: int = 0
    g1_hit_tokens: int = 0         # reused from the runner's own prefix cache
    loaded_tokens: int = 0         # filled by KVHooks.load
    computed_tokens: int = 0       # prefilled by the model
    failed_loads: int = 0          # chunks KVHooks promised but could not load (then computed)
    new_tokens: int = 0
    ttft_s: float = 0.0            # from the call to the first generated token, lookup and loads included
    decode_s: float = 0.0          # the remaining new tokens

    @property
    def reused_tokens(self) -> int:
        return self.g1_hit_tokens + self.loaded_tokens


class Generation(NamedTuple):
    tokens: list[int]              # the generated tokens (greedy)
    first_logits: torch.Tensor     # float32 logits (on the CPU) that chose the first generated token
    stats: TurnStats


class Runner:
    """Drives ``LlamaModel`` over ``PagedKVPool``; the place where ``KVHooks`` are called."""

    def __init__(self, model: LlamaModel, pool: PagedKVPool, chunk_blocks: int = 16,
                 salt: str | bytes | None = None, prefix_caching: bool = True) -> None:
        if chunk_blocks <= 0:
            raise ValueError(f"chunk_blocks must be positive, got {chunk_blocks}")
        if pool.config != model.config:
            raise ValueError("the pool was built for another model config")
        if pool.device != model.device:
            raise ValueError(f"the pool is on {pool.device}, the model on {model.device}")
        self.model, self.pool = model, pool
        self.chunk_blocks = chunk_blocks
        self.salt = salt
        self.prefix_caching = prefix_caching
        self._kv_layers = pool.per_layer_views()

    @classmethod
    def create(cls, config: ModelConfig, num_blocks: int, block_size: int = 16, chunk_blocks: int = 16,
               device: torch.device | str = "cpu", **kwargs: object) -> Runner:
        """A model and a pool of ``num_blocks`` blocks on ``device``."""
        model = LlamaModel(config, device)
        return cls(model, PagedKVPool(config, num_blocks, block_size, device), chunk_blocks, **kwargs)  # type: ignore[arg-type]

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def chunk_tokens(self) -> int:
        return self.block_size * self.chunk_blocks

    def blocks_needed(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """G1 blocks one request holds: every position but the last generated token's has KV."""
        return -(-(prompt_tokens + max_new_tokens - 1) // self.block_size)

    def generate(self, prompt: Sequence[int], max_new_tokens: int, kv_hooks: KVHooks | None = None) -> Generation:
        """Greedy-decode ``max_new_tokens`` tokens after ``prompt``, reusing KV from G1 and ``kv_hooks``."""
        started = time.perf_counter()
        table: list[int] = []
        try:  # from here on, kv_hooks.release() runs whatever happens
            tokens = self._validate(prompt, max_new_tokens)
            needed = self.blocks_needed(len(tokens), max_new_tokens)
            if needed > self.pool.num_blocks:
                raise PoolExhaustedError(
                    f"one request of {len(tokens)} prompt + {max_new_tokens} new tokens needs {needed} KV blocks "
                    f"of {self.block_size} tokens; the pool has only {self.pool.num_blocks}")
            stats = TurnStats(prompt_tokens=len(tokens), new_tokens=max_new_tokens)
            hashes = block_hashes(tokens.tolist(), self.block_size, self.salt)
            sources, table = self._plan(hashes, len(tokens), needed, kv_hooks)
            self._load(sources, hashes, table, kv_hooks, stats)
            logits = self._prefill(tokens, sources, hashes, table, kv_hooks, stats)
            first_logits = logits.cpu()
            generated = [int(logits.argmax())]
            stats.ttft_s = time.perf_counter() - started
            position = len(tokens)
            for _ in range(max_new_tokens - 1):
                step = torch.tensor(generated[-1:], device=self.model.device)
                logits = self.model(step, self._attention(table, position, 1))
                generated.append(int(logits.argmax()))
                position += 1
            stats.decode_s = time.perf_counter() - started - stats.ttft_s
            return Generation(generated, first_logits, stats)
        finally:
            self.pool.release(table)
            if kv_hooks is not None:
                kv_hooks.release()

    # --- steps ----------------------------------------------------------------------------------------------
    def _validate(self, prompt: Sequence[int], max_new_tokens: int) -> torch.Tensor:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        tokens = torch.as_tensor(list(prompt), dtype=torch.long)
        if tokens.ndim != 1 or tokens.numel() == 0:
            raise ValueError("prompt must be a non-empty sequence of token ids")
        vocab = self.model.config.vocab_size
        if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab})")
        return tokens

    def _chunk_hashes(self, hashes: Sequence[int], chunk: int) -> Sequence[int]:
        return hashes[chunk * self.chunk_blocks:(chunk + 1) * self.chunk_blocks]

    def _plan(self, hashes: Sequence[int], num_tokens: int, needed: int, kv_hooks: KVHooks | None
              ) -> tuple[list[str], list[int]]:
        """Decide each reusable chunk's source and build the block table (G1 hits referenced, the rest fresh).

        The chunk holding the last prompt token is never reused: its logits are the first output.
        """
        reusable = (num_tokens - 1) // self.chunk_tokens
        in_g1: list[list[int] | None] = [None] * reusable
        if self.prefix_caching:
            for chunk in range(reusable):
                blocks = self.pool.lookup(self._chunk_hashes(hashes, chunk))
                in_g1[chunk] = None if None in blocks else [b for b in blocks if b is not None]
        external = 0
        if kv_hooks is not None and reusable:
            external = max(0, min(reusable, kv_hooks.lookup(hashes[:reusable * self.chunk_blocks])))
        sources = [G1 if in_g1[c] is not None else LOADED if c < external else COMPUTED for c in range(reusable)]
        hits = [b for blocks in in_g1 if blocks is not None for b in blocks]
        self.pool.acquire(hits)
        try:
            fresh = iter(self.pool.allocate(needed - len(hits)))
        except PoolExhaustedError:
            self.pool.release(hits)
            raise
        table: list[int] = []
        for chunk in range(reusable):
            blocks = in_g1[chunk]
            table.extend(blocks if blocks is not None else (next(fresh) for _ in range(self.chunk_blocks)))
        table.extend(fresh)
        return sources, table

    def _load(self, sources: list[str], hashes: Sequence[int], table: list[int], kv_hooks: KVHooks | None,
              stats: TurnStats) -> None:
        for chunk, source in enumerate(sources):
            if source != LOADED:
                continue
            assert kv_hooks is not None
            chunk_hashes, blocks = self._chunk_hashes(hashes, chunk), self._chunk_blocks(table, chunk)
            if kv_hooks.load(chunk, chunk_hashes, blocks):
                self._index(chunk_hashes, blocks)
                stats.loaded_tokens += self.chunk_tokens
            else:
                sources[chunk] = COMPUTED
                stats.failed_loads += 1

    def _prefill(self, tokens: torch.Tensor, sources: list[str], hashes: Sequence[int], table: list[int],
                 kv_hooks: KVHooks | None, stats: TurnStats) -> torch.Tensor:
        """Compute every chunk not reused; return the last prompt token's logits."""
        stats.g1_hit_tokens = sources.count(G1) * self.chunk_tokens
        device_tokens = tokens.to(self.model.device)
        num_chunks = -(-len(tokens) // self.chunk_tokens)
        logits = torch.empty(0)
        for chunk in range(num_chunks):
            if chunk < len(sources) and sources[chunk] != COMPUTED:
                continue
            start = chunk * self.chunk_tokens
            end = min(start + self.chunk_tokens, len(tokens))
            attention = self._attention(table, start, end - start, getattr(kv_hooks, "wait_layer", None))
            logits = self.model(device_tokens[start:end], attention)
            stats.computed_tokens += end - start
            if end - start == self.chunk_tokens:
                chunk_hashes, blocks = self._chunk_hashes(hashes, chunk), self._chunk_blocks(table, chunk)
                self._index(chunk_hashes, blocks)
                if kv_hooks is not None:
                    kv_hooks.store(chunk, chunk_hashes, blocks)
        return logits

    def _attention(self, table: list[int], start: int, num_tokens: int,
                   before_layer: Callable[[int], None] | None = None) -> PagedAttention:
        config = self.model.config
        return PagedAttention(self._kv_layers, self.block_size, table, start, num_tokens,
                              config.num_heads // config.num_kv_heads, before_layer)

    def _chunk_blocks(self, table: list[int], chunk: int) -> list[int]:
        return table[chunk * self.chunk_blocks:(chunk + 1) * self.chunk_blocks]

    def _index(self, chunk_hashes: Sequence[int], blocks: list[int]) -> None:
        if self.prefix_caching:
            self.pool.register(chunk_hashes, blocks)
