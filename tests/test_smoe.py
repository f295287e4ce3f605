"""JetMoE-style sparse models: MoA and MoE against naive per-token loops, router losses by their formulas, preset
counts, and equal curves across EP, TP and TP x PP layouts (slow)."""
import math

import pytest
import torch
import torch.nn.functional as F

from cherry_megatron.config import ConfigError, load_config
from cherry_megatron.losses import switch_loss, z_loss
from cherry_megatron.metrics import read_metrics
from cherry_megatron.model import build_model, parameter_count
from cherry_megatron.model.layers import Attention, RotaryEmbedding, apply_rope, parallel_config
from cherry_megatron.model.smoe import MixtureOfAttention, SparseMLP
from conftest import train

SMALL = ["model.vocab_size=512", "model.hidden_size=32", "model.num_heads=2", "model.num_kv_heads=2",
         "model.ffn_hidden_size=24", "model.num_layers=2"]


def _cfg(*sets):
    return load_config("smoe-tiny", [*SMALL, *sets])


def _randomise(module, std=0.3, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def test_moa_with_one_expert_and_k1_is_standard_attention(world_of_one):
    cfg = _cfg("smoe.num_experts=1", "smoe.top_k=1")
    mp = parallel_config(1)
    moa, attn = MixtureOfAttention(cfg.model, mp, cfg.smoe), Attention(cfg.model, mp)
    _randomise(attn)
    with torch.no_grad():
        moa.q_experts[0].copy_(attn.q.weight)
        moa.o_experts[0].copy_(attn.o.weight)
        moa.kv.weight.copy_(attn.kv.weight)
    x = torch.randn(2, 7, 32)
    cos, sin = RotaryEmbedding(cfg.model.head_dim, cfg.model.rope_theta)(7, x.device, x.dtype)
    out, lb, z = moa.route(x, cos, sin)
    torch.testing.assert_close(out, attn(x, cos, sin), rtol=1e-5, atol=1e-6)
    assert lb.item() == pytest.approx(1.0)  # one expert: trivially balanced


def _naive_moa(moa, x, cos, sin, k):
    """Per token and slot: the expert's query heads over the shared causal keys, its output projection, the
    gate from the softmax over the token's top-k logits."""
    b, s, d = x.shape
    n, hd = moa.n_kv, moa.head_dim
    kv = F.linear(x, moa.kv.weight)
    keys = apply_rope(kv[..., :n * hd].view(b, s, n, hd).transpose(1, 2), cos, sin)
    values = kv[..., n * hd:].view(b, s, n, hd).transpose(1, 2)
    out = torch.zeros_like(x)
    for bi in range(b):
        for t in range(s):
            logits = F.linear(x[bi, t], moa.router.weight)
            top = logits.topk(k)
            gates = top.values.softmax(-1)
            for g, e in zip(gates, top.indices):
                q = F.linear(x[bi, t], moa.q_experts[e]).view(n, 1, hd)
                q = apply_rope(q, cos[t:t + 1], sin[t:t + 1])
                att = torch.softmax(q @ keys[bi, :, :t + 1].transpose(-1, -2) / math.sqrt(hd), -1) @ values[bi, :, :t + 1]
                out[bi, t] += g * F.linear(att.reshape(-1), moa.o_experts[e])
    return out + moa.bias


@pytest.mark.parametrize("k", [1, 2, 3])
def test_moa_equals_a_naive_per_token_loop(world_of_one, k):
    cfg = _cfg("smoe.num_experts=4", f"smoe.top_k={k}")
    moa = MixtureOfAttention(cfg.model, parallel_config(1), cfg.smoe)
    _randomise(moa, seed=k)
    x = torch.randn(2, 6, 32)
    cos, sin = RotaryEmbedding(cfg.model.head_dim, cfg.model.rope_theta)(6, x.device, x.dtype)
    out, _, _ = moa.route(x, cos, sin)
    torch.testing.assert_close(out, _naive_moa(moa, x, cos, sin, k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_moe_mlp_equals_a_naive_per_token_loop(world_of_one, k):
    cfg = _cfg("smoe.num_experts=4", f"smoe.top_k={k}")
    mlp = SparseMLP(cfg.model, cfg.smoe, 1, 0, torch.float32)
    _randomise(mlp, seed=10 + k)
    x = torch.randn(2, 5, 32)
    out, lb, z = mlp.route(x, 0)
    wg = mlp.deepspeed_moe.gate.wg.weight
    want = torch.zeros_like(x)
    for bi in range(2):
        for t in range(5):
            top = F.linear(x[bi, t], wg).topk(k)
            for g, e in zip(top.values.softmax(-1), top.indices):
                expert = mlp.experts()[e]
                gate, up = F.linear(x[bi, t], expert.gate_up.weight).chunk(2)
                want[bi, t] += g * F.linear(F.silu(gate) * up, expert.down.weight)
    torch.testing.assert_close(out, want + mlp.bias, rtol=1e-5, atol=1e-5)
    logits = F.linear(x.reshape(-1, 32), wg)
    assert z.item() == pytest.approx(z_loss(logits).item())
    assert lb.item() == pytest.approx(switch_loss(logits, k).item())


def test_switch_loss_is_one_balanced_and_e_collapsed_and_z_loss_its_formula():
    e = 4
    # perfect balance: every token's probabilities uniform, the top-1 assignments spread evenly
    balanced = torch.eye(e).repeat(8, 1) * 1e-4  # ties broken towards a different expert per token
    assert switch_loss(balanced, 1).item() == pytest.approx(1.0, abs=1e-3)
    assert switch_loss(balanced, 2).item() == pytest.approx(1.0, abs=1e-3)
    collapsed = torch.tensor([[50.0, 0, 0, 0]]).repeat(16, 1)  # every token to expert 0 with probability ~1
    assert switch_loss(collapsed, 1).item() == pytest.approx(e, rel=1e-6)
    logits = torch.randn(10, e)
    want = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 10
    assert z_loss(logits).item() == pytest.approx(want, rel=1e-5)
    # f_i P_i by hand for a random router at k=2
    probs = logits.softmax(-1)
    f = torch.zeros(e)
    for row in logits.topk(2).indices:
        f[row] += 1
    assert switch_loss(logits, 2).item() == pytest.approx((e * (f / 20) * probs.mean(0)).sum().item(), rel=1e-6)


def test_training_objective_has_each_routers_losses_apart(world_of_one):
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, 512, (2, 16))
    out = model(tokens, tokens, loss_mask=torch.ones(2, 16))
    assert set(out.aux) == {"load_balance_loss", "router_z_loss", "moa_load_balance_loss", "moa_z_loss"}
    assert all(w == pytest.approx(v) for (w, _), v in zip(out.aux.values(), [0.01, 0.001, 0.01, 0.001]))
    lb = out.aux["moa_load_balance_loss"][1] / cfg.model.num_layers
    assert 1.0 <= lb.item() <= 8.0  # Switch's range, summed over the layers
    out.per_token.mean().backward()
    assert model.layers[0].attn.q_experts.grad is not None
    dense = build_model(_cfg("smoe.attention_experts=false", "model.num_heads=2"))
    assert set(dense(tokens, tokens, loss_mask=torch.ones(2, 16)).aux) == {"load_balance_loss", "router_z_loss"}


def test_sgt_supervises_the_selected_positions_with_the_full_forwards_losses(world_of_one):
    from cherry_megatron.sgt import RandomPolicy, Selection

    torch.manual_seed(0)
    model = build_model(_cfg())
    tokens, labels = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    valid = torch.ones(2, 16, dtype=torch.bool)
    out = model(tokens, labels, select=Selection(RandomPolicy(1), 0.25, "sequence", labels, valid, key=0),
                loss_mask=valid.float())
    full = model(tokens, labels, loss_mask=valid.float())
    assert out.mask.sum() == 8 and (out.per_token[~out.mask] == 0).all()
    torch.testing.assert_close(out.per_token[out.mask], full.per_token[out.mask])
    assert set(out.aux) == set(full.aux)  # routing sees every position whatever SGT supervises


def test_presets_count_as_the_meta_model(world_of_one):
    for preset in ("smoe-tiny", "jetmoe-8b"):
        cfg = load_config(preset, ["model.vocab_size=8192"] if preset == "smoe-tiny" else [])
        with torch.device("meta"):
            counted = sum(p.numel() for p in build_model(cfg).parameters())
        counts = parameter_count(cfg)
        assert counts["total"] == counted, preset
    assert counts["total"] == 8_522_237_952  # jetmoe-8b: "8B", about 8.5B
    assert 2.2e9 <= counts["active_non_embedding"] <= counts["active"] <= 2.35e9


def test_training_flops_count_k_experts_and_their_query_heads():
    """6N + 12 L H S by hand: N the layers' active weights (k of 4 experts in each mixture, routers, the shared
    k/v and biases, norms) and the output layer, H the query width of the k MoA experts."""
    from cherry_megatron.model import training_flops_per_token

    for k, moa in [(1, True), (2, True), (3, False)]:
        cfg = _cfg("smoe.num_experts=4", f"smoe.top_k={k}", f"smoe.attention_experts={str(moa).lower()}",
                   "train.seq_length=64")
        h, f, hd, layers, s = 32, 24, 16, 2, 64
        attn = k * 2 * h * 2 * hd + 4 * h + 2 * h * 2 * hd + h if moa else 2 * h * 2 * hd + 2 * h * 2 * hd
        mlp = k * 3 * h * f + 4 * h + h
        n = layers * (attn + mlp + 2 * h) + 512 * h
        width = k * 2 * hd if moa else 2 * hd
        assert training_flops_per_token(cfg) == 6 * n + 12 * layers * width * s, (k, moa)


def test_bad_smoe_configs():
    for sets, message in [(["smoe.num_experts=3", "smoe.ep_size=2"], "does not divide smoe.num_experts"),
                          (["smoe.top_k=9"], "must lie in 1..smoe.num_experts"),
                          (["parallel.zero_stage=3"], "ZeRO stage 3"),
                          (["model.num_kv_heads=2"], "set model.num_heads to it"),
                          (["moee.num_experts=2"], "a model of its own"),
                          (["smoe.num_experts=0", "smoe.ep_size=2"], "smoe.num_experts is 0")]:
        with pytest.raises(ConfigError, match=message):
            load_config("smoe-tiny", sets)


# ------------------------------------------------------------------------------------------ layouts (slow)
SMOE = ["smoe.num_experts=4", "train.micro_batch_size=2", "train.global_batch_size=4"]


def _losses(run_dir, key="loss"):
    return {r["step"]: r[key] for r in read_metrics(run_dir) if r.get(key) is not None}


def _same_curves(run, base, keys=("loss", "eval_loss", "grad_norm", "moa_load_balance_loss", "load_balance_loss")):
    for key in keys:
        want, got = _losses(base, key), _losses(run, key)
        assert want and got.keys() == want.keys(), (run, key)
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-4), (run, key, step)


@pytest.fixture(scope="module")
def smoe_dp2(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "dp2"
    train(run_dir, SMOE, nproc=2, config="smoe-tiny")
    return run_dir


@pytest.mark.slow
def test_smoe_expert_and_tensor_parallel_give_the_same_curve(smoe_dp2, tmp_path):
    """EP=2 (two MLP experts per rank) and TP=2 (heads and experts split, ZeRO-2) against EP=1 on 2 DP ranks."""
    train(tmp_path / "ep2", SMOE + ["smoe.ep_size=2"], nproc=2, config="smoe-tiny")
    train(tmp_path / "tp2", SMOE + ["parallel.tp=2", "parallel.zero_stage=2"], nproc=2, config="smoe-tiny")
    for run in (tmp_path / "ep2", tmp_path / "tp2"):
        _same_curves(run, smoe_dp2)


@pytest.mark.slow
def test_smoe_tp2_pp2_equals_unpipelined_and_resumes_exactly(corpus, tmp_path):
    sets = SMOE + ["train.global_batch_size=2", "parallel.zero_stage=1"]
    train(tmp_path / "tp1", sets, config="smoe-tiny")
    train(tmp_path / "tp2pp2", sets + ["parallel.tp=2", "parallel.pp=2"], nproc=4, config="smoe-tiny")
    _same_curves(tmp_path / "tp2pp2", tmp_path / "tp1")
    train(tmp_path / "resumed", sets + ["train.exit_at_step=3"], config="smoe-tiny")
    proc = train(tmp_path / "resumed", sets, config="smoe-tiny")
    assert "start_step=3" in proc.stdout
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "tp1")
