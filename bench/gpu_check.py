"""The prepared one-GPU check: what this trainer does on a real accelerator, in one command of under 8 minutes.

    .venv/bin/python bench/gpu_check.py [--cpu] [--budget-s 450] [--work DIR]

Each stage prints one JSON line (`{"stage": ..., ...}`) and skips itself (`"skipped"`) when the budget left
is below its estimate; a stage that fails prints `"error"` and the check exits 1 after the rest ran.
  env       torch, CUDA, device, the peak the MFU figures divide by, library versions
  sdpa      the kernel `F.scaled_dot_product_attention` runs inside our Attention at the 1B shape (bf16),
            with GQA (as the preset) and without: flash expected on a GPU
  train     dense-1b-48l, 30 steps bf16 at micro-batch 4 x 2048, 2 micro-batches (one process, nccl):
            init time, optimizer class, data types, host syncs per step (our counter, and on a GPU CUDA's
            own sync warnings), top kernels, tokens/s, MFU, peak memory against `cherry-plan`'s figure
            for this layout, checkpoint save time, the trainer's held-out loss
  convert   the checkpoint exported to Hugging Face in bf16, loaded by transformers on the device: its
            logits against ours (same dtype), top-1 agreement
  evaluate  `cherry_megatron.evaluate` on the checkpoint against the trainer's own held-out loss
  moee      one routed model's steps (4 experts, top-2, capacity 1.25): tokens/s, host syncs
`--cpu` runs a reduced fp32 version of every stage (the tiny preset, a few steps): tests/test_gpu_check.py
runs it in CI, so the GPU run is not the script's first. On the GPU machine (no internet), with torch and
CUDA installed there: `pip install --no-deps wheels/*.whl` from wheels built here (README, "GPU check").
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU = SimpleNamespace(config="dense-1b-48l", steps=30, sets=[
    "train.micro_batch_size=4", "train.global_batch_size=8", "train.seq_length=2048", "train.precision=bf16",
    "train.eval_tokens=65536", "train.warmup_steps=10"], sdpa=(4, 2048), moee="small")
CPU = SimpleNamespace(config="tiny", steps=6, sets=[
    "model.num_layers=2", "train.micro_batch_size=2", "train.global_batch_size=4", "train.seq_length=64",
    "train.precision=fp32", "train.eval_tokens=1024", "train.warmup_steps=2"], sdpa=(2, 256), moee="tiny")
ESTIMATES = {"env": 5, "sdpa": 20, "train": 200, "convert": 80, "evaluate": 40, "moee": 60}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_base_gib(device) -> float:
    """What the peak is measured from, after the peak is reset (`metrics.reset_peak_memory`), so that an earlier
    stage's transient (the SDPA probe's) is not the train stage's: 0 on a GPU; on CPU the resident set then,
    which the peak RSS includes (`metrics.base_memory_gib`)."""
    from cherry_megatron.metrics import base_memory_gib, reset_peak_memory

    reset_peak_memory(device)
    return base_memory_gib(device)


def stage_env(ctx) -> dict:
    from importlib import metadata

    from cherry_megatron.metrics import peak_tflops

    dev = ctx.device
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(dev)
            if dev.type == "cuda" else "cpu", "bf16": dev.type == "cuda" and torch.cuda.is_bf16_supported(),
            "peak_tflops": peak_tflops(dev, ctx.precision, 0.0), "deepspeed": metadata.version("deepspeed"),
            "megatron_core": metadata.version("megatron-core"), "transformers": metadata.version("transformers")}


def _world(ctx):
    from cherry_megatron import distributed
    from cherry_megatron.config import ParallelConfig

    return distributed.init(ParallelConfig(tp=1))


def stage_sdpa(ctx) -> dict:
    """Our Attention module (megatron TP layers, RoPE, SDPA) forward + backward under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    from cherry_megatron import distributed
    from cherry_megatron.config import load_config
    from cherry_megatron.model.layers import Attention, RotaryEmbedding, parallel_config

    _world(ctx)
    try:
        out = {}
        b, s = ctx.mode.sdpa
        for name, kv in (("gqa", None), ("mha", "heads")):
            cfg = load_config(ctx.mode.config if ctx.gpu else "tiny").model
            cfg.num_kv_heads = cfg.num_heads if kv else cfg.num_kv_heads
            attn = Attention(cfg, parallel_config(1, ctx.dtype)).to(ctx.device)
            x = torch.randn(b, s, cfg.hidden_size, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
            cos, sin = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)(s, ctx.device, ctx.dtype)
            attn(x, cos, sin).sum().backward()  # warm-up
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.gpu else [])
            with profile(activities=activities) as prof:
                attn(x, cos, sin).float().sum().backward()
                _sync(ctx.device)
            ops = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key and e.key != "aten::scaled_dot_product_attention"})
            out[name] = {"kv_heads": cfg.num_kv_heads, "heads": cfg.num_heads, "ops": ops,
                         "backend": next((o.split("_scaled_dot_product_")[1].split("_attention")[0]
                                          for o in ops if "_scaled_dot_product_" in o), "math")}
        return {"shape": [b, s], "dtype": str(ctx.dtype).split(".")[1], **out}
    finally:
        distributed.shutdown()


