"""Shrinking SmolLM2-135M to half its non-embedding parameters: Minitron pruning against CHERRY's depth
compression, each retrained on the same tokens with distillation from the unpruned teacher.

    .venv/bin/python tools/experiments/shrink.py [--steps 50] [--only NAME ...] [--out reports]

Students (all about half of the teacher's 106.2 M non-embedding parameters; the tied 28.3 M embedding is kept):
  minitron-width-kd   MLP 1536 -> 640 and heads 9 -> 6 (two of each KV group's three) by activation importance
                      (cherry-prune), then logits distillation (KL only, tau 1: Minitron's recipe);
  minitron-depth-kd   30 -> 15 layers by block importance (BI), then distillation;
  cherry-kd           30 layers averaged into 10 shared blocks unrolled to 30 positions with per-position
                      rank-64 SVD LoRA (cherry-compress), then distillation from the dense teacher;
  cherry-stepwise-kd  the same shape, each block initialised from its group's first layer (RRT's best init);
  random-width-kd     the width shape with random importance, then distillation (is importance worth it?);
  minitron-width-ce   the width student trained on the ground truth only (is the teacher worth it?);
  scratch-width-ce    the width shape from random initialisation, ground truth (is the teacher's weights worth it?).
Every student reads the same batches of the shipped English+code train split in SmolLM2's tokenizer for `steps`
steps; held-out loss (the trainer's eval, every token of the first --eval-tokens of heldout) at step 0 is the
loss right after pruning or compression. Each run is one trainer process, resumed when interrupted; a finished run's
metric rows and its student's parameter counts are recorded in reports/records/shrink/<run>.json (committed), so the
experiment goes on run by run on another machine. Writes reports/shrink.md (+ .png) with the commands.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tools.experiments.common import heldout, recorded, reproduce, run, write_report  # noqa: E402
from tools.experiments.sgt import summarize  # noqa: E402

MODEL = "data/models/smollm2-135m"
TOKENS = "data/tokens/smollm2"
WIDTH = ["--target-ffn", "640", "--target-heads", "6"]
PRUNE = ["tools/prune.py", "--calib", f"{TOKENS}/train_text_document"]
SHAPES = {  # student model dir -> the tool and arguments that make it from the teacher
    "minitron-width": [*PRUNE, *WIDTH, "--importance", "minitron"],
    "minitron-depth": [*PRUNE, "--target-layers", "15", "--depth-importance", "bi"],
    "cherry": ["tools/compress_depth.py", "--target-layers", "10", "--lora-rank", "64", "--init", "average"],
    "cherry-stepwise": ["tools/compress_depth.py", "--target-layers", "10", "--lora-rank", "64", "--init", "stepwise"],
    "random-width": [*PRUNE, *WIDTH, "--importance", "random"],
}
STUDENTS = {  # run -> (its student's model dir, distilled?, from random initialisation?)
    "minitron-width-kd": ("minitron-width", True, False),
    "minitron-depth-kd": ("minitron-depth", True, False),
    "cherry-kd": ("cherry", True, False),
    "cherry-stepwise-kd": ("cherry-stepwise", True, False),
    "random-width-kd": ("random-width", True, False),
    "minitron-width-ce": ("minitron-width", False, False),
    "scratch-width-ce": ("minitron-width", False, True),
}


def student_command(shape: str, out: Path, args) -> list[str]:
    tool = SHAPES[shape]
    extra = ["--calib-samples", str(args.calib_samples), "--seq-length", str(args.seq_length)] \
        if tool[0].endswith("prune.py") else []
    return [tool[0], "--load", MODEL, "--output", str(out), *tool[1:], *extra]


def make_student(cmd: list[str], out: Path) -> None:
    """The student's model dir, re-made when missing (the tools are deterministic). No held-out evaluation
    here: the trainer's step-0 eval is the loss right after shrinking, on the same windows as the rest."""
    if not (out / "config.yaml").exists():
        if out.exists():
            shutil.rmtree(out)  # a tool stopped half-way
        print(f"[{out.name}] {' '.join(cmd)}", flush=True)
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def parameters(model_dir: Path) -> dict:
    """Total and non-embedding parameter counts of a model dir's weights (tied: one embedding)."""
    from safetensors import safe_open

    total = emb = 0
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for name in f.keys():
            n = 1
            for d in f.get_slice(name).get_shape():
                n *= d
            total += n
            emb += n if "embed" in name or name in ("head.weight", "lm_head.weight") else 0  # ours or HF names
    return {"total": total, "non_embedding": total - emb}


