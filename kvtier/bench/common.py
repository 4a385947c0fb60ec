"""Shared helpers for the benchmarks: the machine line, timing, the results table, JSON and shared data."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


REPO = Path(__file__).resolve().parents[2]


def shared_file(name: str) -> Path:
    """A file of the shared data directory (traces): ``$KVTIER_SHARED``, else ``shared/`` beside or inside the
    repository. The first candidate when none exists, so the error names a sensible place."""
    roots = [Path(os.environ["KVTIER_SHARED"])] if "KVTIER_SHARED" in os.environ else []
    roots += [REPO.parent / "shared", REPO / "shared", Path.cwd() / "shared"]
    return next((root / name for root in roots if (root / name).is_file()), roots[0] / name)


def machine_line() -> str:
    """What every benchmark table names: CPU, cores, load at the start, and the GPU when there is one."""
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "; no GPU"
    return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
            f"{os.getloadavg()[0]:.1f}{gpu}; Python {platform.python_version()}, torch {torch.__version__}")


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (benchmarks run on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def time_it(fn: Callable[[], Any], device: torch.device, repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs, synchronising the device around each run."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    samples = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> None:
    if title:
        print(f"\n{title}")
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")
