"""PNG plots of the benchmark CSVs (matplotlib, Agg backend). Called by report.build()."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def make_all(out: Path, a: dict) -> list[str]:
    """a: the analysis dict of report.analyse(); returns the file names written."""
    plt = _plt()
    written = []
    for fn in (single, parallel, allreduce, scaling, scaling_model, profile, memory):
        try:
            name = fn(plt, out, a)
        except (KeyError, ValueError, IndexError, TypeError):
            name = None
        if name:
            written.append(name)
        plt.close("all")
    return written


def single(plt, out, a):
    s = a.get("single")
    if not s:
        return None
    names = [v for v in ("floor", "hpcfl-numba", "hpcfl-numpy", "numpy-loop", "torch") if v in s["median"]]
    vals = [s["median"][v] for v in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bars = ax1.bar(names, vals, color=["#999999", "#1f77b4", "#6baed6", "#ff7f0e", "#d62728"][:len(names)])
    ax1.bar_label(bars, fmt="%.3f s")
    ax1.set_ylabel("seconds per epoch (median)")
    ax1.set_title("1 rank x 1 thread, batch 128, 60,000 samples")
    rates = [s["gflops"][v] for v in names]
    bars = ax2.bar(names, rates, color="#2ca02c")
    ax2.bar_label(bars, fmt="%.0f")
    if a.get("gemm_shapes"):
        for row in a["gemm_shapes"]:
            ax2.axhline(row["gflops"], color="#cccccc", lw=0.8, zorder=0)
    ax2.set_ylabel("GFLOP/s (GEMM FLOPs / epoch time)")
    ax2.set_title("achieved rate; grey lines: each GEMM shape alone")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(out / "single.png", dpi=110)
    return "single.png"


def parallel(plt, out, a):
    p = a.get("parallel")
    if not p:
        return None
    labels = list(p["median"])
    vals = [p["median"][k] for k in labels]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    colors = ["#d62728" if "torch" in k else "#1f77b4" if "2 ranks" in k else "#6baed6" for k in labels]
    bars = ax.barh(labels, vals, color=colors)
    ax.bar_label(bars, fmt="%.3f s")
    ax.invert_yaxis()
    ax.set_xlabel("seconds per epoch (median), global batch 128, 1 thread per rank")
    ax.set_title("data parallel: fused vs overlapped allreduce, and PyTorch DDP (gloo)")
    fig.tight_layout()
    fig.savefig(out / "parallel.png", dpi=110)
    return "parallel.png"


def allreduce(plt, out, a):
    o = a.get("osu")
    if not o:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ranks, rows in sorted(o["by_ranks"].items()):
        m = [r["bytes"] for r in rows]
        ax1.loglog(m, [r["lat_avg_us"] for r in rows], "o-", ms=3,
                   label=f"{ranks} ranks" + (" (oversubscribed)" if rows[0].get("oversubscribed") else ""))
        ax2.semilogx(m, [r["busbw_GBps"] for r in rows], "o-", ms=3, label=f"{ranks} ranks")
    fit = o.get("fit")
    if fit:
        m = [r["bytes"] for r in o["by_ranks"][2]]
        ax1.loglog(m, [1e6 * (fit["alpha_s"] + x * fit["beta_s_per_byte"]) for x in m], "k--", lw=1,
                   label=f"alpha-beta fit (2 ranks): {fit['alpha_s'] * 1e6:.1f} us + m / "
                         f"{1e-9 / fit['beta_s_per_byte']:.1f} GB/s")
        if o.get("p2p_GBps"):
            ax1.loglog(m, [1e6 * x / (o["p2p_GBps"] * 1e9) for x in m], "k:", lw=1,
                       label=f"ring bound 2(n-1)/n m / BW, n=2, BW = p2p {o['p2p_GBps']:.1f} GB/s")
            ax2.axhline(o["p2p_GBps"], color="k", ls=":", lw=1, label="point-to-point bandwidth")
    if a.get("sync"):
        ax1.axvline(a["sync"]["bytes"], color="#999999", lw=0.8)
        ax1.text(a["sync"]["bytes"], ax1.get_ylim()[0] * 1.5, " gradient", color="#666666", fontsize=8)
    ax1.set_xlabel("message size (bytes)")
    ax1.set_ylabel("MPI_Allreduce latency (us)")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("message size (bytes)")
    ax2.set_ylabel("bus bandwidth 2(n-1)/n * m / t (GB/s)")
    ax2.legend(fontsize=7)
    fig.suptitle("OSU-style allreduce, float32 SUM, in place")
    fig.tight_layout()
    fig.savefig(out / "allreduce.png", dpi=110)
    return "allreduce.png"


def scaling(plt, out, a):
    s = a.get("scaling")
    if not s:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = {("dp", "strong"): "#1f77b4", ("dp", "weak"): "#2ca02c", ("fl", "strong"): "#ff7f0e",
              ("fl", "weak"): "#9467bd"}
    for (mode, kind), pts in sorted(s["efficiency"].items()):
        ranks = sorted(pts)
        ax.plot(ranks, [pts[r] for r in ranks], "o-", color=styles.get((mode, kind)), label=f"{mode} {kind} (measured)")
    for kind, pts in s.get("model_this_machine", {}).items():
        ranks = sorted(pts)
        ax.plot(ranks, [pts[r] for r in ranks], "x--", color=styles[("dp", kind)], label=f"dp {kind} (model)")
    if s.get("cores"):
        ax.axvline(s["cores"] + 0.5, color="#999999", lw=0.8)
        ax.text(s["cores"] + 0.6, 0.05, "oversubscribed ->", color="#666666", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ranks (1 thread each)")
    ax.set_ylabel("parallel efficiency")
    top = max([1.0] + [v for pts in s["efficiency"].values() for v in pts.values()])
    ax.set_ylim(0, top + 0.15)
    ax.axhline(1.0, color="#cccccc", lw=0.8)
    ax.legend(fontsize=8)
    ax.set_title("dp: strong (global batch 128) and weak (128 per rank); fl: 64 clients, E=1, B=10")
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    return "scaling.png"


def scaling_model(plt, out, a):
    rows = a.get("model_rows")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label in dict.fromkeys(r["series"] for r in rows):
        pts = [r for r in rows if r["series"] == label]
        ax.plot([r["ranks"] for r in pts], [r["efficiency"] for r in pts], "o-", ms=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("ranks")
    ax.set_ylabel("predicted parallel efficiency")
    fit = a.get("osu", {}).get("fit") or {}
    ax.set_title(f"alpha-beta model (alpha {fit.get('alpha_s', 0) * 1e6:.1f} us, "
                 f"beta 1/{1e-9 / fit['beta_s_per_byte']:.1f} GB/s) + measured step time"
                 if fit.get("beta_s_per_byte") else "alpha-beta model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scaling_model.png", dpi=110)
    return "scaling_model.png"


def profile(plt, out, a):
    p = a.get("profile")
    if not p:
        return None
    phases = p["phases"]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ranks = sorted(p["by_ranks"])
    left = [0.0] * len(ranks)
    cmap = plt.get_cmap("tab10")
    for i, ph in enumerate(phases):
        vals = [p["by_ranks"][r].get(ph, 0.0) for r in ranks]
        ax.barh([f"{r} rank{'s' if r > 1 else ''}" for r in ranks], vals, left=left, color=cmap(i), label=ph)
        left = [x + v for x, v in zip(left, vals)]
    ax.set_xlabel("microseconds per step (global batch 128)")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    ax.set_title("where a dp step goes (per rank)")
    fig.tight_layout()
    fig.savefig(out / "profile.png", dpi=110)
    return "profile.png"


def memory(plt, out, a):
    m = a.get("memory")
    if not m:
        return None
    ranks = sorted(m)
    fig, ax = plt.subplots(figsize=(8, 4))
    for key, label in (("ru_maxrss_mib", "peak RSS (ru_maxrss)"), ("rss_anon_mib", "private (RssAnon)"),
                       ("pss_mib", "proportional (Pss)"), ("images_rss_mib", "train images resident (Rss)"),
                       ("images_pss_mib", "train images proportional (Pss)")):
        ax.plot(ranks, [m[r][key] for r in ranks], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ranks")
    ax.set_ylabel("MiB per rank (median over ranks)")
    ax.set_title("memory per rank after one epoch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    return "memory.png"
