"""Engine KV layouts -> page descriptors.

Every engine's KV cache reduces to the same picture: for each block, a fixed list of *segments* (pointer,
bytes) — one per layer tensor, or several when the layout interleaves blocks inside a layer tensor (vLLM's
LHBNC and BHLNC orders). A block's chunk record is its segments concatenated in order, which is
``[layer tensor][page bytes]`` with each page in the cache's own physical byte order. The kernels move
descriptor tables of segments, so supporting a new layout means writing a builder here, not a kernel.

Builders take the engine's tensors as the engine holds them (any dtype, fp8 included) and read their real
strides, so a view with an unexpected stride order is described correctly or rejected, never misread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

VLLM_ORDERS = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")
SGLANG_HOST_LAYOUTS = ("layer_first", "page_first", "page_first_direct")


@dataclass(frozen=True)
class PageLayout:
    """Where every block's bytes live.

    Block ``b``'s segment ``j`` starts at byte ``seg_ptrs[j] + b * seg_block_strides[j]`` and is
    ``segment_bytes`` long; the block's record is the ``len(seg_ptrs)`` segments back to back.
    ``segments_per_layer > 1`` says a layer's page is not contiguous for one block (it is split into that
    many pieces); ``segments_per_layer == 0`` says the whole block was coalesced into one segment.
    """

    name: str
    device: torch.device
    num_blocks: int
    segment_bytes: int
    seg_ptrs: tuple[int, ...]
    seg_block_strides: tuple[int, ...]
    segments_per_layer: int
    num_layer_tensors: int
    # For the torch path: per segment, the index of its storage and its byte offset in that storage.
    seg_storage: tuple[int, ...] = field(repr=False)
    seg_storage_offsets: tuple[int, ...] = field(repr=False)
    storages: tuple[torch.Tensor, ...] = field(repr=False)  # flat uint8 views; also keep the memory alive

    @property
    def num_segments(self) -> int:
        return len(self.seg_ptrs)

    @property
    def block_bytes(self) -> int:
        return self.num_segments * self.segment_bytes

    @property
    def contiguous_per_layer(self) -> bool:
        return self.segments_per_layer <= 1

    def layer_slices(self) -> list[tuple[PageLayout, int]] | None:
        """Per layer tensor: a layout of only its segments and their byte offset inside a block's record, so
        a chunk can be loaded layer by layer. None for coalesced layouts (a block's layers are one segment)."""
        per = self.segments_per_layer
        if per == 0:
            return None
        out = []
        for layer in range(self.num_layer_tensors):
            part = slice(layer * per, (layer + 1) * per)
            out.append((PageLayout(f"{self.name}[{layer}]", self.device, self.num_blocks, self.segment_bytes,
                                   self.seg_ptrs[part], self.seg_block_strides[part], per, 1, self.seg_storage[part],
                                   self.seg_storage_offsets[part], self.storages), layer * per * self.segment_bytes))
        return out

    def segment_rows(self, j: int) -> torch.Tensor:
        """Segment ``j`` of every block as a ``[num_blocks, segment_bytes]`` uint8 view (no copy)."""
        storage = self.storages[self.seg_storage[j]]
        return storage.as_strided((self.num_blocks, self.segment_bytes), (self.seg_block_strides[j], 1),
                                  self.seg_storage_offsets[j])

    def descriptor_tensors(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(segment pointers, segment block strides) as int64 tensors for the kernels' descriptor tables."""
        device = self.device if device is None else device
        return (torch.tensor(self.seg_ptrs, dtype=torch.int64, device=device),
                torch.tensor(self.seg_block_strides, dtype=torch.int64, device=device))


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    storage = tensor.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)


def _part_segments(part: torch.Tensor) -> tuple[list[int], int, int]:
    """For a view whose dim 0 indexes blocks: (segment byte offsets from the part's start, segment bytes,
    block stride in bytes). Page dims are walked in physical order; the innermost contiguous run is one
    segment, every outer page dim enumerates segments."""
    es = part.element_size()
    dims = [(part.shape[d], part.stride(d) * es) for d in range(1, part.dim()) if part.shape[d] != 1]
    dims.sort(key=lambda sd: sd[1], reverse=True)
    run = es
    while dims and dims[-1][1] == run:
        size, _ = dims.pop()
        run *= size
    offsets = [0]
    for size, stride in dims:  # outer dims, outermost first: segments in physical order
        offsets = [o + i * stride for o in offsets for i in range(size)]
    return offsets, run, part.stride(0) * es


def build_layout(name: str, layer_parts: Sequence[Sequence[torch.Tensor]]) -> PageLayout:
    """Describe blocks made of ``layer_parts``: per layer tensor, the views (dim 0 = block) forming its page.

    Most callers use an engine-specific builder below; this is their common core.
    """
    flat_parts = [p for parts in layer_parts for p in parts]
    if not flat_parts:
        raise ValueError(f"{name}: no KV tensors given")
    device, num_blocks = flat_parts[0].device, flat_parts[0].shape[0]
    storages: list[torch.Tensor] = []
    storage_index: dict[int, int] = {}
    ptrs, strides, seg_storage, seg_offsets = [], [], [], []
    segment_bytes = None
    pieces_per_layer = set()
    for parts in layer_parts:
        pieces = 0
        for part in parts:
            if part.device != device:
                raise ValueError(f"{name}: KV tensors are on different devices ({part.device} vs {device})")
            if part.shape[0] != num_blocks:
                raise ValueError(f"{name}: tensors disagree on the number of blocks ({part.shape[0]} vs {num_blocks})")
            if part.dim() < 2 or part.numel() == 0:
                raise ValueError(f"{name}: expected a non-empty [blocks, ...] view, got shape {tuple(part.shape)}")
            offsets, run, block_stride = _part_segments(part)
            if segment_bytes is None:
                segment_bytes = run
            elif run != segment_bytes:
                raise ValueError(f"{name}: layer tensors have different page shapes ({run} vs {segment_bytes} bytes)")
            key = part.untyped_storage().data_ptr()
            if key not in storage_index:
                storage_index[key] = len(storages)
                storages.append(_flat_bytes(part))
            base = part.data_ptr()
            for off in offsets:
                ptrs.append(base + off)
                strides.append(block_stride)
                seg_storage.append(storage_index[key])
                seg_offsets.append(base - key + off)
            pieces += len(offsets)
        pieces_per_layer.add(pieces)
    assert segment_bytes is not None
    _check_no_block_overlap(name, ptrs, strides, segment_bytes, num_blocks)
    layout = PageLayout(name, device, num_blocks, segment_bytes, tuple(ptrs), tuple(strides),
                        max(pieces_per_layer), len(layer_parts), tuple(seg_storage), tuple(seg_offsets),
                        tuple(storages))
    return _coalesced(layout)


def _check_no_block_overlap(name: str, ptrs: list[int], strides: list[int], seg_bytes: int, num_blocks: int) -> None:
    """Reject views where two blocks' bytes alias (e.g. a stride of 0), which would make copies ambiguous."""
    if num_blocks > 1 and any(abs(s) < seg_bytes for s in strides):
        raise ValueError(f"{name}: block stride smaller than a page; blocks would overlap")


def _coalesced(layout: PageLayout) -> PageLayout:
    """Merge all segments into one when a block's segments already sit back to back (the BL* orders)."""
    n = layout.num_segments
    if n == 1:
        return layout
    same = all(layout.seg_storage[j] == layout.seg_storage[0] and layout.seg_block_strides[j] == layout.seg_block_strides[0]
               and layout.seg_ptrs[j] == layout.seg_ptrs[0] + j * layout.segment_bytes for j in range(n))
    if not same:
        return layout
    return PageLayout(layout.name, layout.device, layout.num_blocks, n * layout.segment_bytes, layout.seg_ptrs[:1],
                      layout.seg_block_strides[:1], 0, layout.num_layer_tensors, layout.seg_storage[:1],
                      layout.seg_storage_offsets[:1], layout.storages)


# ---------------------------------------------------------------------------------------------------------
# Engine-specific builders
# ---------------------------------------------------------------------------------------------------------

def _stride_order(t: torch.Tensor, dims: str) -> str:
    """The physical (outermost-first) order of a logical view's dims, e.g. 'LHBNC'."""
    return "".join(d for _, d in sorted(zip(t.stride(), dims), key=lambda sd: -sd[0]))


def vllm_layout(kv: torch.Tensor, order: str) -> PageLayout:
    """vLLM 0.33: one logical ``[L, B, H, N, C]`` tensor (K and V packed in C) with stride order ``order``."""
    if order not in VLLM_ORDERS:
        raise ValueError(f"unknown vLLM KV layout {order!r}; expected one of {VLLM_ORDERS}")
    if kv.dim() != 5:
        raise ValueError(f"vLLM KV cache must be logical [L, B, H, N, C], got shape {tuple(kv.shape)}")
    strides_unique = len(set(kv.stride())) == 5
    if strides_unique and _stride_order(kv, "LBHNC") != order:
        raise ValueError(f"KV tensor strides are in {_stride_order(kv, 'LBHNC')} order, not {order}")
    return build_layout(f"vllm-{order}", [[kv[layer]] for layer in range(kv.shape[0])])


def vllm_mla_layout(kv_per_layer: Sequence[torch.Tensor]) -> PageLayout:
    """vLLM MLA: per layer one ``[B, N, C]`` latent cache."""
    for t in kv_per_layer:
        if t.dim() != 3:
            raise ValueError(f"MLA KV cache must be [B, N, C] per layer, got shape {tuple(t.shape)}")
    return build_layout("vllm-mla", [[t] for t in kv_per_layer])


def paired_kv_layout(kv_per_layer: Sequence[torch.Tensor]) -> PageLayout:
    """Older vLLM and most runners: per layer ``(2, B, N, H, D)``; a layer's page is its K page then V page."""
    for t in kv_per_layer:
        if t.dim() != 5 or t.shape[0] != 2:
            raise ValueError(f"expected (2, B, N, H, D) per layer, got shape {tuple(t.shape)}")
    return build_layout("kv-2BNHD", [[t[0], t[1]] for t in kv_per_layer])


def flashinfer_layout(kv_per_layer: Sequence[torch.Tensor]) -> PageLayout:
    """FlashInfer / vLLM FlashInfer backend: per layer ``(B, 2, N, H, D)``."""
    for t in kv_per_layer:
        if t.dim() != 5 or t.shape[1] != 2:
            raise ValueError(f"expected (B, 2, N, H, D) per layer, got shape {tuple(t.shape)}")
    return build_layout("flashinfer-B2NHD", [[t] for t in kv_per_layer])


def _token_pages(buf: torch.Tensor, page_size: int, what: str) -> torch.Tensor:
    if buf.dim() != 3:
        raise ValueError(f"SGLang {what} buffer must be [tokens, heads, head_dim], got shape {tuple(buf.shape)}")
    return _pages_of(buf, page_size, what)


def _pages_of(buf: torch.Tensor, page_size: int, what: str) -> torch.Tensor:
    """A token-major ``[tokens, ...]`` buffer as ``[pages, page_size, ...]`` (a trailing partial page dropped)."""
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    pages = buf.shape[0] // page_size
    if pages == 0:
        raise ValueError(f"SGLang {what} buffer holds {buf.shape[0]} tokens, fewer than one page of {page_size}")
    head = buf[: pages * page_size]
    return head.view(pages, page_size, *buf.shape[1:]) if head.is_contiguous() else \
        head.unflatten(0, (pages, page_size))


def sglang_mha_layout(k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor], page_size: int) -> PageLayout:
    """SGLang device pool: per layer token-major K and V ``[tokens, H, D]``; block ``b`` = page ``b``."""
    if len(k_buffers) != len(v_buffers):
        raise ValueError(f"{len(k_buffers)} K buffers but {len(v_buffers)} V buffers")
    return build_layout("sglang-mha", [[_token_pages(k, page_size, "K"), _token_pages(v, page_size, "V")]
                                       for k, v in zip(k_buffers, v_buffers)])


