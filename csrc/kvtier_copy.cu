// kvtier: gather/scatter of paged KV blocks over a descriptor table (same contract as the Triton kernel).
//
// Block `block_ids[i]`, segment `s` lives at cache address `seg_ptrs[s] + block_ids[i] * seg_strides[s]`;
// its copy in the arena is at `host_ptrs[i] + s * seg_bytes`. One CTA handles one (block, segment) work
// item at a time in a grid-stride loop, so the launcher bounds the grid (SM budget). With `vec16` every
// address is 16-byte aligned and the body moves as int4 with four loads in flight per thread; the last
// `seg_bytes % 16` bytes (or all bytes when not aligned) move one by one.
// Compiled at first use through NVRTC (cupy) or ahead of time by setup.py; no host code, no dependencies.

extern "C" __global__ void kvtier_copy_segments(const long long* __restrict__ seg_ptrs,
                                                const long long* __restrict__ seg_strides,
                                                const long long* __restrict__ block_ids,
                                                const long long* __restrict__ host_ptrs,
                                                long long num_blocks, int num_segs, long long seg_bytes,
                                                int to_host, int vec16) {
  const long long items = num_blocks * (long long)num_segs;
  for (long long item = blockIdx.x; item < items; item += gridDim.x) {
    const long long i = item / num_segs;
    const int s = (int)(item % num_segs);
    char* cache = (char*)(seg_ptrs[s] + block_ids[i] * seg_strides[s]);
    char* host = (char*)(host_ptrs[i] + (long long)s * seg_bytes);
    const char* src = to_host ? cache : host;
    char* dst = to_host ? host : cache;

    long long body = 0;
    if (vec16) {
      const long long vecs = seg_bytes / 16;
      const int4* vsrc = (const int4*)src;
      int4* vdst = (int4*)dst;
      const long long stride = blockDim.x;
      long long v = threadIdx.x;
      for (; v + 3 * stride < vecs; v += 4 * stride) {
        int4 a = vsrc[v], b = vsrc[v + stride], c = vsrc[v + 2 * stride], d = vsrc[v + 3 * stride];
        vdst[v] = a; vdst[v + stride] = b; vdst[v + 2 * stride] = c; vdst[v + 3 * stride] = d;
      }
      for (; v < vecs; v += stride) vdst[v] = vsrc[v];
      body = vecs * 16;
    }
    for (long long b = body + threadIdx.x; b < seg_bytes; b += blockDim.x) dst[b] = src[b];
  }
}
