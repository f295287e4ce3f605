"""Balanced multilingual data: natural, temperature 3.33 and UniMax (N = 1, 4) blends at the same token budget.

    .venv/bin/python tools/experiments/multilingual.py [--steps 250] [--runs runs/experiments/multilingual]
        [--out reports]

The shipped multilingual corpus (`make data`: 12 natural languages + code, data/multilingual, its UniMax-
balanced tokenizer). Each blend is computed by tools/build_blend.py over the train splits with the run's token
budget, a tiny model (the `tiny` preset in the multilingual tokenizer) trains on it for the same steps and
batches, then every language is evaluated on its held-out split and on the first tokens of its train split (the
gap shows over-repetition on the small languages). Each finished run is recorded in
reports/records/multilingual/<blend>.json (resumable run by run); writes reports/multilingual.md + .png. Also
reports the fertility (characters per token) of the shipped tokenizers on every language's held-out text.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tools.experiments.common import recorded, reproduce, run, write_report  # noqa: E402

from cherry_megatron.distributed import child_env  # noqa: E402

ML = Path("data/multilingual")
TOKENIZER = ML / "tokenizer" / "multi8k.model"
BLENDS = {"natural": ["--method", "natural"], "temperature-3.33": ["--method", "temperature", "--temperature", "3.33"],
          "unimax-1": ["--method", "unimax", "--max-epochs", "1"], "unimax-4": ["--method", "unimax", "--max-epochs", "4"]}
SEQ, GBS, MBS = 256, 16, 8
EVAL_TOKENS = 2048  # per language: the smallest held-out split holds ~2,100 tokens


def languages() -> list[str]:
    return sorted(p.name[len("train_"):-len("_text_document.bin")] for p in (ROOT / ML / "tokens").glob("train_*_text_document.bin"))


def _json_line(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[1:3])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def blend(name: str, langs: list[str], budget: int, out: Path) -> dict:
    return _json_line([sys.executable, "tools/build_blend.py", "--inputs",
                       *(f"{lang}={ML}/tokens/train_{lang}_text_document" for lang in langs), *BLENDS[name],
                       "--budget", str(budget), "--output", str(out)])


def per_language(load: Path, split: str, langs: list[str]) -> dict:
    r = _json_line([sys.executable, "-m", "cherry_megatron.evaluate", "--load", str(load), "--data",
                    *(f"{lang}={ML}/tokens/{split}_{lang}_text_document" for lang in langs),
                    "--max-tokens", str(EVAL_TOKENS)])
    return {lang: v["loss"] for lang, v in r["languages"].items()}


def one_blend(name: str, runs: Path, steps: int, langs: list[str]) -> dict:
    runs.mkdir(parents=True, exist_ok=True)
    plan = blend(name, langs, steps * GBS * SEQ, runs / f"{name}.yaml")
    run_dir = runs / name
    rows = run(name, run_dir, "tiny", steps, [
        "data.paths=[]", f"data.blend_file={runs / f'{name}.yaml'}", f"data.tokenizer_model={TOKENIZER}",
        f"data.eval_path={ML}/tokens/heldout_text_document", f"train.global_batch_size={GBS}",
        f"train.micro_batch_size={MBS}", f"train.seq_length={SEQ}", "train.eval_tokens=16384", "train.eval_interval=50",
        "train.log_interval=10", f"train.save_interval={steps}"])
    last = [r for r in rows if "lang_tokens" in r][-1]
    return {"plan": plan, "lang_tokens": last["lang_tokens"], "lang_epochs": last["lang_epochs"],
            "curve": [[r["step"], r["eval_loss"]] for r in rows if r.get("eval_loss") is not None],
            "heldout": per_language(run_dir, "heldout", langs), "train": per_language(run_dir, "train", langs)}


def fertility(langs: list[str]) -> list[dict]:
    out = []
    for model in (str(TOKENIZER), "data/tokenizer/cherry_ko8k.model", "data/models/smollm2-135m"):
        proc = subprocess.run([sys.executable, "tools/tokenizer_report.py", "--tokenizer", model, "--input",
                               str(ML / "corpus" / "heldout.jsonl")], cwd=ROOT, env=child_env(), capture_output=True,
                              text=True)
        if proc.returncode == 0:
            out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def plot(results: dict, langs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a, b) = plt.subplots(1, 2, figsize=(15, 5))
    x, width = np.arange(len(langs)), 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        a.bar(x + i * width, [r["heldout"][lang] for lang in langs], width, label=name)
        b.bar(x + i * width, [r["heldout"][lang] - r["train"][lang] for lang in langs], width, label=name)
    for ax, title in ((a, "held-out loss per language"), (b, "held-out minus train loss (over-fitting)")):
        ax.set_xticks(x + 0.4 - width / 2, langs)
        ax.set_title(title)
        ax.legend()
    a.set_ylim(bottom=min(min(r["heldout"].values()) for r in results.values()) - 0.5)
    fig.suptitle("languages by train tokens, largest first")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results: dict, langs: list[str], fert: list[dict], counts: dict, commands: list[str]) -> str:
    names = list(results)
    lines = ["# Balanced multilingual data: natural, temperature and UniMax blends", "",
             "Generated by `tools/experiments/multilingual.py`: the `tiny` preset in the multilingual tokenizer, "
             f"trained {results[names[0]]['steps']} steps of {GBS} x {SEQ} tokens on each blend of the shipped "
             "multilingual corpus (the same budget for every blend; each blend's weights by tools/build_blend.py "
             f"for that budget). Losses by `cherry_megatron.evaluate` on the first {EVAL_TOKENS:,} tokens of each "
             "language's held-out split and of its train split.", "",
             "## Weights and realised epochs", "",
             "| language | train tokens | " + " | ".join(f"{n} weight | {n} epochs" for n in names) + " |",
             "|---|---:|" + "---:|---:|" * len(names)]
    for lang in langs:
        lines.append(f"| {lang} | {counts[lang]:,} | " + " | ".join(
            f"{results[n]['plan']['weights'][lang]:.3f} | {results[n]['lang_epochs'][lang]:.2f}" for n in names) + " |")
    lines += ["", "## Held-out loss per language (train-split loss in brackets)", "",
              "| language | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for lang in langs:
        best = min(results[n]["heldout"][lang] for n in names)
        lines.append(f"| {lang} | " + " | ".join(
            ("**{:.3f}**" if results[n]["heldout"][lang] == best else "{:.3f}").format(results[n]["heldout"][lang])
            + f" ({results[n]['train'][lang]:.3f})" for n in names) + " |")
    mean = {n: sum(results[n]["heldout"].values()) / len(langs) for n in names}
    lines.append("| mean over languages | " + " | ".join(f"{mean[n]:.3f}" for n in names) + " |")
    small = sorted(langs, key=counts.get)[:4]
    gap = {n: {lang: results[n]["heldout"][lang] - results[n]["train"][lang] for lang in small} for n in names}
    lines += ["", "## What it shows", "",
              f"- Mean held-out loss over the {len(langs)} languages (each counted once): " +
              ", ".join(f"{n} {mean[n]:.3f}" for n in names) + f"; lowest: {min(mean, key=mean.get)}.",
              f"- The {len(small)} smallest languages ({', '.join(small)}), held-out minus train loss: " +
              "; ".join(f"{n} " + ", ".join(f"{lang} {gap[n][lang]:+.3f}" for lang in small) for n in names) +
              ". A gap that grows with the epochs a blend spends on a language is over-repetition.",
              f"- English (the largest): " + ", ".join(f"{n} {results[n]['heldout']['en']:.3f}" for n in names) +
              ": what up-weighting the small languages costs the large one."]
    if "natural" in names:
        for lang in small[:2]:
            order = sorted(names, key=lambda n: results[n]["lang_epochs"][lang])
            lines.append(f"- {lang} by epochs spent on it: " + ", ".join(
                f"{n} {results[n]['lang_epochs'][lang]:.2f} ep -> held-out {results[n]['heldout'][lang]:.3f}, gap "
                f"{gap[n][lang] - gap['natural'][lang]:+.3f} vs natural" for n in order) + ".")
        lines.append("- Reading the gap: held-out and train tokens are different documents, so a language's gap level is "
                     "partly how hard its two samples are (code's train sample is harder than its held-out one); only "
                     f"its change between blends on the same language says anything, and on {EVAL_TOKENS:,} tokens a "
                     "change of ~0.1 is within noise.")
    if fert:
        lines += ["", "## Tokenizer fertility (characters per token on each language's held-out text)", "",
                  "| language | " + " | ".join(f"`{f['tokenizer']}`" for f in fert) + " |", "|---|" + "---:|" * len(fert)]
        for lang in langs:
            lines.append(f"| {lang} | " + " | ".join(f"{f['languages'][lang]['chars_per_token']:.2f}" for f in fert) + " |")
        lines += ["", "`multi8k` is trained on a UniMax sample (2M characters, at most 1 epoch a language) of the "
                  "multilingual train split; `cherry_ko8k` on the Korean + English + code corpus; SmolLM2's is an "
                  "English-first 49k BPE. Below ~1 character per token a tokenizer is spelling the language in bytes."]
    return "\n".join(lines + reproduce(commands, "multilingual.png", "held-out loss and over-fitting per language")) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--runs", type=Path, default=Path("runs/experiments/multilingual"))
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--blends", nargs="+", default=list(BLENDS), choices=list(BLENDS))
    args = p.parse_args()
    langs = languages()
    if not langs:
        sys.exit(f"error: no {ML}/tokens/train_*_text_document: run `make data`")
    from cherry_megatron.data.blend import token_count

    counts = {lang: token_count(str(ROOT / ML / "tokens" / f"train_{lang}_text_document")) for lang in langs}
    langs.sort(key=counts.get, reverse=True)
    command = " ".join(["python tools/experiments/multilingual.py", f"--steps {args.steps}"])
    results = {}
    for name in args.blends:
        results[name] = recorded(args.out / "records" / "multilingual" / f"{name}.json", f"{command} # {name}",
                                 lambda name=name: {**one_blend(name, args.runs, args.steps, langs), "steps": args.steps})
    fert = fertility(langs)
    plot(results, langs, args.out / "multilingual.png")
    commands = [command, "# for each blend B, then:",
                f"python tools/build_blend.py --inputs LANG={ML}/tokens/train_LANG_text_document ... --method ... "
                f"--budget {args.steps * GBS * SEQ} --output B.yaml",
                f"python -m cherry_megatron.train --config tiny --set data.paths=[] data.blend_file=B.yaml "
                f"data.tokenizer_model={TOKENIZER} train.steps={args.steps} ...",
                f"python -m cherry_megatron.evaluate --load RUN --data LANG={ML}/tokens/heldout_LANG_text_document ... "
                f"--max-tokens {EVAL_TOKENS}",
                f"python tools/tokenizer_report.py --tokenizer {TOKENIZER} --input {ML}/corpus/heldout.jsonl"]
    write_report(args.out / "multilingual.md", report(results, langs, fert, counts, commands))
    print(f"wrote {args.out / 'multilingual.md'}", flush=True)


if __name__ == "__main__":
    main()
