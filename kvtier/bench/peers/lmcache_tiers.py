"""Runs inside the ``lmcache`` peer environment: LMCache's ``LocalCPUBackend`` (G2's peer) and
``LocalDiskBackend`` with O_DIRECT (G3's peer) storing and returning chunks of each size; one JSON object on
stdout. Workload (JSON): ``{"sizes": [bytes...], "total_bytes": n, "reps": r, "disk_dir": path}``.

As kvtier's side of ``kvtier bench tiers`` is measured: a put copies a chunk from a source tensor into the
store, a get copies it back into a destination tensor that was touched before the clock started; every
byte is compared after the gets. Best of ``reps`` runs, with LMCache's defaults otherwise (its memory is
reserved when the backend is built, so a first fill pays no page faults).
"""

import asyncio
import json
import logging
import shutil
import sys
import tempfile
import threading
import time

GB = 1e9
PUT_DEADLINE_S = 120  # LMCache drops a put it cannot place; waiting longer would only hang the benchmark


def backends(total_bytes, disk_dir):
    import torch
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
    from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend

    size_gib = 8 * total_bytes / 2**30 + 0.25  # room for every rep's chunks: removed ones may free late
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=256, local_cpu=True, max_local_cpu_size=size_gib, local_disk=disk_dir,
        max_local_disk_size=size_gib, extra_config={"use_odirect": True})
    metadata = LMCacheMetadata("bench", 1, 1, 0, 0, torch.uint8, (1, 2, 256, 8, 128))
    cpu = LocalCPUBackend(config, metadata)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return cpu, LocalDiskBackend(config, loop, cpu)


def keys_for(tag, count):
    import torch
    from lmcache.utils import CacheEngineKey

    return [CacheEngineKey(tag, 1, 0, i, torch.uint8) for i in range(count)]


def put_all(cpu, backend, keys, source):
    size = source.shape[1]
    for key, row in zip(keys, source):
        obj = cpu.allocate(source.shape[1:], source.dtype)
        obj.tensor.view(-1)[:size].copy_(row)
        backend.submit_put_task(key, obj)
        obj.ref_count_down()
    deadline = time.monotonic() + PUT_DEADLINE_S
    while not all(backend.contains(k) for k in keys):  # disk puts complete on LMCache's own threads
        if time.monotonic() > deadline:
            stored = sum(backend.contains(k) for k in keys)
            raise RuntimeError(f"{type(backend).__name__}: {stored} of {len(keys)} puts stored after "
                               f"{PUT_DEADLINE_S} s")
        time.sleep(0.0005)


def get_all(backend, keys, dest):
    size = dest.shape[1]
    for key, row in zip(keys, dest):
        obj = backend.get_blocking(key)
        row.copy_(obj.tensor.view(-1)[:size])
        obj.ref_count_down()


def measure(cpu, backend, tag, source, dest, reps):
    """(first put GB/s, warm put GB/s, get GB/s, every byte equal)."""
    import torch

    nbytes = source.numel()
    best = [0.0, 0.0, 0.0]
    same = True
    for rep in range(reps):
        keys = []
        for slot in (0, 1):  # the first fill, then a warm put once those chunks are gone
            if keys:
                backend.batched_remove(keys)
            keys = keys_for(f"{tag}-{rep}-{slot}", source.shape[0])
            start = time.perf_counter()
            put_all(cpu, backend, keys, source)
            best[slot] = max(best[slot], nbytes / (time.perf_counter() - start) / GB)
        dest.zero_()
        start = time.perf_counter()
        get_all(backend, keys, dest)
        best[2] = max(best[2], nbytes / (time.perf_counter() - start) / GB)
        same = same and torch.equal(dest, source)
        backend.batched_remove(keys)
    return (*best, same)


def main():
    logging.disable(logging.WARNING)
    import torch

    with open(sys.argv[1]) as f:
        workload = json.load(f)
    rows = []
    for size in workload["sizes"]:
        count = max(8, workload["total_bytes"] // size)
        source = torch.randint(0, 256, (count, size), dtype=torch.uint8)
        dest = torch.empty_like(source)
        disk_dir = tempfile.mkdtemp(dir=workload["disk_dir"])
        try:
            for tier in ("G3", "G2"):  # fresh backends per tier: after a G2 run LMCache's disk puts never landed
                cpu, disk = backends(count * size, disk_dir)
                backend = cpu if tier == "G2" else disk
                first, put, get, same = measure(cpu, backend, f"{tier}-{size}", source, dest, workload["reps"])
                rows.append({"tier": tier, "impl": "lmcache", "chunk_bytes": size, "put_first_gbps": first,
                             "put_gbps": put, "get_gbps": get, "verified": same})
                disk.close()
                cpu.close()
        finally:
            shutil.rmtree(disk_dir, ignore_errors=True)
    print(json.dumps({"rows": rows, "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