def sglang_mla_layout(kv_buffers: Sequence[torch.Tensor], page_size: int) -> PageLayout:
    """SGLang MLA device pool: per layer one token-major ``[tokens, 1, kv_lora_rank + rope_dim]`` buffer."""
    return build_layout("sglang-mla", [[_token_pages(kv, page_size, "MLA KV")] for kv in kv_buffers])


def sglang_host_layout(kv_buffer: torch.Tensor, layout: str, page_size: int, mla: bool) -> PageLayout:
    """SGLang 0.5.23 host pool (``HostKVCache.kv_buffer``): block ``b`` = host page ``b`` (token slot
    ``b * page_size``). A record is the page's bytes in ``get_page_buffer_meta`` order: per layer K then V
    (layer_first), or all of K then all of V (page_first, page_first_direct); MLA has no V."""
    if layout not in SGLANG_HOST_LAYOUTS:
        raise ValueError(f"unsupported SGLang host layout {layout!r}; expected one of {SGLANG_HOST_LAYOUTS}")
    want = {("layer_first", False): 5, ("page_first", False): 5, ("page_first_direct", False): 6,
            ("layer_first", True): 4, ("page_first", True): 4, ("page_first_direct", True): 5}[layout, mla]
    if kv_buffer.dim() != want:
        raise ValueError(f"SGLang {'MLA' if mla else 'MHA'} {layout} host buffer must have {want} dims, "
                         f"got shape {tuple(kv_buffer.shape)}")
    name = f"sglang-host-{'mla' if mla else 'mha'}-{layout}"
    if mla:
        if layout == "layer_first":  # (L, tokens, 1, dim)
            return build_layout(name, [[_pages_of(kv_buffer[i], page_size, "MLA")] for i in range(kv_buffer.shape[0])])
        parts = [kv_buffer] if layout == "page_first_direct" else [_pages_of(kv_buffer, page_size, "MLA")]
        return build_layout(name, [parts])
    if kv_buffer.shape[0] != 2:
        raise ValueError(f"SGLang MHA host buffer must start with a K/V dim of 2, got shape {tuple(kv_buffer.shape)}")
    k, v = kv_buffer[0], kv_buffer[1]
    if layout == "layer_first":  # (2, L, tokens, H, D)
        return build_layout(name, [[_pages_of(k[i], page_size, "K"), _pages_of(v[i], page_size, "V")]
                                   for i in range(k.shape[0])])
    if layout == "page_first":  # (2, tokens, L, H, D)
        return build_layout(name, [[_pages_of(k, page_size, "K"), _pages_of(v, page_size, "V")]])
    return build_layout(name, [[k, v]])  # (2, pages, L, page_size, H, D)


def alignment(*values: int) -> int:
    """The largest power of two up to 16 dividing every value (pointer, stride or size)."""
    g = 16
    for v in values:
        g = math.gcd(g, v)
    return g
