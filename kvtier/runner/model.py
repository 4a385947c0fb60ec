"""A small Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) with deterministic weights.

The weights are random but reproducible: every tensor is drawn on the CPU from one ``torch.Generator``
seeded with ``ModelConfig.seed`` and then moved to the target device, so a CPU model and a GPU model built
from the same config hold the same numbers (up to the dtype cast). The model never owns KV: each layer's
attention reads and writes pages of a ``PagedKVPool`` through the ``PagedAttention`` backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from kvtier.runner.attention import PagedAttention

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the decoder; ``name`` and ``seed`` identify the weights (see ``model_id``)."""

    name: str = "tiny"
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 176
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                      "intermediate_size"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.rope_theta <= 0 or self.rms_eps <= 0:
            raise ValueError("rope_theta and rms_eps must be positive")
        if not self.name or any(c in self.name for c in "/ \n"):
            raise ValueError(f"name must be non-empty without '/', spaces or newlines: {self.name!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def model_id(self) -> str:
        """A name for the weights, usable as ``kvtier.hashing.Namespace.model``: KV from other weights never matches."""
        return f"{self.name}-seed{self.seed}"

    def with_(self, **changes: object) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    # --- presets --------------------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **changes: object) -> ModelConfig:
        """A few hundred thousand parameters: unit tests on a CPU."""
        return cls(**changes)  # type: ignore[arg-type]

    @classmethod
    def small(cls, **changes: object) -> ModelConfig:
        """About 30 M parameters: the CPU demo (a 4K-token prompt prefills in about a second on 2 cores)."""
        base = dict(name="small", vocab_size=32000, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2,
                    head_dim=64, intermediate_size=1024)
        return cls(**{**base, **changes})  # type: ignore[arg-type]

    @classmethod
    def llama3_8b_layers(cls, num_layers: int = 32, **changes: object) -> ModelConfig:
        """Llama-3-8B's shapes (GQA 32/8 heads of 128, SwiGLU 14336, bf16), cut to ``num_layers`` layers.

        KV bytes per token and layer match the real model, so GPU transfer and recompute benchmarks see
        realistic page sizes without real weights.
        """
        base = dict(name=f"llama3-8b-l{num_layers}", vocab_size=128256, hidden_size=4096, num_layers=num_layers,
                    num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336, rope_theta=500000.0,
                    dtype="bfloat16")
        return cls(**{**base, **changes})  # type: ignore[arg-type]

    @classmethod
    def preset(cls, name: str, **changes: object) -> ModelConfig:
        """``tiny``, ``small`` or ``llama3-8b-l<N>`` (e.g. ``llama3-8b-l4``) by name, for command lines."""
        if name == "tiny":
            return cls.tiny(**changes)
        if name == "small":
            return cls.small(**changes)
        prefix = "llama3-8b-l"
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return cls.llama3_8b_layers(int(name[len(prefix):]), **changes)
        raise ValueError(f"unknown model preset {name!r}; expected tiny, small or llama3-8b-l<N>")


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


class RotaryEmbedding(nn.Module):
    """RoPE (rotate-half form) evaluated at absolute positions, in float32."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x``: ``(tokens, heads, head_dim)``; ``positions``: ``(tokens,)`` absolute positions."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        cos = torch.cat((angles.cos(), angles.cos()), dim=-1)[:, None, :]
        sin = torch.cat((angles.sin(), angles.sin()), dim=-1)[:, None, :]
        x32 = x.float()
        half = x32.shape[-1] // 2
        rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
        return (x32 * cos + rotated * sin).to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, draw: _WeightDrawer, layer_index: int) -> None:
        super().__init__()
        c = config
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.input_norm = RMSNorm(draw.ones(c.hidden_size), c.rms_eps)
        # q, k and v as one fused projection: one matmul per layer instead of three.
        self.qkv_proj = nn.Parameter(draw.linear(q + 2 * kv, c.hidden_size), requires_grad=False)
        self.o_proj = nn.Parameter(draw.linear(c.hidden_size, q), requires_grad=False)
        self.post_attention_norm = RMSNorm(draw.ones(c.hidden_size), c.rms_eps)
        self.gate_up_proj = nn.Parameter(draw.linear(2 * c.intermediate_size, c.hidden_size), requires_grad=False)
        self.down_proj = nn.Parameter(draw.linear(c.hidden_size, c.intermediate_size), requires_grad=False)

    def qkv(self, x: torch.Tensor, rope: RotaryEmbedding, positions: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed, projected and rotated ``q (T, Hq, D)``, ``k (T, Hkv, D)``, ``v (T, Hkv, D)``."""
        h = F.linear(self.input_norm(x), self.qkv_proj)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = h.split((q_size, kv_size, kv_size), dim=-1)
        q = rope(q.reshape(-1, self.num_heads, self.head_dim), positions)
        k = rope(k.reshape(-1, self.num_kv_heads, self.head_dim), positions)
        return q, k, v.reshape(-1, self.num_kv_heads, self.head_dim)

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, SwiGLU MLP, residual."""
        x = x + F.linear(attn_out.reshape(attn_out.shape[0], -1), self.o_proj)
        gate, up = F.linear(self.post_attention_norm(x), self.gate_up_proj).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.down_proj)


class _WeightDrawer:
    """Draws every weight from one seeded CPU generator, in a fixed order, then casts and moves it."""

    def __init__(self, seed: int, dtype: torch.dtype, device: torch.device) -> None:
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.dtype, self.device = dtype, device

    def linear(self, out_features: int, in_features: int) -> torch.Tensor:
        w = torch.randn(out_features, in_features, generator=self.generator) / math.sqrt(in_features)
        return w.to(device=self.device, dtype=self.dtype)

    def embedding(self, vocab: int, hidden: int) -> torch.Tensor:
        return torch.randn(vocab, hidden, generator=self.generator).to(device=self.device, dtype=self.dtype)

    def ones(self, size: int) -> torch.Tensor:
        return torch.ones(size, device=self.device, dtype=self.dtype)


class LlamaModel(nn.Module):
    """The decoder. ``forward`` runs one chunk of one sequence against the paged KV cache."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        self.device = torch.empty(0, device=device).device  # "cuda" becomes "cuda:0", as a pool's tensors say
        draw = _WeightDrawer(config.seed, config.torch_dtype, self.device)
        self.embed = nn.Parameter(draw.embedding(config.vocab_size, config.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(config, draw, i) for i in range(config.num_layers))
        self.norm = RMSNorm(draw.ones(config.hidden_size), config.rms_eps)
        self.lm_head = nn.Parameter(draw.linear(config.vocab_size, config.hidden_size), requires_grad=False)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta).to(self.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, attention: PagedAttention) -> torch.Tensor:
        """Run ``tokens`` (one chunk, at the positions ``attention`` was prepared for); return the float32
        logits of the chunk's last token. Each layer writes the chunk's K and V into its pages first."""
        x = self.embed[tokens]
        positions = attention.positions
        for layer in self.layers:
            q, k, v = layer.qkv(x, self.rope, positions)
            x = layer.finish(x, attention(layer.layer_index, q, k, v))
        return self.logits(x[-1:])[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(hidden), self.lm_head).float()

    @torch.inference_mode()
    def reference_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """All positions' logits of ``tokens`` in one pass with plain dense causal attention and no KV cache.

        An independent path (repeat the KV heads, explicit softmax) used to check that paged attention
        computes the same function; it agrees to rounding, not bitwise.
        """
        x = self.embed[tokens]
        positions = torch.arange(tokens.shape[0], device=tokens.device)
        causal = torch.ones(tokens.shape[0], tokens.shape[0], dtype=torch.bool, device=tokens.device).tril()
        for layer in self.layers:
            q, k, v = layer.qkv(x, self.rope, positions)
            group = layer.num_heads // layer.num_kv_heads
            q, k, v = (t.float().transpose(0, 1) for t in (q, k.repeat_interleave(group, 1),
                                                              v.repeat_interleave(group, 1)))
            scores = (q @ k.transpose(1, 2)) / math.sqrt(layer.head_dim)
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            x = layer.finish(x, (probs @ v).transpose(0, 1).to(x.dtype))
        return self.logits(x)
