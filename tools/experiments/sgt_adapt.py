"""SGT on a real model: SmolLM2-135M continued-pretrained on Korean, full supervision against 15% under each
policy and sampling mode.

    .venv/bin/python tools/experiments/sgt_adapt.py [--steps 30] [--ratio 0.15] [--only NAME ...] [--out reports]

Every run starts from the shipped teacher (data/models/smollm2-135m, `make model`) and reads the same batches of
the Korean train split in the teacher's own tokenizer (data/tokens/smollm2/train_ko_text_document) for `steps`
steps, except `full-15pct` (round(ratio * steps) steps: the same number of supervised tokens as SGT):
  full, full-15pct, sgt-random, and sgt-<policy>-<sampling> for frequency, payload, loss, excess under top,
  poisson and conditional (excess's frozen reference: full-15pct's final checkpoint, as in reports/sgt.md).
Held-out Korean loss is the trainer's eval (all tokens of the first --eval-tokens of heldout_ko); held-out English
(forgetting) is `cherry_megatron.evaluate` on heldout_en after the run. Each run is one trainer process, resumed
when interrupted, skipped when done; a finished run's checkpoint is deleted once both losses are recorded (the
reference's is kept). A finished run's metric rows and English loss are recorded in
reports/records/sgt_adapt/<run>.json (committed), so the experiment goes on run by run on another machine; a record
of a different command is redone. `--only` runs a subset (the report is written when every run is done).
Writes reports/sgt_adapt.md (+ .png) with the commands to reproduce.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tools.experiments.common import heldout, policy_runs, recorded, reproduce, run, write_report  # noqa: E402
from tools.experiments.sgt import summarize  # noqa: E402

MODEL = "data/models/smollm2-135m"
TOKENS = "data/tokens/smollm2"
POLICIES = ("frequency", "payload", "loss", "excess")
SAMPLING = ("top", "poisson", "conditional")


def plan(args, runs: Path) -> list[tuple[str, int, list[str]]]:
    short = max(1, round(args.ratio * args.steps))
    sgt = [f"sgt.ratio={args.ratio}", f"sgt.probe_interval={args.probe}"]
    out = [("full", args.steps, []), ("full-15pct", short, [f"train.eval_interval={short}",
                                                            f"train.save_interval={short}"]),
           ("sgt-random", args.steps, sgt + ["sgt.policy=random"])]
    out += policy_runs(args.steps, sgt, runs / "full-15pct", POLICIES, SAMPLING)
    # The same runs with another draw of positions (sgt.seed): how far apart two draws alone put a run
    out += [("sgt-random-draw2", args.steps, sgt + ["sgt.policy=random", "sgt.seed=1"]),
            ("sgt-frequency-poisson-draw2", args.steps, sgt + ["sgt.policy=frequency", "sgt.sampling=poisson",
                                                               "sgt.seed=1"])]
    return out


def english_loss(load: str, record: Path, args) -> float:
    """Held-out English loss of `load` (a run's final checkpoint, or the teacher), recorded in `record`."""
    if not record.exists():
        result = heldout(load, f"{TOKENS}/heldout_en_text_document", args.seq_length, args.en_tokens, 4)
        write_report(record, json.dumps(result))
    return json.loads(record.read_text())["loss"]


def korean_in_the_tokenizer() -> dict:
    """How SmolLM2's tokenizer holds the Korean train split: distinct pieces used, the share that `payload` counts
    as content, and the share of pieces that are a fragment of a character (bytes that decode to no text)."""
    import numpy as np
    from tokenizers import Tokenizer

    from cherry_megatron.data.indexed import token_stream
    from cherry_megatron.payload import content_pieces

    counts = np.bincount(np.asarray(token_stream(f"{TOKENS}/train_ko_text_document")), minlength=49152)
    tok = Tokenizer.from_file(f"{MODEL}/tokenizer.json")
    used = np.flatnonzero(counts)
    fragment = np.array(["\ufffd" in tok.decode([int(i)]) for i in used])
    return {"tokens": int(counts.sum()), "distinct": len(used),
            "content": float(counts[content_pieces(MODEL, len(counts))].sum() / counts.sum()),
            "fragments": float(counts[used[fragment]].sum() / counts.sum())}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5.5))
    styles = {"top": ":", "poisson": "-", "conditional": "--"}
    for i, (name, r) in enumerate(results.items()):
        mode = name.rsplit("-", 1)[-1]
        steps = sorted(r["eval"])
        a.plot(steps, [r["eval"][s] for s in steps], marker="o", ms=3, ls=styles.get(mode, "-"),
               color="k" if name.startswith("full") else f"C{i % 10}", label=name, lw=2 if name == "full" else 1)
        b.scatter(r["final"], r["en"], color="k" if name.startswith("full") else f"C{i % 10}", label=name,
                  marker={"top": "v", "poisson": "o", "conditional": "s"}.get(mode, "*"))
    a.set(xlabel="optimizer step (same Korean batches for every run)", ylabel="held-out Korean loss, all tokens",
          title="SmolLM2-135M adapting to Korean")
    a.legend(fontsize=7, ncol=2)
    a.grid(alpha=0.3)
    b.set(xlabel="final held-out Korean loss (lower: adapted)", ylabel="final held-out English loss (lower: kept)",
          title="adaptation against forgetting")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results: dict, args, en_start: float, commands: list[str], png: str, ko: dict) -> str:
    full = results["full"]
    red_full = full["start"] - full["final"]
    lines = [
        "# SGT on a real model: SmolLM2-135M adapting to Korean",
        "",
        f"Generated by `tools/experiments/sgt_adapt.py`: continued pretraining of SmolLM2-135M-Instruct (the shipped "
        f"teacher, `make model`) on the shipped Korean train split in its own tokenizer, {args.steps} steps of "
        f"{args.batch} x {args.seq_length} tokens (the same batches for every run), lr {args.lr}, SGT ratio "
        f"{args.ratio}, CPU fp32, one process per run. Held-out Korean: the first {args.eval_tokens} tokens of "
        f"heldout_ko, every token counted; held-out English (forgetting): the first {args.en_tokens} tokens of "
        "heldout_en.",
        "",
        "| run | supervised share | Korean held-out | recovered fraction | per-supervised-token efficiency | "
        "English held-out | English change | gamma-bar | median step s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        share = 1.0 if name == "full" else args.ratio
        r["recovered"] = (r["start"] - r["final"]) / red_full
        gb = f"{r['gamma_bar']:.3f}" if "gamma_bar" in r else "-"
        lines.append(f"| {name} | {share:.2f} | {r['final']:.4f} | {r['recovered']:.3f} | "
                     f"{r['recovered'] / share:.2f} | {r['en']:.4f} | {r['en'] - en_start:+.4f} | {gb} | "
                     f"{r['step_s']:.2f} |")
    sgt_runs = {n: r for n, r in results.items() if n.startswith("sgt-") and not n.endswith("-draw2")}
    noise = {n: abs(results[n]["final"] - results[f"{n}-draw2"]["final"])
             for n in ("sgt-random", "sgt-frequency-poisson")}
    best = max(sgt_runs, key=lambda n: sgt_runs[n]["recovered"])
    rnd = results["sgt-random"]["recovered"]
    beat = [n for n, r in sgt_runs.items() if n != "sgt-random" and r["recovered"] > rnd]
    by_mode = {m: [n for n in sgt_runs if n.endswith(f"-{m}")] for m in SAMPLING}
    mean = {m: sum(sgt_runs[n]["recovered"] for n in ns) / len(ns) for m, ns in by_mode.items() if ns}
    lines += [
        "",
        f"Untrained (the teacher): Korean {full['start']:.4f}, English {en_start:.4f}. Full supervision lowered "
        f"Korean by {red_full:.4f}. The Korean train split is {ko['tokens']:,} tokens in SmolLM2's tokenizer, "
        f"{ko['distinct']:,} distinct pieces; {ko['fragments']:.1%} of its tokens are fragments of a character "
        f"(a Hangul syllable is 3 UTF-8 bytes, the BPE merges few), and `payload` counts {ko['content']:.1%} as "
        "content, so on this tokenizer it is `frequency` without spaces and punctuation.",
        "",
        "## What it shows",
        "",
        f"- Best SGT run: `{best}`, {sgt_runs[best]['recovered']:.1%} of full supervision's Korean reduction "
        f"({sgt_runs[best]['recovered'] / args.ratio:.2f}x per supervised token); `sgt-random` {rnd:.1%}; full "
        f"supervision on {args.ratio:.0%} of the steps {results['full-15pct']['recovered']:.1%}.",
        "- Content policies that beat random: " + (", ".join(f"`{n}` ({sgt_runs[n]['recovered']:.1%})" for n in beat)
                                                   if beat else "none.") ,
        "- Mean recovered fraction of the four content policies by sampling mode: " +
        ", ".join(f"{m} {v:.1%}" for m, v in mean.items()) + ".",
        "- Draw noise: the same run with another draw of positions (`sgt.seed=1`, `-draw2`) ends " +
        ", ".join(f"{noise[n]:.4f} apart for `{n}` ({noise[n] / red_full:.1%} of full's reduction)" for n in noise)
        + "; Korean differences below these are within what the draw alone moves.",
        "",
        "## Definitions",
        "",
        "- recovered fraction = (L_teacher - L_run) / (L_teacher - L_full) on held-out Korean; efficiency = "
        "recovered / supervised share. English change = L_en(run) - L_en(teacher): positive is forgetting.",
        "- Sampling (`sgt.sampling`): `top` the round(ratio n) best-scored positions per sequence, their mean loss "
        "(biased); `poisson` each position with pi = min(1, c s^(1/T)), T = 1, expected count ratio n, losses "
        "weighted 1/pi (Horvitz-Thompson: unbiased for the full loss); `conditional` exactly round(ratio n) with "
        "the same pi (conditional Poisson sampling, cherry_megatron/sgt_sampling.py).",
        "- Policies and their scores s: `random` uniform; `frequency` -log unigram probability of the target (counts "
        "of the Korean train split); `payload` the same, function pieces scored as the most frequent piece (for "
        "SmolLM2's byte-level BPE nearly every Korean piece is a fragment of a syllable and counts as payload: "
        "cherry_megatron/payload.py); `loss` the current per-token loss; `excess` current minus reference loss "
        "(s = exp(excess) under sampling), the reference being `full-15pct`'s final checkpoint.",
        f"- gamma-bar: mean over the run's probes (every {args.probe} steps) of the cosine between the gradients of "
        "the supervised and the unsupervised positions' mean losses (reports/sgt.md defines it).",
        "- Step times are medians of the logged steps; the probe steps' extra passes are not in them.",
        *reproduce(commands, png, "Korean held-out loss and forgetting"),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--probe", type=int, default=15)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--en-tokens", type=int, default=4096)
    p.add_argument("--only", nargs="+", default=[], help="run only these runs (names as in the table)")
    p.add_argument("--runs", default="runs/experiments/sgt_adapt")
    p.add_argument("--out", default="reports")
    args = p.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    common = [f"data.paths=[{TOKENS}/train_ko_text_document]", f"data.eval_path={TOKENS}/heldout_ko_text_document",
              f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}",
              f"train.seq_length={args.seq_length}", f"train.lr={args.lr}",
              f"train.warmup_steps={max(1, args.steps // 10)}", f"train.eval_interval={args.steps}",
              f"train.eval_tokens={args.eval_tokens}", f"train.save_interval={max(1, args.steps // 2)}",
              "train.log_interval=5"]
    records = out / "records" / "sgt_adapt"
    en_start = recorded(records / "teacher.json", f"english {MODEL} {args.en_tokens}",
                        lambda: {"en": english_loss(MODEL, runs / "teacher_eval_en.json", args)})["en"]
    results, commands = {}, [" ".join(["python tools/experiments/sgt_adapt.py", *sys.argv[1:]]), "# which runs:"]
    reference = plan(args, runs)[1]
    for name, steps, sets in plan(args, runs):
        command = (f"python -m cherry_megatron.train --config {MODEL} --run-dir {runs / name} --set "
                   f"train.steps={steps} {' '.join(common + sets)}")
        commands.append(command)
        if args.only and name not in args.only:
            continue

        def produce(name=name, steps=steps, sets=sets) -> dict:
            if any(s.startswith("sgt.reference=") for s in sets) and not (runs / "full-15pct/checkpoints").exists():
                # The frozen reference's checkpoint left with an earlier machine: train it again (deterministic)
                run(reference[0], runs / "full-15pct", MODEL, reference[1], common + reference[2])
            rows = run(name, runs / name, MODEL, steps, common + sets)
            en = english_loss(str(runs / name), runs / name / "eval_en.json", args)
            if name != "full-15pct" and (runs / name / "checkpoints").exists():
                shutil.rmtree(runs / name / "checkpoints")  # 1.6 GB each; metrics, config and both losses stay
            return {"rows": rows, "en": en}

        r = recorded(records / f"{name}.json", command, produce)
        results[name] = {**summarize(r["rows"]), "en": r["en"]}
        print(json.dumps({name: {k: results[name][k] for k in ("final", "en")}}), flush=True)
    if args.only:
        return
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "sgt_adapt.png")
    commands.append(f"python -m cherry_megatron.evaluate --load RUN_DIR --data {TOKENS}/heldout_en_text_document "
                    f"--seq-length {args.seq_length} --max-tokens {args.en_tokens} --batch-size 4")
    text = report(results, args, en_start, commands, "sgt_adapt.png", korean_in_the_tokenizer())
    write_report(out / "sgt_adapt.md", text)
    print(text)


if __name__ == "__main__":
    main()
