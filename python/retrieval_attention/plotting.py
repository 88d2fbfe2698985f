"""Plots of a RetrievalCache's per-layer figures (`cache.stats()`) for notebooks and reports.

matplotlib is an optional dependency: it is imported only when a plot is made.
"""
from __future__ import annotations

_STAT_KEYS = ("layer", "scanned_frac", "index_build_s", "device_kv_bytes", "cpu_kv_bytes", "cpu_index_bytes")


def _import_pyplot():
    # matplotlib picks its backend itself (Agg when there is no display); the caller's choice is left alone
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "retrieval_attention.plot_stats needs matplotlib, which is not installed: `pip install matplotlib`"
        ) from exc
    return plt


def _as_stats(stats_or_cache) -> list[dict]:
    if hasattr(stats_or_cache, "stats") and callable(stats_or_cache.stats):
        stats = stats_or_cache.stats()
    else:
        stats = stats_or_cache
    if isinstance(stats, dict):  # one layer's stats
        stats = [stats]
    try:
        stats = list(stats)
    except TypeError:
        raise TypeError(
            f"plot_stats expects a RetrievalCache or the list of dicts from cache.stats(), got {type(stats_or_cache).__name__}"
        ) from None
    if not stats:
        raise ValueError("plot_stats: no layers to plot (empty stats)")
    for i, s in enumerate(stats):
        if not isinstance(s, dict):
            raise TypeError(f"plot_stats: stats[{i}] must be a dict from cache.stats(), got {type(s).__name__}")
        missing = [k for k in _STAT_KEYS if k not in s]
        if missing:
            raise ValueError(f"plot_stats: stats[{i}] lacks {missing}; expected the dicts of RetrievalCache.stats()")
    return stats


def plot_stats(stats_or_cache, path=None, title: str | None = None):
    """Plot a RetrievalCache's per-layer figures and return the matplotlib Figure.

    stats_or_cache: a RetrievalCache (its `stats()` is called) or the list of dicts `cache.stats()` returned.
    path: if given, the figure is also saved there (PNG, PDF, ... by extension).

    Four panels, one bar (group) per decoder layer:
      * fraction of the CPU keys scanned (scored) per query and decode step, in percent;
      * KV bytes on the model's device vs CPU KV bytes vs CPU index bytes (MiB);
      * index build time (seconds; includes the split at prefill and later inserts);
      * attention mass, in percent: the mean share of the merged attention mass that came from the retrieved CPU keys
        ("cpu_mass_share", always recorded) and, when RetrievalConfig.mass_probe_every was set, the share of the exact
        attention mass the static set plus the retrieved keys recovered (bar: mean, black tick: minimum). Stats without
        these keys (older versions) leave the panel empty.
    """
    stats = _as_stats(stats_or_cache)
    plt = _import_pyplot()
    layers = [int(s["layer"]) for s in stats]
    x = list(range(len(stats)))
    mib = 2.0**20

    fig, axes = plt.subplots(4, 1, figsize=(max(6.0, 0.45 * len(stats) + 3.0), 10.5), sharex=True)
    ax_scan, ax_mem, ax_build, ax_mass = axes

    ax_scan.bar(x, [100.0 * float(s["scanned_frac"]) for s in stats], color="tab:blue")
    ax_scan.set_ylabel("CPU keys scanned (%)")
    ax_scan.set_title(title or "RetrievalCache per layer")

    width = 0.27
    series = (
        ("device KV", "device_kv_bytes", "tab:green"),
        ("CPU KV", "cpu_kv_bytes", "tab:orange"),
        ("CPU index", "cpu_index_bytes", "tab:red"),
    )
    for j, (label, key, color) in enumerate(series):
        ax_mem.bar([xi + (j - 1) * width for xi in x], [float(s[key]) / mib for s in stats], width, label=label, color=color)
    ax_mem.set_ylabel("MiB")
    ax_mem.legend(loc="best", fontsize="small")

    ax_build.bar(x, [float(s["index_build_s"]) for s in stats], color="tab:purple")
    ax_build.set_ylabel("index build (s)")

    share = [s.get("cpu_mass_share") for s in stats]
    recovered = [s.get("recovered_mass_mean") for s in stats]
    low = [s.get("recovered_mass_min") for s in stats]
    probed = any(r is not None for r in recovered)
    width = 0.4 if probed else 0.8
    if any(v is not None for v in share):
        ax_mass.bar([xi - width / 2 if probed else xi for xi in x], [100.0 * float(v or 0.0) for v in share], width,
                    label="share from CPU keys", color="tab:cyan")
    if probed:
        ax_mass.bar([xi + width / 2 for xi in x], [100.0 * float(v) if v is not None else 0.0 for v in recovered], width,
                    label="recovered (probe mean)", color="tab:olive")
        pts = [(xi + width / 2, 100.0 * float(v)) for xi, v in zip(x, low) if v is not None]
        ax_mass.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="none", marker="_", markersize=14, color="black",
                     label="recovered (probe min)")
        ax_mass.set_ylim(0.0, 135.0)  # room above 100% for the legend
    elif any(v is not None for v in share):
        ax_mass.text(0.01, 0.95, "exact mass probe off (RetrievalConfig.mass_probe_every)", transform=ax_mass.transAxes,
                     va="top", fontsize="small", color="gray")
    ax_mass.set_ylabel("attention mass (%)")
    if ax_mass.get_legend_handles_labels()[0]:
        ax_mass.legend(loc="upper left", ncol=3 if probed else 1, fontsize="x-small", columnspacing=1.0)
    ax_mass.set_xlabel("layer")
    ax_mass.set_xticks(x)
    ax_mass.set_xticklabels([str(l) for l in layers])

    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(str(path), dpi=120)
    return fig
