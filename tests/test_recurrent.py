"""Recurrent model and depth compression: exact SVD init, early exit, parameter counts, TP invariance."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from cherry_megatron.checkpoint.consolidate import load_into
from cherry_megatron.compress.depth import PROJ_WEIGHTS, compress, shared_blocks
from cherry_megatron.config import ConfigError, load_config
from cherry_megatron.metrics import read_metrics
from cherry_megatron.model import build_model, parameter_count
from cherry_megatron.model.gpt import GPT
from conftest import run_cli, train


def _dense(layers=4):
    cfg = load_config("tiny", ["model.vocab_size=1024", f"model.num_layers={layers}"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():  # non-trivial norm weights, so per-position norms matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    state = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    return cfg, model, state


def test_average_of_identical_layers_is_that_layer():
    layer = {"attn.q.weight": torch.randn(4, 4), "attn_norm.weight": torch.rand(4)}
    layers = {0: layer, 1: {k: v.clone() for k, v in layer.items()}}
    (block,) = shared_blocks(layers, [[0, 1]], "average")
    assert all(torch.equal(block[k], layer[k]) for k in layer)


def test_stepwise_and_lower_pick_the_documented_layers():
    layers = {i: {"w": torch.full((2,), float(i))} for i in range(8)}
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [b["w"][0].item() for b in shared_blocks(layers, groups, "stepwise")] == [0, 4]
    assert [b["w"][0].item() for b in shared_blocks(layers, groups, "lower")] == [0, 1]
    assert [b["w"][0].item() for b in shared_blocks(layers, groups, "average")] == [1.5, 5.5]


def test_full_rank_svd_init_reproduces_the_dense_model(world_of_one):
    cfg, dense, state = _dense()
    small_state, small = compress(state, cfg, 2, "average", lora_rank=256)
    for i in range(4):
        for p, w in PROJ_WEIGHTS.items():
            rebuilt = small_state[f"layers.{i // 2}.{w}"] + small_state[f"lora_{p}_B"][i] @ small_state[f"lora_{p}_A"][i]
            assert torch.allclose(rebuilt, state[f"layers.{i}.{w}"], atol=1e-5)
    model = build_model(small)
    load_into(model, small_state, "test")
    tokens, labels = torch.randint(0, 1024, (2, 24)), torch.randint(0, 1024, (2, 24))
    dense.eval(), model.eval()
    assert torch.allclose(model(tokens).logits, dense(tokens).logits, atol=1e-4)
    assert torch.allclose(model(tokens, labels).per_token, dense(tokens, labels).per_token, atol=1e-4)
    assert parameter_count(small)["total"] == sum(p.numel() for p in model.parameters())


def test_compressed_without_lora_is_a_smaller_model(world_of_one):
    cfg, _, state = _dense()
    small_state, small = compress(state, cfg, 2, "average", lora_rank=0)
    assert not any(k.startswith("lora_") for k in small_state)
    assert parameter_count(small)["total"] < parameter_count(cfg)["total"]
    with pytest.raises(ConfigError, match="must divide"):
        compress(state, cfg, 3)


def test_early_exit_at_full_depth_equals_no_exit(world_of_one):
    cfg = load_config("recurrent-tiny", ["model.vocab_size=1024"])
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens, labels = torch.randint(0, 1024, (2, 16)), torch.randint(0, 1024, (2, 16))
    model.eval()
    assert torch.equal(model(tokens, labels, depth=8).per_token, model(tokens, labels).per_token)
    early = model(tokens, labels, depth=4).per_token
    assert not torch.allclose(early, model(tokens, labels).per_token)
    model.train()  # training adds the exit loss with its weight
    model.rcfg.exit_loss_weights = [0.5]
    assert torch.allclose(model(tokens, labels).per_token, model(tokens, labels, depth=8).per_token + 0.5 * early,
                          atol=1e-6)


def test_recurrent_presets_count():
    six = load_config("recurrent-6l")
    n = parameter_count(six)["total"]
    assert abs(n - 227e6) / 227e6 < 0.02, n
    assert n == 6 * 18_434_560 + 2 * 45056 * 1280 + 1280 + 34 * 3 * 1280


@pytest.mark.parametrize("override, message", [
    (["recurrent.num_blocks=3"], "does not divide model.num_layers=8"),
    (["recurrent.schedule=[0,1]"], "has 2 positions"),
    (["recurrent.schedule=[0,0,0,0,0,0,0,0]"], "must use every block"),
    (["recurrent.exit_depths=[9]"], "must lie in 1..8"),
])
def test_bad_recurrent_config(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("recurrent-tiny", override)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r.get("loss") is not None}


@pytest.mark.slow
def test_recurrent_tp2_matches_tp1_with_sgt(corpus, tmp_path):
    sets = ["model.num_layers=4", "recurrent.exit_depths=[2]", "recurrent.exit_loss_weights=[0.3]",
            "sgt.ratio=0.5", "sgt.policy=loss"]
    train(tmp_path / "tp1", sets, config="recurrent-tiny")
    train(tmp_path / "tp2", sets + ["parallel.tp=2"], config="recurrent-tiny", nproc=2)
    a, b = _losses(tmp_path / "tp2"), _losses(tmp_path / "tp1")
    assert a.keys() == b.keys() and len(a) >= 3
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4)


def _compress(run_dir, out):
    proc = run_cli(["tools/compress_depth.py", "--load", str(run_dir), "--target-layers", "1",
                    "--lora-rank", "4", "--output", str(out), "--eval-tokens", "1024"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_compress_from_tp2_equals_tp1_and_trains_on(baseline, tmp_path):
    """The baseline's weights as its TP=1 DeepSpeed checkpoint and, converted, as a TP=2 one (real TP=2 DeepSpeed
    files are read in test_train and test_convert) compress to the same small model, which trains on."""
    from tools.convert_checkpoint import main as convert

    convert(["--input", str(baseline), "--input-format", "deepspeed", "--output", str(tmp_path / "tp2"),
             "--output-format", "deepspeed", "--target-tp", "2"])
    result = _compress(baseline, tmp_path / "small1")
    _compress(tmp_path / "tp2", tmp_path / "small2")
    assert math.isfinite(result["heldout_loss_recurrent"])
    assert result["heldout_loss_recurrent"] < result["uniform_loss"], result
    a, b = load_file(str(tmp_path / "small1/model.safetensors")), load_file(str(tmp_path / "small2/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    proc = run_cli(["-m", "cherry_megatron.train", "--config", str(tmp_path / "small1/config.yaml"), "--run-dir",
                    str(tmp_path / "retrain"), "--set", "train.steps=20", "train.log_interval=1", "train.lr=1e-3",
                    "train.warmup_steps=2", "train.micro_batch_size=4", "train.global_batch_size=4",
                    "train.eval_interval=20"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(tmp_path / "retrain") if r.get("eval_loss") is not None}
    assert sorted(evals) == [0, 20] and math.isfinite(evals[0])
    # The same held-out windows before and after 20 steps (8.56 -> 7.98 when written): it trains, downhill.
    assert evals[20] < evals[0] - 0.25, evals