def _top_kernels(prof, gpu: bool, n: int = 8) -> list:
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    return [[e.key[:80], round(getattr(e, key) / 1e3, 2)] for e in rows]


def _train(ctx, name: str, config: str, sets: list[str], steps: int, full: bool) -> dict:
    """Train in this process (world of one) and measure; `full` adds the profile, plan and checkpoint."""
    from torch.profiler import ProfilerActivity, profile

    from cherry_megatron import distributed
    from cherry_megatron.cli.plan import Layout, memory_estimate
    from cherry_megatron.host_syncs import HostSyncs
    from cherry_megatron.metrics import memory_gib
    from cherry_megatron.preflight import preflight
    from cherry_megatron.train import Trainer

    cfg, tokenizer, run_dir = preflight(config, ctx.mode.sets + sets + [f"train.steps={steps}"], ctx.work / name, 1)
    distributed.set_threads(0)
    layout = distributed.init(cfg.parallel, cfg.train.collective_timeout_s)
    try:
        base = _memory_base_gib(ctx.device)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, run_dir, layout, tokenizer)
        _sync(ctx.device)
        module = trainer.engine.module  # a ZeRO-3 partitioned weight's own numel is its partition's
        out = {"init_s": round(time.perf_counter() - t0, 2),
               "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()),
               "optimizer": type(trainer.engine.optimizer).__name__,
               "base_optimizer": type(getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)).__name__,
               "data_types": [str(d).split(".")[1] for d in trainer.engine.get_data_types()],
               "communication_dtype": str(trainer.engine.communication_data_type).split(".")[1]}
        times, losses = [], []
        for step in range(steps):
            if step == 2:  # after warm-up: one step counted, on a GPU also by CUDA's own sync detector
                with HostSyncs() as syncs, warnings.catch_warnings(record=True) as cuda_warned:
                    warnings.simplefilter("always")
                    if ctx.gpu:
                        torch.cuda.set_sync_debug_mode("warn")
                    try:
                        losses.append(trainer.step(step)[0])
                    finally:
                        if ctx.gpu:
                            torch.cuda.set_sync_debug_mode(0)
                out["host_syncs_per_step"] = syncs.count
                out["host_sync_sites"] = dict(syncs.sites.most_common(6))
                if ctx.gpu:
                    out["cuda_sync_warnings"] = sum("synchroniz" in str(w.message) for w in cuda_warned)
                continue
            if full and step == 3:
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.gpu else [])
                with profile(activities=activities) as prof:
                    losses.append(trainer.step(step)[0])
                    _sync(ctx.device)
                out["top_kernels_ms"] = _top_kernels(prof, ctx.gpu)
                continue
            _sync(ctx.device)
            t = time.perf_counter()
            losses.append(trainer.step(step)[0])
            _sync(ctx.device)
            times.append(time.perf_counter() - t)
        step_s = sorted(times[2:] or times)[len(times[2:] or times) // 2]
        tokens = cfg.train.global_batch_size * cfg.train.seq_length
        out.update(step_s=round(step_s, 4), tokens_per_s=round(tokens / step_s, 1),
                   mfu=round(tokens / step_s * trainer.flops_per_token / trainer.peak, 4) if math.isfinite(trainer.peak) else None,
                   loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4),
                   peak_memory_gib=round(memory_gib(ctx.device) - base, 3))
        if full:
            plan = memory_estimate(cfg, Layout(1, 1, 1, cfg.parallel.zero_stage), ctx.precision)
            out["plan_total_gib"] = round(plan["total_gib"], 3)
            out["memory_vs_plan"] = round(out["peak_memory_gib"] / plan["total_gib"], 3)
            t = time.perf_counter()
            trainer.save(steps)
            out["save_s"] = round(time.perf_counter() - t, 2)
            out["eval_loss"] = trainer.evaluate()
            ctx.run_dir, ctx.eval_loss, ctx.cfg = run_dir, out["eval_loss"], cfg
        return out
    finally:
        distributed.shutdown()


def stage_train(ctx) -> dict:
    return _train(ctx, "dense", ctx.mode.config, [], ctx.mode.steps, full=True)


