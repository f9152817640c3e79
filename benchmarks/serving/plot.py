"""The Pareto plot of a results JSON: TPM/GPU against tokens/s per user, with the envelope and roofline."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_pareto(results: dict[str, Any], path: str | Path) -> Path:
    """Write the PNG; needs matplotlib (``pip install matplotlib``, the ``bench`` extra)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("the plot needs matplotlib: pip install matplotlib (or tokenspeed[bench])") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    runs = [r for r in results.get("runs", []) if r.get("tokens_per_s_per_user") and r.get("tpm_per_gpu")]
    ys: list[float] = []
    if runs:
        xs, yv = [r["tokens_per_s_per_user"] for r in runs], [r["tpm_per_gpu"] for r in runs]
        ys += yv
        ax.scatter(xs, yv, color="tab:blue", zorder=3, label=f"measured ({results.get('label', 'server')})")
        for r, x, y in zip(runs, xs, yv, strict=True):
            ax.annotate(f"c={r['concurrency']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    env = results.get("envelope") or []
    if len(env) > 1:
        ax.plot([p[0] for p in env], [p[1] for p in env], color="tab:blue", lw=1.5, label="measured envelope")
    roof = results.get("roofline") or {}
    for key, style, label in (
        ("frontier", "-", "roofline (decode + trace prefill)"),
        ("frontier_decode_only", "--", "roofline (decode only)"),
    ):
        pts = roof.get(key) or []
        if pts:
            ax.plot(
                [p["tokens_per_s_per_user"] for p in pts],
                [p["tpm_per_gpu"] for p in pts],
                style,
                color="tab:red",
                lw=1.2,
                label=label,
            )
            ys += [p["tpm_per_gpu"] for p in pts]
    hf = results.get("hf_baseline") or {}
    if hf.get("tokens_per_s_per_user"):
        y = hf["tokens_per_s_per_user"] * 60.0
        ys.append(y)
        ax.scatter(
            [hf["tokens_per_s_per_user"]],
            [y],
            marker="x",
            s=60,
            color="tab:green",
            zorder=3,
            label="HF transformers generate (1 user)",
        )
    for f in results.get("floors", []):
        ax.axvline(f["floor_tokens_per_s"], color="gray", ls=":", lw=1)
        if f.get("reached") and f.get("tpm_per_gpu"):
            ax.scatter([f["floor_tokens_per_s"]], [f["tpm_per_gpu"]], marker="D", s=25, color="black", zorder=4)
    ax.set_xlabel("tokens/s per user (1000 / mean TPOT ms)")
    ax.set_ylabel("output tokens per minute per GPU (steady state)")
    positive = [y for y in ys if y > 0]
    if positive and max(positive) / min(positive) > 50:
        ax.set_yscale("log")
    # the roofline can run far right of what was measured (batch 1 on a tiny model): keep the measurements readable
    seen = [r["tokens_per_s_per_user"] for r in runs] + [f["floor_tokens_per_s"] for f in results.get("floors", [])]
    if hf.get("tokens_per_s_per_user"):
        seen.append(hf["tokens_per_s_per_user"])
    roof_x = [p["tokens_per_s_per_user"] for p in roof.get("frontier_decode_only") or []]
    right = max(roof_x + seen) if roof_x else None
    if seen and right is not None and right > 4 * max(seen):
        right = 4 * max(seen)
    ax.set_xlim(left=0, right=right * 1.05 if right else None)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    ax.set_title(results.get("title", "agentic serving: throughput vs per-user speed"), fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
