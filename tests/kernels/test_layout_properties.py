"""Property tests of the descriptor builders: for any geometry and stride order, the segments of all blocks
tile the cache exactly once, in the order the chunk format promises."""

import torch
from hypothesis import given, settings, strategies as st

from kvtier import layout as L


def _covered(layout):
    spans = []
    for b in range(layout.num_blocks):
        for j in range(layout.num_segments):
            start = layout.seg_ptrs[j] + b * layout.seg_block_strides[j]
            spans.append((start, start + layout.segment_bytes))
    return sorted(spans)


@settings(max_examples=60, deadline=None)
@given(order=st.sampled_from(L.VLLM_ORDERS), dims=st.tuples(*[st.integers(1, 4)] * 5),
       dtype=st.sampled_from([torch.uint8, torch.float16, torch.float32]))
def test_vllm_segments_tile_the_cache(order, dims, dtype):
    sizes = dict(zip("LBHNC", dims))
    phys = torch.zeros(tuple(sizes[d] for d in order), dtype=dtype)
    kv = phys.permute(*[order.index(d) for d in "LBHNC"])
    if len(set(kv.stride())) < 5:  # degenerate dims make the order ambiguous; the builder reads strides
        lay = L.build_layout("x", [[kv[i]] for i in range(kv.shape[0])])
    else:
        lay = L.vllm_layout(kv, order)
    spans = _covered(lay)
    total = phys.numel() * phys.element_size()
    assert lay.block_bytes * lay.num_blocks == total
    assert spans[0][0] == phys.data_ptr() and spans[-1][1] == phys.data_ptr() + total
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "segments overlap"
    # block 0's segment j starts in layer j // segments_per_layer: records are [layer][page]
    if lay.segments_per_layer >= 1:
        assert lay.num_segments == sizes["L"] * lay.segments_per_layer
        for j in range(lay.num_segments):
            flat = (lay.seg_ptrs[j] - phys.data_ptr()) // phys.element_size()
            coords = dict(zip(order, torch.unravel_index(torch.tensor(flat), phys.shape)))
            assert int(coords["L"]) == j // lay.segments_per_layer and int(coords["B"]) == 0


@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 3), pages=st.integers(1, 5), page_size=st.integers(1, 4), heads=st.integers(1, 3),
       head_dim=st.integers(1, 5), pad=st.integers(0, 3))
def test_sglang_pages(layers, pages, page_size, heads, head_dim, pad):
    ks = [torch.zeros(pages * page_size + pad, heads, head_dim, dtype=torch.bfloat16) for _ in range(layers)]
    vs = [torch.zeros_like(k) for k in ks]
    lay = L.sglang_mha_layout(ks, vs, page_size)
    assert lay.num_blocks == (pages * page_size + pad) // page_size and lay.num_segments == 2 * layers
    assert lay.segment_bytes == page_size * heads * head_dim * 2
    for j, t in enumerate(t for pair in zip(ks, vs) for t in pair):
        assert lay.seg_ptrs[j] == t.data_ptr() and lay.seg_block_strides[j] == lay.segment_bytes