def stage_moee(ctx) -> dict:
    sets = ["moee.num_experts=4", "moee.top_k=2", "moee.capacity_factor=1.25", "data.eval_path="]
    keep = {"init_s", "parameters", "optimizer", "step_s", "tokens_per_s", "mfu", "host_syncs_per_step",
            "host_sync_sites", "cuda_sync_warnings", "loss_first", "loss_last"}
    return {k: v for k, v in _train(ctx, "moee", ctx.mode.moee, sets, 6, full=False).items() if k in keep}


def _child(args: list[str]) -> str:
    from cherry_megatron.distributed import child_env

    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return proc.stdout


def stage_convert(ctx) -> dict:
    from transformers import AutoModelForCausalLM

    from cherry_megatron import distributed
    from cherry_megatron.convert.load import load_model
    from cherry_megatron.data.indexed import token_stream

    if getattr(ctx, "run_dir", None) is None:
        return {"skipped": "no checkpoint (the train stage did not run)"}
    hf_dir = ctx.work / "hf_bf16"
    t = time.perf_counter()
    _child(["cherry_megatron.cli.convert", "--input", str(ctx.run_dir), "--input-format", "deepspeed",
            "--output", str(hf_dir), "--output-format", "hf", "--dtype", "bf16"])
    export_s = time.perf_counter() - t
    dtype = torch.bfloat16  # the exported weights' dtype; on CPU bf16 matmuls are slow but the model is tiny
    seq = min(ctx.cfg.train.seq_length, 512)
    tokens = torch.from_numpy(token_stream(ctx.cfg.data.eval_path)[: 2 * seq].astype("int64")).view(2, seq).to(ctx.device)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(ctx.device).eval()
    _world(ctx)
    try:
        ours, _ = load_model(ctx.run_dir)
        ours = ours.to(device=ctx.device, dtype=dtype)
        with torch.no_grad():
            theirs_logits = hf(tokens).logits.float()
            our_logits = ours(tokens).logits.float()[..., : theirs_logits.shape[-1]]
    finally:
        distributed.shutdown()
    diff = (theirs_logits - our_logits).abs()
    return {"export_s": round(export_s, 2), "hf_class": type(hf).__name__, "dtype": "bf16",
            "max_abs_logit_diff": round(diff.max().item(), 4), "mean_abs_logit_diff": round(diff.mean().item(), 5),
            "top1_agreement": round((theirs_logits.argmax(-1) == our_logits.argmax(-1)).float().mean().item(), 4)}


def stage_evaluate(ctx) -> dict:
    if getattr(ctx, "run_dir", None) is None:
        return {"skipped": "no checkpoint (the train stage did not run)"}
    t = ctx.cfg.train
    out = json.loads(_child(["cherry_megatron.evaluate", "--load", str(ctx.run_dir), "--data", ctx.cfg.data.eval_path,
                             "--seq-length", str(t.seq_length), "--max-tokens", str(t.eval_tokens),
                             "--batch-size", str(t.micro_batch_size)]).splitlines()[-1])
    return {"evaluate_loss": out["loss"], "trainer_eval_loss": ctx.eval_loss, "tokens": out["tokens"],
            "abs_diff": abs(out["loss"] - ctx.eval_loss)}


STAGES = {"env": stage_env, "sdpa": stage_sdpa, "train": stage_train, "convert": stage_convert,
          "evaluate": stage_evaluate, "moee": stage_moee}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="the reduced fp32 version of every stage, on CPU")
    p.add_argument("--budget-s", type=float, default=450.0, help="stages that would not fit are skipped")
    p.add_argument("--work", default="", help="where runs and exports go (default: a temporary directory)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset, in this order")
    args = p.parse_args(argv)
    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print("error: no CUDA device visible (run with --cpu for the reduced CPU check)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    os.chdir(ROOT)  # the presets' data paths are relative to the repo root
    failed = False
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        from cherry_megatron.distributed import select_device

        device = select_device(0) if gpu else torch.device("cpu")
        ctx = SimpleNamespace(gpu=gpu, device=device, mode=GPU if gpu else CPU, work=work,
                              precision="bf16" if gpu else "fp32", dtype=torch.bfloat16 if gpu else torch.float32)
        for name in args.stages.split(","):
            left = args.budget_s - (time.perf_counter() - start)
            if left < ESTIMATES[name] * (1 if gpu else 0.2):
                row = {"skipped": f"{left:.0f} s of the budget left, the stage needs ~{ESTIMATES[name]} s"}
            else:
                t = time.perf_counter()
                try:
                    with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON lines only
                        row = STAGES[name](ctx)
                except Exception as e:  # one stage's failure is its line's result; the others still run
                    traceback.print_exc(file=sys.stderr)
                    row, failed = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}, True
                row["wall_s"] = round(time.perf_counter() - t, 2)
            print(json.dumps({"stage": name, **row}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
