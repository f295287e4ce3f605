"""Expert pruning (UNCURL, cherry_megatron/prune/experts.py): similarity and clusters by construction, alignment
recovering a planted neuron permutation, merges that leave a layer's and a whole model's function unchanged, the
frequency baselines, one-line errors, and the CLI end to end on a trained smoe model, retrained at EP 1 and 2 (slow)."""
from __future__ import annotations

import json

import pytest
import torch

from cherry_megatron.checkpoint.consolidate import load_into, save_consolidated
from cherry_megatron.cli.prune_experts import main
from cherry_megatron.config import load_config
from cherry_megatron.metrics import read_metrics
from cherry_megatron.model import build_model
from cherry_megatron.model.moee import EXPERTS
from cherry_megatron.model.smoe import SparseMLP
from cherry_megatron.prune.experts import (Usage, align, calibrate, permute, plan, prune_experts, similarity,
                                           spectral_clusters)
from conftest import run_cli, train

SMALL = ["model.vocab_size=512", "model.hidden_size=32", "model.num_heads=2", "model.num_kv_heads=2",
         "model.ffn_hidden_size=24", "model.num_layers=2"]


def _usage(logits: torch.Tensor, k: int = 1) -> Usage:
    return Usage(logits, torch.bincount(logits.topk(k).indices.reshape(-1), minlength=logits.shape[1]))


def _tensors(module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone() for k, v in module.state_dict().items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}


def _expert(state, layer, e):
    base = f"layers.{layer}.{EXPERTS}.{e}."
    return {k[len(base):]: v for k, v in state.items() if k.startswith(base)}


def test_similarity_is_symmetric_in_the_unit_interval_with_unit_diagonal():
    h = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))
    h[:, 4], h[:, 5] = -h[:, 0], 0  # opposite columns meet at 0; a dead column is orthogonal to all
    s = similarity(h)
    assert torch.equal(s, s.T) and torch.equal(s.diagonal(), torch.ones(6, dtype=s.dtype))
    assert s.min() >= 0 and s.max() <= 1
    assert s[0, 4].item() == pytest.approx(0, abs=1e-12) and s[0, 5].item() == pytest.approx(0.5)


def test_experts_with_identical_router_rows_share_one_cluster():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 16, generator=g)
    w[1], w[4] = w[0], w[0]
    logits = torch.randn(500, 16, generator=g) @ w.T
    for seed in range(4):
        groups = plan(_usage(logits), "uncurl", 4, seed)
        assert sorted(map(sorted, groups)) == [[0, 1, 4], [2], [3], [5]], seed
    # fewer distinct experts than clusters: the duplicates are split, no cluster is left empty
    same = spectral_clusters(torch.ones(5, 5, dtype=torch.float64), 3, seed=0)
    assert len(same) == 3 and sorted(e for c in same for e in c) == list(range(5))


def test_a_neuron_permuted_copy_is_aligned_exactly():
    g = torch.Generator().manual_seed(2)
    f, d, r, n = 24, 16, 3, 2
    anchor = {"gate_up.weight": torch.randn(2 * f, d, generator=g), "down.weight": torch.randn(d, f, generator=g),
              "gate_up_lora_A": torch.randn(n, r, d, generator=g),
              "gate_up_lora_B": torch.randn(n, 2 * f, r, generator=g),
              "down_lora_A": torch.randn(n, r, f, generator=g), "down_lora_B": torch.randn(n, d, r, generator=g)}
    perm = torch.randperm(f, generator=g)
    other = permute(anchor, perm)
    assert not torch.equal(other["gate_up.weight"], anchor["gate_up.weight"])
    found, aligned = align(anchor, other)
    assert torch.equal(found, torch.argsort(perm))  # neuron a of the anchor is neuron found[a] of the copy
    assert aligned.keys() == anchor.keys() and all(torch.equal(aligned[k], anchor[k]) for k in anchor)


def _sparse_mlp(experts: int, k: int, seed: int = 3):
    cfg = load_config("smoe-tiny", [*SMALL, f"smoe.num_experts={experts}", f"smoe.top_k={k}"])
    mlp = SparseMLP(cfg.model, cfg.smoe, 1, 0, torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.3)
    return cfg, mlp


