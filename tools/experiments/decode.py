"""Decoding on real models: KV caching, self-speculative decoding with trained exits, and depth-wise batching
of the recurrent model compressed from SmolLM2-135M.

    .venv/bin/python tools/experiments/decode.py [--steps 40] [--only NAME ...] [--out reports]

Models:
  smollm2          the published model, its exits untrained (the head read after layer D as it is);
  smollm2-exits    SmolLM2 trained --steps steps with early-exit losses at layers 8 and 15 (LayerSkip) and exit
                   distillation (KL of each exit to the detached final distribution, RRT), final loss kept;
  cherry-exits     30 layers -> 10 shared blocks with rank-64 LoRA (cherry-compress), distilled from SmolLM2 with
                   exit distillation at positions 10 and 20 (RRT's uptraining with exits).
Each is benchmarked by bench/decode.py in its own process (batch 1 greedy: caching, self-speculative D:K;
the recurrent one also depth-wise vs sequence-wise batching). A finished model's bench JSON is recorded in
reports/records/decode/<model>.json (committed); the report is reports/decode.md (+ .png).
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
from tools.experiments.common import recorded, reproduce, run, write_report  # noqa: E402

MODEL = "data/models/smollm2-135m"
TOKENS = "data/tokens/smollm2"
SPECS = {"smollm2": ["4:2", "8:2", "8:4", "15:4"], "smollm2-exits": ["4:2", "8:2", "8:4", "15:4"],
         "cherry-exits": ["10:2", "10:4", "20:4"]}


def train_sets(args, exits: list[int]) -> list[str]:
    return [f"data.paths=[{TOKENS}/train_text_document]", f"data.eval_path={TOKENS}/heldout_text_document",
            f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}",
            f"train.seq_length={args.seq_length}", f"train.warmup_steps={max(1, args.steps // 10)}",
            f"train.eval_interval={args.steps}", f"train.eval_tokens={args.eval_tokens}",
            f"train.save_interval={args.steps}", "train.log_interval=5", f"train.exit_depths={exits}",
            f"train.exit_loss_weights={[0.0] * len(exits)}", "train.exit_distill_weight=1.0"]


def bench(load: str, specs: list[str], args) -> dict:
    cmd = [sys.executable, "bench/decode.py", "--load", load, "--data", f"{TOKENS}/heldout_text_document",
           "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
           "--spec", *specs, "--rows", str(args.rows), "--requests", str(args.rows)]
    print(f"[bench] {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench on {load} failed:\n{proc.stderr[-3000:]}")
    print(proc.stdout, flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(load: str, depths: list[int], tokens: int = 1024) -> dict:
    """Teacher-forced: the share of the first `tokens` held-out positions where the head read after depth D
    picks the full-depth greedy token (what bounds a D-unit drafter's acceptance), and the full depth's
    top-1 accuracy. In a child process (this one holds no torch world)."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from tools.experiments.decode import _agreement; "
            f"print(json.dumps(_agreement({load!r}, {depths!r}, {tokens})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"agreement on {load} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _agreement(load: str, depths: list[int], tokens: int) -> dict:
    import contextlib

    import numpy as np
    import torch

    from cherry_megatron import distributed
    from cherry_megatron.config import ParallelConfig
    from cherry_megatron.convert.load import load_model
    from cherry_megatron.data.indexed import token_stream
    from cherry_megatron.generate.cache import full_logits

    with contextlib.redirect_stdout(sys.stderr):
        distributed.init(ParallelConfig(tp=1))
        try:
            model, cfg = load_model(load)
            model.eval()
            ids = torch.tensor(np.asarray(token_stream(f"{TOKENS}/heldout_text_document")[:tokens + 1], dtype=np.int64))
            picks, seq = {}, cfg.train.seq_length
            with torch.no_grad():
                for d in [*depths, None]:
                    out = []
                    for i in range(0, tokens, seq):
                        x = model.embed(ids[None, i:min(i + seq, tokens)])
                        out.append(full_logits(model, model.unroll(x, model.context(x), end=d), cfg.model.vocab_size)
                                   .argmax(-1)[0])
                    picks[d] = torch.cat(out)
        finally:
            distributed.shutdown()
    full = picks.pop(None)
    return {"tokens": tokens, "full_accuracy": round(float((full == ids[1:tokens + 1]).float().mean()), 4),
            **{f"agreement_d{d}": round(float((p == full).float().mean()), 4) for d, p in picks.items()}}


def prepare(name: str, runs: Path, args) -> str:
    """The model dir or run dir to benchmark, trained first where the model needs it."""
    if name == "smollm2":
        return MODEL
    if name == "smollm2-exits":
        sets = train_sets(args, [8, 15]) + [f"train.lr={args.lr / 3}"]
        run(name, runs / name, MODEL, args.steps, sets)
        return str(runs / name)
    student = runs / "students" / "cherry"
    if not (student / "config.yaml").exists():
        shutil.rmtree(student, ignore_errors=True)
        cmd = [sys.executable, "tools/compress_depth.py", "--load", MODEL, "--output", str(student),
               "--target-layers", "10", "--lora-rank", "64", "--init", args.cherry_init]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    sets = train_sets(args, [10, 20]) + [f"train.lr={args.lr}", f"distill.teacher={MODEL}", "distill.ce_weight=0"]
    run(name, runs / name, f"{student}/config.yaml", args.steps, sets)
    return str(runs / name)


def report(results: dict, args, commands: list[str]) -> str:
    lines = ["# Decoding: KV caching, self-speculative decoding, depth-wise batching", "",
             f"Generated by `tools/experiments/decode.py`: batch-1 greedy decoding of {args.prompts} held-out prompts "
             f"of 64 tokens, {args.new_tokens} new tokens each, medians of {args.repeats} runs after a warm-up, "
             "2 CPU threads, fp32 (bench/decode.py).", "",
             "| model | depth | cached tokens/s | caching (vs no cache) | best D:K | speculative vs cached | "
             "acceptance | tokens per round | same tokens |", "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        specs = {k: v for k, v in r.items() if k.startswith("spec_")}
        best = max(specs, key=lambda k: specs[k]["ratio_speculative"])
        b = specs[best]
        lines.append(f"| {name} | {r['depth']} | {r['cached_tokens_per_s']:.1f} | "
                     f"{r.get('ratio_caching', float('nan')):.2f}x | {best[6:].replace('_k', ':')} | "
                     f"{b['ratio_speculative']:.2f}x | {b['acceptance']:.2f} | {b['tokens_per_round']:.2f} | "
                     f"{b['agreement']:.0%} |")
    lines += ["", "Every D:K:", "", "| model | D:K | tokens/s | vs cached | acceptance | tokens/round | "
              "unit passes per token |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        for k, v in r.items():
            if k.startswith("spec_"):
                lines.append(f"| {name} | {k[6:].replace('_k', ':')} | {v['tokens_per_s']:.1f} | "
                             f"{v['ratio_speculative']:.2f}x | {v['acceptance']:.2f} | {v['tokens_per_round']:.2f} | "
                             f"{v['unit_passes_per_token']:.1f} (full {r['depth']}) |")
    lines += ["", "How good the drafters are, teacher-forced on the first 1,024 held-out tokens: the share of positions "
              "where the head read after D units picks the full-depth greedy token (a D-unit drafter's first token is "
              "accepted that often), and the full depth's top-1 accuracy:", "",
              "| model | full-depth accuracy | " + " | ".join(f"D={d}" for d in (4, 8, 10, 15, 20)) + " |",
              "|---|---:|" + "---:|" * 5]
    for name, r in results.items():
        e = r.get("exits", {})
        lines.append(f"| {name} | {e.get('full_accuracy', float('nan')):.3f} | " +
                     " | ".join(f"{e[f'agreement_d{d}']:.3f}" if f"agreement_d{d}" in e else "-" for d in (4, 8, 10, 15, 20))
                     + " |")
    dw = {n: r["depthwise"] for n, r in results.items() if "depthwise" in r}
    if dw:
        lines += ["", f"Depth-wise batching ({args.rows} requests in {args.rows} rows, exits by confidence, "
                  "copy-state KV) against sequence-wise batching at full depth:", "",
                  "| model | schedule | tokens/s | vs sequence-wise | mean depth | exits | same tokens | "
                  "held-out loss (teacher-forced) |", "|---|---|---:|---:|---:|---|---:|---:|"]
        for name, d in dw.items():
            lines.append(f"| {name} | sequence-wise | {d['sequence_tokens_per_s']:.1f} | 1.00x | - | - | 100% | "
                         f"{d['full_depth_heldout_loss']:.4f} |")
            for k, v in d.items():
                if isinstance(v, dict) and "ratio_depthwise" in v:
                    lines.append(f"| {name} | depth-wise {k} | {v['tokens_per_s']:.1f} | {v['ratio_depthwise']:.2f}x | "
                                 f"{v['mean_depth']:.1f} | {v['exits']} | {v['agreement']:.0%} | {v['heldout_loss']:.4f} |")
    lines += findings(results, args)
    lines += ["", "## Definitions", "",
              "- caching: cached decoding against re-running the whole prefix per token at full depth.",
              "- speculative D:K: the first D layer units and the shared head draft K tokens, the remaining units "
              "verify them in one pass; acceptance = accepted / drafted; the output is the greedy one (same tokens "
              "100% by construction, checked).",
              "- depth-wise: one shared block per tick over every row at one of its positions; a row exits at an exit "
              "depth when its top probability passes the threshold; deeper keys/values of an exited token come from "
              "its exited stream (copy-state). Held-out loss: the same schedule teacher-forced on the prompts' true "
              "continuations.",
              *reproduce(commands, "decode.png", "decoding speed against cached full depth")]
    return "\n".join(lines) + "\n"


def findings(results: dict, args) -> list[str]:
    """The report's reading of its own figures (numbers from the records, nothing typed in)."""
    out = ["", "## What it shows", ""]
    caching = [r["ratio_caching"] for r in results.values() if "ratio_caching" in r]
    out.append(f"- KV caching pays: {min(caching):.2f}x-{max(caching):.2f}x over re-running the prefix per token "
               f"({args.new_tokens} new tokens after 64).")
    best = max(((v["ratio_speculative"], n, k[6:].replace("_k", ":"), v) for n, r in results.items()
                for k, v in r.items() if k.startswith("spec_")), key=lambda t: t[0])
    agree = {n: max((v for k, v in r.get("exits", {}).items() if k.startswith("agreement_")), default=float("nan"))
             for n, r in results.items()}
    out.append(f"- Self-speculative decoding does not pay here: the best is {best[0]:.2f}x ({best[1]}, D:K {best[2]}, "
               f"acceptance {best[3]['acceptance']:.2f}); the output is the greedy one every time. Drafts are "
               "accepted only as often as the exit agrees with the full depth, and the best exits agree on "
               + ", ".join(f"{n} {a:.0%}" for n, a in agree.items()) + " of held-out positions (teacher-forced). A "
               "round costs K drafts of D/L of a pass plus one verification pass, so at D:K 8:2 on 30 layers it "
               "needs about 1.5 tokens a round to break even and 3 (every draft accepted) for 2x: exits that "
               "agree 80-90% of the time, which LayerSkip gets from early-exit losses and layer dropout over "
               "continued pretraining, not from the " + str(args.steps) + " steps of exit training here "
               "(agreement after them: +" + ", +".join(
                   f"{results['smollm2-exits']['exits'][k] - results['smollm2']['exits'].get(k, 0):.0%} at {k[11:]}"
                   for k in results.get("smollm2-exits", {}).get("exits", {}) if k.startswith("agreement_d")
                   and "smollm2" in results) + ").")
    dw = results.get("cherry-exits", {}).get("depthwise")
    if dw:
        ex = results["cherry-exits"].get("exits", {})
        out.append(f"- Depth-wise batching could not be tested as a speed-up: the compressed student after {args.steps} "
                   f"steps is not yet a language model (full-depth top-1 accuracy {ex.get('full_accuracy', 0):.1%}, "
                   f"teacher-forced held-out loss {dw['full_depth_heldout_loss']:.2f}; reports/shrink.md's students "
                   "needed 50 steps to reach about 7), so no row was ever confident at an exit and every token ran all "
                   f"30 positions. What it does show is the schedule's own cost: with exits off it runs at "
                   f"{dw['no_exit']['ratio_depthwise']:.2f}x of sequence-wise batching on the same kernels, with the "
                   "same tokens.")
    for note in args.note:
        out.append(f"- Note: {note}")
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = [], []
    for name, r in results.items():
        for k, v in r.items():
            if k.startswith("spec_"):
                labels.append(f"{name}\nspec {k[6:].replace('_k', ':')}")
                values.append(v["ratio_speculative"])
        for k, v in r.get("depthwise", {}).items():
            if isinstance(v, dict) and "ratio_depthwise" in v:
                labels.append(f"{name}\ndepth-wise {k}")
                values.append(v["ratio_depthwise"])
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(labels)), 5))
    ax.bar(range(len(values)), values, color=["C0" if "spec" in lab else "C1" for lab in labels])
    ax.axhline(1.0, color="k", lw=1)
    ax.set_xticks(range(len(labels)), labels, rotation=70, fontsize=7)
    ax.set(ylabel="tokens/s against the baseline (cached full depth / sequence-wise batching)",
           title="decoding speed-ups, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--cherry-init", default="stepwise")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--only", nargs="+", default=[])
    p.add_argument("--note", action="append", default=[], help="a line the report adds under its findings")
    p.add_argument("--runs", default="runs/experiments/decode")
    p.add_argument("--out", default="reports")
    args = p.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    commands = [" ".join(["python tools/experiments/decode.py", *sys.argv[1:]])]
    results = {}
    for name, specs in SPECS.items():
        if args.only and name not in args.only:
            continue
        key = f"{name} steps={args.steps} lr={args.lr} init={args.cherry_init} prompts={args.prompts} " \
              f"new={args.new_tokens} repeats={args.repeats} rows={args.rows} specs={specs}"
        results[name] = recorded(out / "records" / "decode" / f"{name}.json", key,
                                 lambda name=name, specs=specs: bench(prepare(name, runs, args), specs, args))
        depths = sorted({int(s.split(":")[0]) for s in specs})
        results[name]["exits"] = recorded(out / "records" / "decode" / f"{name}-agreement.json", f"{key} agreement",
                                          lambda name=name, depths=depths: agreement(prepare(name, runs, args), depths))
    if args.only:
        return
    plot(results, out / "decode.png")
    write_report(out / "decode.md", report(results, args, commands))
    print(f"wrote {out / 'decode.md'}", flush=True)


if __name__ == "__main__":
    main()
