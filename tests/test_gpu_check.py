"""bench/gpu_check.py --cpu: every stage of the one-GPU check runs (reduced, fp32) before any GPU sees it."""
import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_the_gpu_check_runs_every_stage_on_cpu(corpus, tmp_path):
    from cherry_megatron.distributed import child_env

    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--budget-s", "900", "--work", str(tmp_path)],
                          cwd=ROOT, env=child_env({"PYTHONWARNINGS": "ignore"}), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["stage"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert list(rows) == ["env", "sdpa", "train", "convert", "evaluate", "moee"]
    assert not [r for r in rows.values() if "skipped" in r or "error" in r], rows
    assert rows["env"]["device"] == "cpu" and rows["env"]["deepspeed"] == "0.19.8"
    for attn in ("gqa", "mha"):  # the fused kernel the profiler saw inside our attention, not the math fallback
        assert rows["sdpa"][attn]["backend"] == "flash", rows["sdpa"]
    assert rows["sdpa"]["gqa"]["kv_heads"] < rows["sdpa"]["gqa"]["heads"] == rows["sdpa"]["mha"]["kv_heads"]
    train = rows["train"]
    assert train["optimizer"] == "DeepSpeedZeroOptimizer" and train["base_optimizer"] == "AdamW"
    assert train["data_types"] == ["float32", "float32"]
    assert 0 < train["host_syncs_per_step"] < 10, train["host_sync_sites"]  # the optimizer step's, none per micro-batch
    assert train["top_kernels_ms"] and train["tokens_per_s"] > 0 and 0 < train["mfu"] < 1
    assert train["peak_memory_gib"] > 0 and train["plan_total_gib"] > 0 and train["save_s"] > 0
    assert math.isfinite(train["eval_loss"]) and train["loss_last"] < train["loss_first"]
    assert rows["convert"]["hf_class"] == "LlamaForCausalLM" and rows["convert"]["top1_agreement"] > 0.95
    assert rows["evaluate"]["abs_diff"] < 1e-5 * rows["evaluate"]["trainer_eval_loss"]
    assert rows["moee"]["host_syncs_per_step"] < 10 and rows["moee"]["tokens_per_s"] > 0