def test_merging_a_permuted_copy_leaves_the_sparse_layer_unchanged(world_of_one):
    cfg, mlp = _sparse_mlp(2, 1)
    state = _tensors(mlp, "layers.0.mlp.")
    copy = permute(_expert(state, 0, 0), torch.randperm(24, generator=torch.Generator().manual_seed(4)))
    state.update({f"layers.0.{EXPERTS}.1.{k}": v for k, v in copy.items()})
    load_into(mlp, {k[len("layers.0.mlp."):]: v for k, v in state.items()}, "test")
    x = torch.randn(2, 9, 32)
    want, _, _ = mlp.route(x, 0)
    logits = x.reshape(-1, 32) @ state["layers.0.mlp.deepspeed_moe.gate.wg.weight"].T
    usage = {"layers.0.mlp": _usage(logits)}
    assert usage["layers.0.mlp"].counts.min() > 0  # both experts carry tokens: the merge is weighted
    small_state, small = prune_experts(state, cfg, usage, {"layers.0.mlp": [[1, 0]]})
    assert (small.smoe.num_experts, small.smoe.top_k, small.smoe.ep_size) == (1, 1, 1)
    one = SparseMLP(small.model, small.smoe, 1, 0, torch.float32)
    load_into(one, {k[len("layers.0.mlp."):]: v for k, v in small_state.items()}, "pruned")
    got, _, _ = one.route(x, 0)  # k=1 of 1: the gate is 1, the merged expert is expert 1's function
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_singleton_cluster_and_the_frequency_baseline_pass_experts_through(world_of_one):
    cfg, mlp = _sparse_mlp(4, 2)
    state = _tensors(mlp, "layers.0.mlp.")
    router = "layers.0.mlp.deepspeed_moe.gate.wg.weight"
    counts = torch.tensor([5, 1, 9, 3])
    usage = {"layers.0.mlp": Usage(torch.randn(10, 4), counts)}
    small_state, _ = prune_experts(state, cfg, usage, {"layers.0.mlp": [[2], [0, 1, 3]]})
    assert all(torch.equal(v, _expert(state, 0, 2)[k]) for k, v in _expert(small_state, 0, 0).items())
    assert torch.equal(small_state[router][0], state[router][2])
    assert torch.allclose(small_state[router][1], (5 * state[router][0] + state[router][1] + 3 * state[router][3]) / 9)
    assert torch.equal(small_state["layers.0.mlp.bias"], state["layers.0.mlp.bias"])
    kept = plan(usage["layers.0.mlp"], "frequency", 2, 0)
    assert kept == [[0], [2]]  # the two most used, in their order
    small_state, small = prune_experts(state, cfg, usage, {"layers.0.mlp": kept})
    assert small.smoe.top_k == 2 and torch.equal(small_state[router], state[router][[0, 2]])
    for new, old in enumerate((0, 2)):
        assert all(torch.equal(v, _expert(state, 0, old)[k]) for k, v in _expert(small_state, 0, new).items())


def test_moa_experts_merge_into_usage_weighted_rows():
    from cherry_megatron.prune.experts import merge_moa

    g = torch.Generator().manual_seed(9)
    state = {"layers.0.attn.q_experts": torch.randn(3, 8, 6, generator=g),
             "layers.0.attn.o_experts": torch.randn(3, 6, 8, generator=g)}
    out = merge_moa(state, "layers.0.attn", [[0, 1], [2]], torch.tensor([3, 1, 0]))
    for name, t in state.items():
        assert out[name].shape == (2, *t.shape[1:])
        torch.testing.assert_close(out[name][0], (3 * t[0] + t[1]) / 4, rtol=1e-6, atol=1e-7)
        assert torch.equal(out[name][1], t[2])  # a singleton, unused, passes through
    unused = merge_moa(state, "layers.0.attn", [[1, 2], [0]], torch.tensor([3, 0, 0]))
    torch.testing.assert_close(unused["layers.0.attn.q_experts"][0], (state["layers.0.attn.q_experts"][1] +
                               state["layers.0.attn.q_experts"][2]) / 2)  # none used: the plain mean


def test_frequency_merge_sends_each_expert_to_its_most_similar_centre():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(400, 5, generator=g)
    logits[:, 1], logits[:, 3] = 2 * logits[:, 4], logits[:, 0] + 0.01 * torch.randn(400, generator=g)
    usage = Usage(logits, torch.tensor([50, 1, 40, 2, 30]))
    assert plan(usage, "frequency-merge", 3, 0) == [[0, 3], [2], [4, 1]]


