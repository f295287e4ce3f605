"""Checkpoint conversion speed and memory against a plain copy of the same bytes.

    python bench/convert.py [--hidden 768] [--layers 8] [--vocab 32768] [--workdir DIR]

Builds a dense model of a few hundred MB (fp32), writes it as a TP=2 DeepSpeed checkpoint, then times
tools/convert_checkpoint.py (each conversion a fresh process) for deepspeed TP2 -> torch, torch -> hf,
hf -> deepspeed TP2 x PP2, and a plain copy (`shutil.copytree`) of the source directory. Prints GB/s of
model bytes, the ratio to the copy, and each conversion's working memory (peak resident memory above
what the process held when the conversion started), next to the model's size and its largest tensor.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The converter in a child whose resident memory a thread samples every 5 ms from the moment the conversion
# starts (imports done): the peak above that start is the conversion's working memory. Anonymous memory
# only: memory-mapped checkpoint pages are page cache the kernel drops under pressure. ru_maxrss would not
# do either: importing torch + DeepSpeed + megatron peaks higher than converting.
PEAK = """
import sys, threading, time
sys.argv = {argv!r}
sys.path.insert(0, {root!r})
import cherry_megatron.cli.convert as tool  # its module: convert() is patched there
from cherry_megatron.convert import safe_load
def rss():  # anonymous resident memory, kB: what the conversion allocates (mapped file pages are page cache)
    return next(int(ln.split()[1]) for ln in open('/proc/self/status') if ln.startswith('RssAnon:'))
peak, stop, inner = [0], [False], tool.convert
def sample():
    while not stop[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.005)
def convert(args):
    from cherry_megatron.model import build_model  # the imports convert() does before its clock
    safe_load._allowed()
    start = rss()
    threading.Thread(target=sample, daemon=True).start()
    try:
        return inner(args)
    finally:
        stop[0] = True
        print('peak_rss_kb', max(peak[0], rss()) - start, file=sys.stderr)
tool.convert = convert
tool.main()
"""
def child(code: str) -> tuple[float, int, str]:
    from cherry_megatron.distributed import child_env

    t0 = time.perf_counter()  # child_env: the children must not inherit this process's MASTER_PORT
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=child_env({}))
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    kb = int(next(ln.split()[1] for ln in proc.stderr.splitlines() if ln.startswith("peak_rss_kb")))
    return seconds, kb, proc.stdout


def make_source(work: Path, hidden: int, layers: int, vocab: int) -> Path:
    import torch

    from cherry_megatron import distributed
    from cherry_megatron.checkpoint.consolidate import save_consolidated
    from cherry_megatron.config import ParallelConfig, load_config
    from cherry_megatron.cli.convert import main as convert

    cfg = load_config("tiny", [f"model.hidden_size={hidden}", f"model.num_layers={layers}", f"model.vocab_size={vocab}",
                               f"model.num_heads={hidden // 64}", f"model.num_kv_heads={hidden // 128}"])
    distributed.init(ParallelConfig())
    try:
        from cherry_megatron.model import build_model

        torch.manual_seed(0)
        state = {k: v for k, v in build_model(cfg).state_dict().items()
                 if torch.is_tensor(v) and not k.endswith("_extra_state")}
        save_consolidated(work / "seed", state, cfg.to_dict())
        del state
        convert(["--input", str(work / "seed"), "--input-format", "torch", "--output", str(work / "ds_tp2"),
                 "--output-format", "deepspeed", "--target-tp", "2"])
    finally:
        distributed.shutdown()
    shutil.rmtree(work / "seed")
    return work / "ds_tp2"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--workdir", default="")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cherry_bench_convert_"))
    try:
        src = make_source(work, args.hidden, args.layers, args.vocab)
        size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
        from cherry_megatron.convert.checkpoint import read_deepspeed

        largest = max(d.itemsize * math.prod(s) for d, s in read_deepspeed(src).specs.values())
        t0 = time.perf_counter()
        shutil.copytree(src, work / "copy")
        copy_s = time.perf_counter() - t0
        tool = str(ROOT / "tools" / "convert_checkpoint.py")
        runs = [("deepspeed TP2 -> torch", src, "deepspeed", "torch", []),
                ("torch -> hf", work / "torch", "torch", "hf", []),
                ("hf -> deepspeed TP2xPP2", work / "hf", "hf", "deepspeed", ["--target-tp", "2", "--target-pp", "2"])]
        print(f"model: {size / 1e6:.0f} MB as a TP=2 DeepSpeed checkpoint, largest tensor {largest / 1e6:.0f} MB; "
              f"plain copy {size / 1e9 / copy_s:.3f} GB/s")
        rows = []
        for label, inp, fin, fout, extra in runs:
            out = work / {"torch": "torch", "hf": "hf", "deepspeed": "ds_tp2pp2"}[fout]
            argv = [tool, "--input", str(inp), "--input-format", fin, "--output", str(out), "--output-format", fout, *extra]
            _, kb, stdout = child(PEAK.format(argv=argv, root=str(ROOT)))
            res = json.loads(stdout.strip().splitlines()[-1])
            gbs = res["bytes"] / 1e9 / res["seconds"]
            row = {"conversion": label, "gb_per_s": round(gbs, 3), "vs_copy": round(gbs / (size / 1e9 / copy_s), 3),
                   "working_mb": round(kb / 1024),
                   "model_mb": round(res["bytes"] / 1e6)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
