import pytest
import torch

from cherry_megatron.checkpoint.consolidate import merge_tp, split_tp
from cherry_megatron.config import load_config
from cherry_megatron.model.gpt import GPT, count_parameters, pad_vocab
from cherry_megatron.model.layers import apply_rope, RotaryEmbedding


@pytest.mark.parametrize("preset, vocab", [("tiny", 8192), ("small", 8192)])
def test_parameter_count_matches_analytic(world_of_one, preset, vocab):
    cfg = load_config(preset, [f"model.vocab_size={vocab}"]).model
    model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)["total"]
    cfg.tie_embeddings = True
    tied = GPT(cfg)
    assert sum(p.numel() for p in tied.parameters()) == count_parameters(cfg)["total"]


def test_1b_preset_count_without_allocating(world_of_one):
    cfg = load_config("dense-1b-48l").model
    n = count_parameters(cfg)
    # 48 x (2*1280*1280 + 2*1280*640 + 3*1280*3520 + 2*1280) + 2*45056*1280 + 1280, by hand:
    assert n["per_layer"] == 18_434_560
    assert n["total"] == 1_000_203_520
    with torch.device("meta"):  # shapes only: no 4 GB allocation
        model = GPT(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == n["total"]


def test_vocab_padding_as_megatron():
    assert pad_vocab(8000, 128, 1) == 8064
    assert pad_vocab(8000, 128, 2) == 8192
    assert pad_vocab(8192, 128, 2) == 8192


def test_forward_shapes_and_causality(world_of_one):
    torch.manual_seed(0)
    cfg = load_config("tiny", ["model.vocab_size=512", "model.num_layers=2"]).model
    model = GPT(cfg).eval()
    x = torch.randint(0, 512, (2, 16))
    logits = model(x).logits
    assert logits.shape == (2, 16, 512)
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 512  # changing later tokens must not change earlier logits
    assert torch.allclose(model(y).logits[:, :10], logits[:, :10], atol=1e-5)
    loss = model(x, x.roll(-1, 1)).per_token
    assert loss.shape == (2, 16) and torch.isfinite(loss).all()


def test_rope_is_a_rotation():
    rope = RotaryEmbedding(8, 10000.0)
    cos, sin = rope(5, torch.device("cpu"), torch.float32)
    q = torch.randn(1, 1, 5, 8)
    assert torch.allclose(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    # relative: <R_m q, R_n k> depends on m - n only
    k = torch.randn(1, 1, 5, 8)
    q0, k0 = q[..., :1, :].expand_as(q), k[..., :1, :].expand_as(k)
    dots = (apply_rope(q0, cos, sin)[..., 1:, :] * apply_rope(k0, cos, sin)[..., :-1, :]).sum(-1)
    assert torch.allclose(dots, dots[..., :1].expand_as(dots), atol=1e-5)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_split_merge_round_trip(tp):
    from cherry_megatron.model import layout_table

    full = {"layers.0.attn.kv.weight": torch.arange(8 * 3.0).view(8, 3),
            "layers.0.attn.o.weight": torch.arange(3 * 8.0).view(3, 8),
            "layers.0.attn_norm.weight": torch.ones(3)}
    layout = layout_table(load_config("tiny", ["model.vocab_size=512"]).to_dict())  # the layers' own layout
    assert (layout("layers.0.attn.kv.weight"), layout("layers.0.attn.o.weight")) == ((0, 2), (1, 1))
    shards = [split_tp(full, tp, r, layout) for r in range(tp)]
    # a strided (k|v) shard holds its k rows then its v rows
    k_rows, v_rows = full["layers.0.attn.kv.weight"].chunk(2)
    assert torch.equal(shards[1]["layers.0.attn.kv.weight"],
                       torch.cat([k_rows.chunk(tp)[1], v_rows.chunk(tp)[1]]))
    merged = merge_tp(shards, layout)
    assert all(torch.equal(merged[k], full[k]) for k in full)


@pytest.mark.parametrize("preset, sets", [("tiny", []), ("recurrent-tiny", ["recurrent.exit_depths=[]"]),
                                          ("tiny", ["moee.num_experts=2", "moee.mtp_depth=1"])])
def test_activation_checkpointing_changes_no_loss_or_gradient(world_of_one, preset, sets):
    from cherry_megatron.model import build_model

    grads = {}
    for every in (0, 1, 2):
        cfg = load_config(preset, ["model.vocab_size=512", f"train.activation_checkpointing={every}", *sets])
        torch.manual_seed(0)
        model = build_model(cfg)
        tokens, labels = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
        out = model(tokens, labels, loss_mask=torch.ones(2, 32))
        loss = out.per_token.mean()
        loss = loss + sum(w * t for w, t in out.aux.values())
        loss.backward()
        grads[every] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    base_loss, base = grads[0]
    for every in (1, 2):
        loss, g = grads[every]
        assert loss == base_loss and g.keys() == base.keys()
        assert all(torch.allclose(g[n], base[n], rtol=1e-5, atol=1e-7) for n in base), every


def test_rope_frequencies_stay_fp32_when_the_module_is_cast_to_bf16():
    """No frequency buffer for a bf16 cast to round: the cast module gives fp32-computed cos/sin, rounded only at
    the end, and the phase at position 2047 is what fp64 says."""
    import math

    rope = RotaryEmbedding(64, 10000.0)
    reference = rope(2048, torch.device("cpu"), torch.float32)
    rope.to(torch.bfloat16)
    cos, sin = rope(2048, torch.device("cpu"), torch.bfloat16)
    assert torch.equal(cos, reference[0].to(torch.bfloat16)) and torch.equal(sin, reference[1].to(torch.bfloat16))
    phase = 2047 * (1.0 / 10000.0 ** (2 / 64))  # the second frequency at the last position
    assert abs(math.atan2(reference[1][2047, 1].item(), reference[0][2047, 1].item())
               - math.atan2(math.sin(phase), math.cos(phase))) < 1e-3
    assert rope(2048, torch.device("cpu"), torch.float32) is not None and len(rope._cache) == 2  # cached per dtype


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss_and_gradients(world_of_one):
    """`train.compile`: every block compiled in place (inductor on CPU), the same loss and gradients as eager."""
    from cherry_megatron.config import load_config
    from cherry_megatron.model import build_model, compile_blocks

    cfg = load_config("tiny", ["model.vocab_size=256", "model.num_layers=2", "model.hidden_size=64",
                               "model.num_heads=2", "model.num_kv_heads=1", "model.ffn_hidden_size=128"])
    torch.manual_seed(0)
    eager = build_model(cfg)
    torch.manual_seed(0)
    compiled = build_model(cfg)
    assert compile_blocks(compiled) == 2
    tokens = torch.randint(0, 256, (2, 32))
    losses = []
    for model in (eager, compiled):
        loss = model(tokens, tokens.roll(-1, 1)).per_token.mean()
        loss.backward()
        losses.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(losses[0][1], losses[1][1]))