def _whole_model(preset: str, sets: list[str]):
    cfg = load_config(preset, sets)
    torch.manual_seed(6)
    model = build_model(cfg)
    with torch.no_grad():  # LoRA B starts at zero: make every factor matter
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    state = _tensors(model)
    perm_gen = torch.Generator().manual_seed(7)
    for layer in range(len(model.layers)):
        copy = permute(_expert(state, layer, 0), torch.randperm(cfg.model.ffn_size, generator=perm_gen))
        state.update({f"layers.{layer}.{EXPERTS}.1.{k}": v for k, v in copy.items()})
        for name in ("q_experts", "o_experts"):  # MoA experts share K/V: a plain copy is the same function
            if f"layers.{layer}.attn.{name}" in state:
                state[f"layers.{layer}.attn.{name}"][1] = state[f"layers.{layer}.attn.{name}"][0]
    load_into(model, state, "test")
    return cfg, model.eval(), state


@pytest.mark.parametrize("preset, sets", [
    ("smoe-tiny", [*SMALL, "smoe.num_experts=2", "smoe.top_k=2"]),
    ("recurrent-tiny", ["model.vocab_size=512", "model.hidden_size=32", "model.num_heads=2", "model.num_layers=4",
                        "model.ffn_hidden_size=24", "recurrent.lora_rank=4", "recurrent.exit_depths=[]",
                        "moee.num_experts=2", "moee.top_k=2"])])
def test_merging_permuted_copies_leaves_a_whole_model_unchanged(world_of_one, preset, sets):
    """Top-2 of two experts computing one function (gates summing to 1) is that function, and so is the merged
    top-1 of one: an smoe model (MoA and MLP) and a recurrent MoEE one with per-position expert LoRA."""
    cfg, model, state = _whole_model(preset, sets)
    tokens = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(8))
    usage = calibrate(model, list(tokens.split(2)), k=2)
    runs = 2 if cfg.recurrent.num_blocks else 1  # a shared block's gate sees each of its positions
    assert all(u.logits.shape == (48 * runs, 2) and u.counts.sum() == 96 * runs for u in usage.values())
    assert len(usage) == (4 if cfg.smoe.attention_experts and cfg.smoe.num_experts else 2)
    groups = {name: plan(u, "uncurl", 1, 0) for name, u in usage.items()}
    small_state, small = prune_experts(state, cfg, usage, groups)
    pruned = build_model(small)
    load_into(pruned, small_state, "pruned")
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(tokens).logits, model(tokens).logits, rtol=1e-4, atol=1e-5)


def _cli_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert exit_.value.code == 2 and len(lines) == 1, lines
    return lines[0]


def test_bad_input_is_one_error_and_writes_nothing(world_of_one, corpus, tmp_path, capsys):
    for name, preset, sets in [("smoe", "smoe-tiny", [*SMALL, "smoe.num_experts=4"]), ("dense", "tiny", SMALL[:2])]:
        cfg = load_config(preset, sets)
        save_consolidated(tmp_path / name, _tensors(build_model(cfg)), cfg.to_dict())
    out = tmp_path / "out"
    args = ["--load", str(tmp_path / "smoe"), "--calib", str(corpus.train), "--output", str(out)]
    for argv, message in [([*args, "--keep-experts", "4"], "--keep-experts 4 must be in 1..3"),
                          ([*args, "--keep-experts", "0"], "must be in 1..3"),
                          ([*args, "--keep-experts", "2", "--method", "kmeans"], "--method must be one of"),
                          ([*args, "--keep-experts", "2", "--calib-tokens", "10"], "at least one --seq-length"),
                          ([*args, "--keep-experts", "2", "--calib-tokens", str(10 ** 12)], "fewer than --calib"),
                          ([*args, "--keep-experts", "2", "--router", "zeros"], "--router must be one of"),
                          (["--load", str(tmp_path / "dense"), *args[2:], "--keep-experts", "2"], "not a routed model"),
                          (["--load", str(tmp_path / "smoe"), "--calib", str(tmp_path / "nope"), "--output", str(out),
                            "--keep-experts", "2"], "missing data file")]:
        assert message in _cli_error(capsys, argv)
        assert not out.exists()
    out.mkdir()
    assert "exists already" in _cli_error(capsys, [*args, "--keep-experts", "2"])
    assert not any(out.iterdir())


# ---------------------------------------------------------------------------------------------------- CLI (slow)
RETRAIN = ["train.steps=2", "train.micro_batch_size=2", "train.global_batch_size=4", "train.seq_length=64",
           "train.eval_interval=2", "train.eval_tokens=1024", "train.save_interval=2", "train.warmup_steps=1",
           "train.log_interval=1"]


