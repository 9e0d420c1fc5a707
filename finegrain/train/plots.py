"""Learning-curve PNGs from metrics.jsonl rows (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path


def plot_curves(rows: list[dict], path: Path, keys: tuple[str, ...] = ("filter/sampled_accuracy", "eval/accuracy",
                                                                       "loss/loss", "rollout/response_len")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3.2))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, k in zip(axes, keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 20 else None, ms=3)
        ax.set_title(k)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
