"""The hot index: block hash -> which worker slots hold it, per medium.

Two implementations with one API: the native ``kvtier._block_index`` (``csrc/block_index.c``, built by
``setup.py`` when a compiler is present) and :class:`PyBlockIndex` below, the fallback and the oracle the
tests compare the native one against. :data:`BlockIndex` is the best one available.

A worker is a slot ``0 <= slot < MAX_WORKERS``; a medium is ``0`` device (GPU), ``1`` host (CPU) or
``2`` disk (STORAGE). ``find`` answers, for each slot, three prefix lengths in blocks: how many leading
blocks it holds on the device, on device-or-host, and anywhere (each a prefix: a block counts only if every
block before it counts too).
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_WORKERS = 64
N_MEDIA = 3
_ALL = (1 << MAX_WORKERS) - 1


def _check(slot: int, medium: int) -> None:
    if not 0 <= slot < MAX_WORKERS:
        raise ValueError(f"worker slot must be in [0, {MAX_WORKERS}), got {slot}")
    if not 0 <= medium < N_MEDIA:
        raise ValueError(f"medium must be 0 (device), 1 (host) or 2 (disk), got {medium}")


class PyBlockIndex:
    """Pure-Python index: a dict of hash -> [device mask, host mask, disk mask] (one bit per slot)."""

    native = False

    def __init__(self) -> None:
        self._blocks: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def store(self, slot: int, medium: int, hashes: Sequence[int]) -> None:
        _check(slot, medium)
        bit = 1 << slot
        blocks = self._blocks
        for key in hashes:
            entry = blocks.get(key)
            if entry is None:
                entry = blocks[key] = [0, 0, 0]
            entry[medium] |= bit

    def remove(self, slot: int, medium: int, hashes: Sequence[int]) -> None:
        _check(slot, medium)
        keep = _ALL ^ (1 << slot)
        blocks = self._blocks
        for key in hashes:
            entry = blocks.get(key)
            if entry is not None:
                entry[medium] &= keep
                if not (entry[0] | entry[1] | entry[2]):
                    del blocks[key]

    def media(self, slot: int, key: int) -> int:
        """Bit ``m`` set when ``slot`` holds ``key`` on medium ``m``."""
        entry = self._blocks.get(key)
        if entry is None:
            return 0
        return ((entry[0] >> slot) & 1) | (((entry[1] >> slot) & 1) << 1) | (((entry[2] >> slot) & 1) << 2)

    def clear_worker(self, slot: int) -> None:
        _check(slot, 0)
        keep = _ALL ^ (1 << slot)
        for key, entry in list(self._blocks.items()):
            entry[0] &= keep
            entry[1] &= keep
            entry[2] &= keep
            if not (entry[0] | entry[1] | entry[2]):
                del self._blocks[key]

    def find(self, hashes: Sequence[int]) -> list[tuple[int, int, int, int]]:
        """``(slot, device_prefix, host_prefix, any_prefix)`` for every slot with ``any_prefix > 0``."""
        get = self._blocks.get
        cur_d = cur_h = cur_a = _ALL
        drops: list[tuple[int, int, int]] = []  # (which prefix, length, slots that stopped there)
        depth = 0
        for key in hashes:
            entry = get(key)
            if entry is None:
                break
            d, h, s = entry
            h |= d
            new_a = cur_a & (h | s)
            if not new_a:
                break
            new_d = cur_d & d
            new_h = cur_h & h
            if depth:
                if new_d != cur_d:
                    drops.append((0, depth, cur_d ^ new_d))
                if new_h != cur_h:
                    drops.append((1, depth, cur_h ^ new_h))
                if new_a != cur_a:
                    drops.append((2, depth, cur_a ^ new_a))
            cur_d, cur_h, cur_a = new_d, new_h, new_a
            depth += 1
        if not depth:
            return []
        drops.append((0, depth, cur_d))
        drops.append((1, depth, cur_h))
        drops.append((2, depth, cur_a))
        result: dict[int, list[int]] = {}
        for which, length, mask in drops:
            while mask:
                low = mask & -mask
                mask ^= low
                slot = low.bit_length() - 1
                lens = result.get(slot)
                if lens is None:
                    lens = result[slot] = [0, 0, 0]
                lens[which] = length
        return [(slot, d, h, a) for slot, (d, h, a) in sorted(result.items()) if a]


try:
    from kvtier._block_index import BlockIndex as NativeBlockIndex
except ImportError:  # no compiler at install time: the pure-Python index serves
    NativeBlockIndex = None

BlockIndex = NativeBlockIndex or PyBlockIndex