def _prune(load, out, *args):
    proc = run_cli(["tools/prune_experts.py", "--load", str(load), "--output", str(out), "--calib-tokens", "1024",
                    "--seq-length", "64", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def _eval_losses(run_dir):
    return {r["step"]: r["eval_loss"] for r in read_metrics(run_dir) if r.get("eval_loss") is not None}


@pytest.mark.slow
def test_pruned_smoe_checkpoint_trains_at_ep1_and_ep2(corpus, tmp_path):
    from safetensors.torch import load_file

    from cherry_megatron.convert.load import load_consolidated

    run = tmp_path / "smoe"
    train(run, ["train.steps=3", "train.save_interval=3", "train.eval_interval=3"], config="smoe-tiny")
    proc, result = _prune(run, tmp_path / "uncurl", "--calib", str(corpus.heldout), "--keep-experts", "4")
    assert (result["experts_before"], result["experts_after"], result["top_k"]) == (8, 4, 2)
    assert result["params_after"] < result["params_before"]
    assert sum(line.startswith("layers.") for line in proc.stdout.splitlines()) == 4  # 2 layers x (MoA, MLP)
    for groups in result["clusters"].values():
        assert sorted(e for g in groups for e in g) == list(range(8)) and len(groups) == 4
    pruned = load_file(str(tmp_path / "uncurl/model.safetensors"))
    assert pruned["layers.1.mlp.deepspeed_moe.gate.wg.weight"].shape == (4, 256)
    assert pruned["layers.1.attn.q_experts"].shape[0] == 4 and f"layers.1.{EXPERTS}.4.down.weight" not in pruned
    # frequency: the most used experts' weights, untouched
    _, freq = _prune(run, tmp_path / "frequency", "--calib", str(corpus.heldout), "--keep-experts", "4",
                     "--method", "frequency")
    orig, _ = load_consolidated(str(run))
    kept = load_file(str(tmp_path / "frequency/model.safetensors"))
    for new, (old,) in enumerate(freq["clusters"]["layers.0.mlp"]):
        name = f"layers.0.{EXPERTS}.{{}}.gate_up.weight"
        assert torch.equal(kept[name.format(new)], orig[name.format(old)])
    config = str(tmp_path / "uncurl/config.yaml")
    train(tmp_path / "ep1", RETRAIN, config=config, short=False)
    train(tmp_path / "ep2", RETRAIN + ["smoe.ep_size=2"], nproc=2, config=config, short=False)
    ep1, ep2 = _eval_losses(tmp_path / "ep1"), _eval_losses(tmp_path / "ep2")
    assert ep1[0] == pytest.approx(ep2[0], rel=1e-5)  # both start from the same pruned weights
    for step in ep1:  # one global batch, split over two ranks at EP=2: the same curve
        assert ep1[step] == pytest.approx(ep2[step], rel=1e-4), step
    # UNCURL's last step, the routers alone (ZeRO-0: DeepSpeed's ZeRO-1/2 optimizer wants a trainable expert)
    train(tmp_path / "routers", RETRAIN + [r"train.trainable=router|gate\.wg", "parallel.zero_stage=0",
                                           "train.precision=fp32"],
          config=config, short=False)
    start, _ = load_consolidated(str(tmp_path / "uncurl"))
    after, _ = load_consolidated(str(tmp_path / "routers"))
    routers = {n for n in start if n.endswith(("attn.router.weight", "gate.wg.weight"))}
    assert len(routers) == 4 and start.keys() == after.keys()
    assert all(not torch.equal(start[n], after[n]) for n in routers)
    assert all(torch.equal(start[n], after[n]) for n in start.keys() - routers)


def test_trainable_freezes_the_rest_and_refuses_frozen_experts_under_zero_1(world_of_one):
    from cherry_megatron.config import ConfigError
    from cherry_megatron.engine import freeze_except, param_groups

    model = build_model(load_config("smoe-tiny", [*SMALL, "smoe.num_experts=4"]))
    trainable, total = freeze_except(model, r"router|gate\.wg", zero_stage=0)
    assert trainable == 2 * 2 * 4 * 32 and total == sum(p.numel() for p in model.parameters())
    groups = param_groups(model, 0.1)
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable
    with pytest.raises(ConfigError, match="freezes every expert"):
        freeze_except(model, r"router|gate\.wg", zero_stage=1)
    freeze_except(model, r"router|gate\.wg|experts", zero_stage=1)  # a trainable expert: DeepSpeed takes it
    with pytest.raises(ConfigError, match="matches no parameter"):
        freeze_except(model, "nothing-is-called-this", zero_stage=0)
