"""Memory: ZeRO-3's partitioned initialisation, the trainer's memory figures, the planner's, and the refusal of
a layout the planner says cannot fit."""
import json
import math

import pytest

from cherry_megatron.metrics import read_metrics
from conftest import error_lines, run_cli

SMALL = ["parallel.zero_stage=3", "train.steps=3", "train.micro_batch_size=1", "train.global_batch_size=4",
         "train.seq_length=128", "train.log_interval=1", "train.eval_interval=1000", "train.save_interval=1000",
         "data.eval_path="]


def _small(run_dir, zero_init: bool):
    proc = run_cli(["cherry_megatron.train", "--config", "small", "--run-dir", str(run_dir), "--set", *SMALL,
                    f"parallel.zero_init={str(zero_init).lower()}"], nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(run_dir)
    return next(r for r in rows if "build_memory_gib" in r), {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_zero3_builds_each_rank_only_its_partitions_with_the_same_curve(corpus, tmp_path):
    """small preset, ZeRO-3 over 4 ranks: building the model under zero.Init costs each rank about its shards
    (a quarter of the weights, plus one weight whole while it is cut), building it whole costs the model; the
    curve is the same to the last digit."""
    from cherry_megatron.config import load_config
    from cherry_megatron.model import full_shapes
    from cherry_megatron.preflight import resolve_vocab

    parted, parted_curve = _small(tmp_path / "parted", True)
    whole, whole_curve = _small(tmp_path / "whole", False)
    assert parted_curve == whole_curve and len(parted_curve) == 3
    cfg = load_config("small")
    resolve_vocab(cfg, 8192)  # the shipped tokenizer's
    sizes = [4 * math.prod(shape) for shape in full_shapes(cfg.to_dict()).values()]  # fp32 bytes of each weight
    model, shard, largest = sum(sizes) / 2**30, sum(sizes) / 4 / 2**30, max(sizes) / 2**30
    bound = 2 * shard + largest + 32 / 1024  # partition + DeepSpeed's copy of it while partitioning, one weight
    assert parted["build_memory_gib"] < bound < 0.9 * model < whole["build_memory_gib"], (parted, whole, model)
    for row in (parted, whole):
        assert row["setup_peak_memory_gib"] > row["base_memory_gib"] > 0.1  # the libraries' RSS, on CPU


def test_a_layout_the_planner_says_cannot_fit_is_refused_before_anything_is_built(corpus, tmp_path):
    proc = run_cli(["-m", "cherry_megatron.train", "--config", "dense-1b-48l", "--run-dir", str(tmp_path / "run"),
                    "--set", "model.vocab_size=0", "train.micro_batch_size=1", "train.seq_length=128",
                    "train.global_batch_size=1", "train.memory_limit_gib=11"])
    assert proc.returncode == 2
    line = error_lines(proc)[0]
    assert line.startswith("error: the planner estimates ") and "above train.memory_limit_gib=11" in line, line
    assert "tp=1 pp=1 dp=1 zero=1 in fp32" in line
    assert not (tmp_path / "run").exists()


def test_the_planner_takes_the_precision_and_overrides_of_a_run():
    def plan(*extra):
        proc = run_cli(["-m", "cherry_megatron.cli.plan", "--config", "small", "--nodes", "1", "--gpus-per-node", "2",
                        "--json", *extra])
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = json.loads(proc.stdout)
        return {(r["tp"], r["pp"], r["zero"]): r for r in out["layouts"]}, out

    bf16, _ = plan()
    fp32, out = plan("--precision", "fp32", "--set", "model.vocab_size=0", "train.seq_length=256")
    assert out["seq_length"] == 256
    for key in bf16:
        assert fp32[key]["weights_gib"] == pytest.approx(2 * bf16[key]["weights_gib"], rel=0.01)
        assert fp32[key]["buffers_gib"] > 0 if key[2] else True
    z3 = fp32[(1, 1, 3)]
    assert z3["total_gib"] == pytest.approx(sum(z3[k] for k in ("weights_gib", "grads_gib", "optimizer_gib",
                                                              "activations_gib", "buffers_gib")))


@pytest.mark.slow
def test_init_from_into_a_partitioned_model_equals_the_whole_one(baseline, tmp_path):
    """`model.init_from` at ZeRO-3: the weights are written one gathered weight at a time into the partitioned
    model, and the run is the one that loaded into a model built whole."""
    from conftest import train

    curves = []
    for zero_init in ("true", "false"):
        run = tmp_path / zero_init
        train(run, ["parallel.zero_stage=3", f"parallel.zero_init={zero_init}", f"model.init_from={baseline}",
                    "train.steps=2", "data.eval_path="], nproc=2)
        curves.append({r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r})
    assert curves[0] == curves[1] and len(curves[0]) == 2
    first_baseline = {r["step"]: r["loss"] for r in read_metrics(baseline) if "loss" in r}[1]
    assert curves[0][1] < first_baseline - 0.1  # it started from the trained weights, not from scratch


@pytest.mark.slow
def test_a_pipeline_stage_builds_only_its_own_blocks(corpus, tmp_path):
    """small preset at 16 layers, PP=2: each rank draws every block's weights (the same model at any layout) but
    keeps only its stage's: the build costs the larger stage plus one weight built whole, not the model."""
    from cherry_megatron.cli.plan import rank_parameters
    from cherry_megatron.config import load_config
    from cherry_megatron.preflight import resolve_vocab

    run = tmp_path / "pp2"
    proc = run_cli(["cherry_megatron.train", "--config", "small", "--run-dir", str(run), "--set",
                    *[s for s in SMALL if not s.startswith("parallel.")], "parallel.pp=2", "parallel.zero_stage=1",
                    "model.num_layers=16"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(r for r in read_metrics(run) if "build_memory_gib" in r)
    assert len([r for r in read_metrics(run) if "loss" in r]) == 3
    cfg = load_config("small", ["model.num_layers=16"])
    resolve_vocab(cfg, 8192)
    stage = max(rank_parameters(cfg.model, 1, 2, k) for k in range(2)) * 4 / 2**30
    model = rank_parameters(cfg.model, 1, 1, 0) * 4 / 2**30  # one stage: the whole model
    largest = cfg.model.vocab_size * cfg.model.hidden_size * 4 / 2**30  # the embedding, built whole then copied
    bound = stage + 2 * largest + 32 / 1024  # + 32 MiB: the interpreter's own growth while building
    assert row["build_memory_gib"] < bound < 0.9 * model, (row, stage, model)
