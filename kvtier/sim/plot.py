"""Hit rate against capacity, one line per policy (a PNG for benchmark and ``kvtier sim --plot`` output).

Policies often coincide (every policy holds the whole working set at large capacities), so each line gets
its own marker, width and dash and the lines are drawn widest first: a policy hidden under another still
shows as the rim around it. Ticks sit at the capacities measured, labelled as percentages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

_MARKERS = "osD^vP*Xh<>"
_DASHES = ("-", "--", "-.", ":")


def plot_sweep(path: str, fractions: Sequence[float], curves: Mapping[str, Sequence[float]], title: str,
               cliffs: Sequence[float] = ()) -> None:
    """``curves[policy][i]`` is the hit rate at ``fractions[i]``; ``cliffs`` are shaded (LRU < half of an
    infinite cache there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    xs = [100 * f for f in fractions]
    n = len(curves)
    for i, (name, values) in enumerate(curves.items()):
        ax.plot(xs, values, label=name, marker=_MARKERS[i % len(_MARKERS)], markersize=9 - 4 * i / max(1, n),
                linewidth=1 + 2.5 * (n - i) / n, linestyle="--" if name == "belady" else _DASHES[i % 3],
                alpha=0.85, zorder=2 + i)
    for f in cliffs:
        ax.axvspan(100 * f / 1.15, 100 * f * 1.15, color="0.85", zorder=0)
    if len(xs) > 1 and min(xs) > 0:
        ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(xs))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(xs, [f"{x:.3g}%" for x in xs])
    ax.set_xlabel("capacity (% of the trace's unique blocks)" + ("; shaded: cliff" if cliffs else ""))
    ax.set_ylabel("prefix hit rate")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
