"""Hit rate against capacity, one line per policy (a PNG for benchmark and ``kvtier sim --plot`` output)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def plot_sweep(path: str, fractions: Sequence[float], curves: Mapping[str, Sequence[float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in curves.items():
        ax.plot([100 * f for f in fractions], values, marker="o", label=name,
                linestyle="--" if name == "belady" else "-")
    ax.set_xscale("log")
    ax.set_xlabel("capacity (% of the trace's unique blocks)")
    ax.set_ylabel("prefix hit rate")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
