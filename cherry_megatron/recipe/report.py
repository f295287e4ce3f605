"""DIR/report.md (a row per stage) and DIR/report.png (every training stage's held-out curve)."""
from __future__ import annotations

from pathlib import Path


def _fmt(v, spec=""):
    if v is None:
        return "-"
    if isinstance(v, dict):
        return ", ".join(f"{k} {x:.4f}" if isinstance(x, float) else f"{k} {x}" for k, x in v.items())
    return format(v, spec)


def write_report(run_dir: Path, table: dict) -> None:
    lines = [f"# Recipe run {run_dir}", "", "| stage | kind | status | parameters | active | tokens | wall s | "
             "held-out loss |", "|---|---|---|---:|---:|---:|---:|---|"]
    for name, r in table.items():
        lines.append(f"| {name} | {r['kind']} | {r['status']} | {_fmt(r['params'], ',')} | "
                     f"{_fmt(r['active_params'], ',')} | {_fmt(r['tokens'], ',')} | {_fmt(r['wall_s'])} | "
                     f"{_fmt(r['eval_loss'], '.4f')} |")
    curves = {n: r["_curve"] for n, r in table.items() if r.get("_curve")}
    if curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for name, curve in curves.items():
            ax.plot(*zip(*curve), marker="o", ms=3, label=name)
        ax.set(xlabel="step of the stage", ylabel="held-out loss", title="training stages")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / "report.png.tmp.png", dpi=100)
        (run_dir / "report.png.tmp.png").replace(run_dir / "report.png")
        lines += ["", "![held-out loss of every training stage](report.png)"]
    tmp = run_dir / "report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(run_dir / "report.md")