def plot(results: dict, teacher: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (name, r) in enumerate(results.items()):
        steps = sorted(r["eval"])
        ax.plot(steps, [r["eval"][s] for s in steps], marker="o", ms=3, color=f"C{i}", label=name,
                ls="-" if name.endswith("-kd") else "--")
    ax.axhline(teacher, color="k", lw=1, label="teacher (SmolLM2-135M)")
    ax.set(xlabel="optimizer step (same batches for every student)", ylabel="held-out loss (English + code)",
           title="half the non-embedding parameters: pruning vs depth compression, retrained", yscale="log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results: dict, params: dict, teacher: dict, args, commands: list[str]) -> str:
    lines = [
        "# Shrinking SmolLM2-135M: Minitron pruning against CHERRY depth compression",
        "",
        f"Generated by `tools/experiments/shrink.py`: every student is about half of SmolLM2-135M-Instruct's "
        f"{params['teacher']['non_embedding'] / 1e6:.1f} M non-embedding parameters, then trained {args.steps} steps "
        f"of {args.batch} x {args.seq_length} tokens ({args.steps * args.batch * args.seq_length:,} tokens, the same "
        f"batches for every student) of the shipped English+code train split, lr {args.lr}, CPU fp32, one process "
        f"each. `-kd`: logits distillation from the teacher only (forward KL, tau 1, distill.ce_weight=0); `-ce`: "
        f"the ground truth only. Held-out: the first {args.eval_tokens} tokens of the English+code held-out split, "
        "every token counted.",
        "",
        "| student | parameters total | non-embedding | held-out right after | after the budget | "
        "teacher's gap closed | median step s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| teacher | {params['teacher']['total']:,} | {params['teacher']['non_embedding']:,} | "
        f"{teacher['loss']:.4f} | - | - | - |",
    ]
    for name, r in results.items():
        p = params[name]
        closed = (r["start"] - r["final"]) / (r["start"] - teacher["loss"])
        lines.append(f"| {name} | {p['total']:,} | {p['non_embedding']:,} | {r['start']:.4f} | {r['final']:.4f} | "
                     f"{closed:.1%} | {r['step_s']:.2f} |")
    best = min(results, key=lambda n: results[n]["final"])
    f = {n: r["final"] for n, r in results.items()}
    lines += [
        "",
        "## What it shows",
        "",
        f"- Best student after the budget: `{best}`, held-out {f[best]:.4f} against the teacher's "
        f"{teacher['loss']:.4f} ({f[best] - teacher['loss']:+.4f}).",
        f"- CHERRY against Minitron at the same budget: `cherry-kd` {f['cherry-kd']:.4f} (stepwise init "
        f"{f['cherry-stepwise-kd']:.4f}), `minitron-width-kd` {f['minitron-width-kd']:.4f}, `minitron-depth-kd` "
        f"{f['minitron-depth-kd']:.4f}; right after shrinking {results['cherry-kd']['start']:.4f} "
        f"({results['cherry-stepwise-kd']['start']:.4f}), {results['minitron-width-kd']['start']:.4f} and "
        f"{results['minitron-depth-kd']['start']:.4f}.",
        f"- Importance: Minitron's against random at the width shape, right after pruning "
        f"{results['minitron-width-kd']['start']:.4f} vs {results['random-width-kd']['start']:.4f}, after the "
        f"budget {f['minitron-width-kd']:.4f} vs {f['random-width-kd']:.4f}.",
        f"- The teacher: distillation against the ground truth from the same pruned weights "
        f"{f['minitron-width-kd']:.4f} vs {f['minitron-width-ce']:.4f}; the pruned weights against random "
        f"initialisation (ground truth both) {f['minitron-width-ce']:.4f} vs {f['scratch-width-ce']:.4f}.",
        f"- Scale: {args.steps * args.batch * args.seq_length:,} tokens is what two CPU cores train in about two "
        "hours for seven students; Minitron distils on ~94 B tokens (2408.11796). The table ranks how much "
        "each way of shrinking keeps and how fast it recovers, not where each would end.",
        "",
        "## Definitions",
        "",
        "- teacher's gap closed = (L_after_shrinking - L_final) / (L_after_shrinking - L_teacher).",
        "- Width importance (cherry_megatron/prune/importance.py): MLP neuron = L2 over samples of the sequence-mean "
        "|down-projection input|; head = the same of its attention output's norm, ranked within its KV group; "
        "depth: BI = 1 - mean cos(layer input, layer output). CHERRY: consecutive layers averaged into shared "
        "blocks (`stepwise`: the group's first layer), each position's residual (its layer minus its block) kept as "
        "a rank-64 truncated SVD (cherry-compress).",
        f"- Calibration: the first {args.calib_samples} windows of {args.seq_length} tokens of the train split.",
        *reproduce(commands, "shrink.png", "held-out loss of each student"),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--only", nargs="+", default=[], help="run only these students")
    p.add_argument("--runs", default="runs/experiments/shrink")
    p.add_argument("--out", default="reports")
    args = p.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    records = out / "records" / "shrink"
    common = [f"data.paths=[{TOKENS}/train_text_document]", f"data.eval_path={TOKENS}/heldout_text_document",
              f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}",
              f"train.seq_length={args.seq_length}", f"train.lr={args.lr}",
              f"train.warmup_steps={max(1, args.steps // 10)}", f"train.eval_interval={max(1, args.steps // 5)}",
              f"train.eval_tokens={args.eval_tokens}", f"train.save_interval={max(1, args.steps // 2)}",
              "train.log_interval=5"]
    teacher = recorded(records / "teacher.json", f"evaluate {MODEL} {args.seq_length} {args.eval_tokens}",
                       lambda: {**heldout(MODEL, f"{TOKENS}/heldout_text_document", args.seq_length,
                                          args.eval_tokens), "params": parameters(Path(MODEL))})
    results, params = {}, {"teacher": teacher["params"]}
    commands = [" ".join(["python tools/experiments/shrink.py", *sys.argv[1:]]), "# which runs:"]
    for name, (shape, distil, scratch) in STUDENTS.items():
        student = runs / "students" / shape
        make = student_command(shape, student, args)
        sets = common + ([f"distill.teacher={MODEL}", "distill.ce_weight=0"] if distil else []) + \
            (["model.init_from="] if scratch else [])
        command = f"python -m cherry_megatron.train --config {student}/config.yaml --run-dir {runs / name} " \
                  f"--set train.steps={args.steps} {' '.join(sets)}"
        commands += [c for c in (f"python {' '.join(make)}",) if c not in commands] + [command]
        if args.only and name not in args.only:
            continue

        def produce(name=name, make=make, student=student, sets=sets) -> dict:
            make_student(make, student)
            rows = run(name, runs / name, f"{student}/config.yaml", args.steps, sets)
            if (runs / name / "checkpoints").exists():
                shutil.rmtree(runs / name / "checkpoints")  # the metrics and config stay
            return {"rows": rows, "params": parameters(student)}

        rec = recorded(records / f"{name}.json", " && ".join([" ".join(make), command]), produce)
        results[name], params[name] = summarize(rec["rows"]), rec["params"]
    if args.only:
        return
    out.mkdir(parents=True, exist_ok=True)
    plot(results, teacher["loss"], out / "shrink.png")
    write_report(out / "shrink.md", report(results, params, teacher, args, commands))
    print(f"wrote {out / 'shrink.md'}", flush=True)


if __name__ == "__main__":
    main()
