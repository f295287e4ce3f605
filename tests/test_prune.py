"""Minitron pruning: importance against a numpy forward written out by hand, slicing against zeroing and against
an independently sliced reference, GQA head choice, planted identity layers and dead heads, TP invariance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cherry_megatron.checkpoint.consolidate import load_into
from cherry_megatron.compress.depth import compress
from cherry_megatron.config import ConfigError, load_config
from cherry_megatron.model import build_model
from cherry_megatron.model.gpt import GPT
from cherry_megatron.prune.importance import activation_scores, calibration_batches
from cherry_megatron.prune.slicing import Keep, prune_state, top_heads, top_k
from conftest import error_lines, run_cli

V = 512


def _dense(heads=8, kv=2, layers=3, seed=0):
    cfg = load_config("tiny", [f"model.vocab_size={V}", "model.hidden_size=64", f"model.num_layers={layers}",
                               f"model.num_heads={heads}", f"model.num_kv_heads={kv}", "model.ffn_hidden_size=96"])
    torch.manual_seed(seed)
    model = GPT(cfg.model).double()
    with torch.no_grad():  # norm weights away from 1, so slicing a norm matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return cfg, model.eval(), _state(model)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def _build(cfg, state):
    model = build_model(cfg).double()
    load_into(model, state, "test")
    return model.eval()


def _tokens(n=6, s=20, seed=1):
    return torch.randint(0, V, (n, s), generator=torch.Generator().manual_seed(seed))


# --- numpy reference: the forward pass and the aggregation, by hand -------------------------------------------

def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, theta):  # x [b, H, s, hd], rotate-half (Hugging Face Llama)
    hd, s = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    f = np.outer(np.arange(s), inv)
    cos, sin = np.cos(np.concatenate([f, f], -1)), np.sin(np.concatenate([f, f], -1))
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin


def numpy_forward(st, m, tokens, skip=()):
    """Logits and the activations Minitron scores: down-projection inputs, per-head output norms, every RMSNorm
    output, each layer's cos(x_in, x_out)."""
    st = {k: v.numpy() for k, v in st.items()}
    H, G = m.num_heads, m.kv_heads
    hd, layers = st["layers.0.attn.q.weight"].shape[0] // H, len({k.split(".")[1] for k in st if k.startswith("layers.")})
    x = st["embed.weight"][tokens.numpy()]
    b, s, _ = x.shape
    acts = {"ffn": [], "heads": [], "norms": [], "cos": []}
    for i in range(layers):
        if i in skip:
            continue
        w = lambda n: st[f"layers.{i}.{n}.weight"]  # noqa: E731
        x_in = x
        a = _rms(x, w("attn_norm"), m.norm_eps)
        q = (a @ w("attn.q").T).reshape(b, s, H, hd).transpose(0, 2, 1, 3)
        k, v = np.split(a @ w("attn.kv").T, 2, axis=-1)
        k, v = (t.reshape(b, s, G, hd).transpose(0, 2, 1, 3).repeat(H // G, axis=1) for t in (k, v))
        q, k = _rope(q, m.rope_theta), _rope(k, m.rope_theta)
        att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + np.triu(np.full((s, s), -np.inf), 1)
        att = np.exp(att - att.max(-1, keepdims=True))
        y = (att / att.sum(-1, keepdims=True)) @ v  # [b, H, s, hd]
        acts["heads"].append(np.linalg.norm(y, axis=-1).transpose(0, 2, 1))
        x = x + y.transpose(0, 2, 1, 3).reshape(b, s, H * hd) @ w("attn.o").T
        mm = _rms(x, w("mlp_norm"), m.norm_eps)
        gate, up = np.split(mm @ w("mlp.gate_up").T, 2, axis=-1)
        act = gate / (1 + np.exp(-gate)) * up
        acts["ffn"].append(act)
        x = x + act @ w("mlp.down").T
        acts["norms"] += [a, mm]
        acts["cos"].append((x_in * x).sum(-1) / np.linalg.norm(x_in, axis=-1) / np.linalg.norm(x, axis=-1))
    head = st["head.weight"] if "head.weight" in st else st["embed.weight"]
    return _rms(x, st["norm.weight"], m.norm_eps) @ head.T, acts


def _aggregate(per_position):  # [n, s, c]: mean over the sequence of |a|, L2 over the samples
    return np.sqrt((np.abs(per_position).mean(1) ** 2).sum(0))


def test_importance_equals_a_numpy_reference_for_any_batching(world_of_one):
    cfg, model, state = _dense()
    tokens = _tokens()
    _, acts = numpy_forward(state, cfg.model, tokens)
    want_ffn = [_aggregate(a) for a in acts["ffn"]]
    want_heads = [_aggregate(a) for a in acts["heads"]]
    want_hidden = sum(_aggregate(a) for a in acts["norms"])
    want_bi = [1 - c.mean() for c in acts["cos"]]
    for batching in ([6], [4, 2], [1, 1, 1, 1, 1, 1]):
        s = activation_scores(model, list(tokens.split(batching)))
        for got, want in [*zip(s.ffn, want_ffn), *zip(s.heads, want_heads), (s.hidden, want_hidden),
                          (s.depth, want_bi)]:
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-12)


def test_calibration_windows_and_their_errors():
    stream = np.arange(100)
    (a, b) = calibration_batches(stream, 10, 5, 3)
    assert a.shape == (3, 10) and b.shape == (2, 10) and a[1, 0] == 10
    with pytest.raises(ConfigError, match="fewer than"):
        calibration_batches(stream, 10, 11, 4)
    assert len(calibration_batches(stream, 10, 5, 3, vocab_size=50)) == 2  # ids 0..49 only
    with pytest.raises(ConfigError, match="token id 59, outside the model's vocabulary of 50"):
        calibration_batches(stream, 10, 6, 3, vocab_size=50)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_numpy_reference_is_the_model():
    cfg, model, state = _dense()
    tokens = _tokens()
    ref, _ = numpy_forward(state, cfg.model, tokens)
    np.testing.assert_allclose(_logits(model, tokens).numpy(), ref, atol=1e-9)


def test_removing_a_neuron_or_a_head_equals_zeroing_what_it_writes(world_of_one):
    cfg, model, state = _dense()
    tokens = _tokens()
    drop_ffn, drop_heads = [5, 40, 95], [1, 6]  # one query head of each of the two KV groups
    keep = Keep(ffn=[torch.tensor([j for j in range(96) if j != drop_ffn[i]]) for i in range(3)],
                heads=[torch.tensor([h for h in range(8) if h not in drop_heads])] * 3)
    small_state, small = prune_state(state, cfg, keep)
    assert (small.model.ffn_hidden_size, small.model.num_heads, small.model.kv_heads) == (95, 6, 2)
    zeroed = dict(state)
    for i in range(3):
        down, o = state[f"layers.{i}.mlp.down.weight"].clone(), state[f"layers.{i}.attn.o.weight"].clone()
        down[:, drop_ffn[i]] = 0
        for h in drop_heads:
            o[:, h * 8:(h + 1) * 8] = 0
        zeroed[f"layers.{i}.mlp.down.weight"], zeroed[f"layers.{i}.attn.o.weight"] = down, o
    torch.testing.assert_close(_logits(_build(small, small_state), tokens), _logits(_build(cfg, zeroed), tokens),
                               rtol=0, atol=1e-5)


def test_multi_head_attention_heads_leave_with_their_k_and_v(world_of_one):
    cfg, model, state = _dense(heads=8, kv=8)
    tokens = _tokens()
    small_state, small = prune_state(state, cfg, Keep(heads=[torch.tensor([0, 1, 2, 4, 5, 6, 7])] * 3))
    assert (small.model.num_heads, small.model.kv_heads) == (7, 7)
    assert small_state["layers.0.attn.kv.weight"].shape == (2 * 7 * 8, 64)
    zeroed = dict(state)
    for i in range(3):
        o = state[f"layers.{i}.attn.o.weight"].clone()
        o[:, 24:32] = 0
        zeroed[f"layers.{i}.attn.o.weight"] = o
    torch.testing.assert_close(_logits(_build(small, small_state), tokens), _logits(_build(cfg, zeroed), tokens),
                               rtol=0, atol=1e-5)


def test_dropping_a_layer_equals_skipping_it(world_of_one):
    cfg, model, state = _dense()
    tokens = _tokens()
    small_state, small = prune_state(state, cfg, Keep(layers=[0, 2]))
    assert small.model.num_layers == 2
    x = model.embed(tokens)
    ctx = model.context(x)
    with torch.no_grad():
        for unit in model.units():
            if unit.index != 1:
                x = unit.call(x, ctx)
        skipped = model.logits(model.final_norm(x))
    torch.testing.assert_close(_logits(_build(small, small_state), tokens), skipped, rtol=0, atol=1e-5)


def test_permuting_every_axis_leaves_the_logits_unchanged(world_of_one):
    cfg, model, state = _dense()
    tokens = _tokens()
    s = activation_scores(model, [tokens])
    by_importance = Keep(ffn=[torch.argsort(f, descending=True) for f in s.ffn],
                         # query heads reordered within their KV group: head h must still read group h // 4
                         heads=[torch.cat([torch.argsort(h[g * 4:(g + 1) * 4], descending=True) + g * 4
                                           for g in range(2)]) for h in s.heads],
                         hidden=torch.argsort(s.hidden, descending=True))
    assert not torch.equal(by_importance.hidden, torch.arange(64))
    perm_state, perm = prune_state(state, cfg, by_importance)
    torch.testing.assert_close(_logits(_build(perm, perm_state), tokens), _logits(model, tokens), rtol=0, atol=1e-9)
    # ... so the top-k in importance order and in index order are the same model
    k = Keep(ffn=[top_k(f, 60) for f in s.ffn], heads=[top_heads(h, 2, 4) for h in s.heads],
             hidden=top_k(s.hidden, 48))
    k_desc = Keep(ffn=[i[torch.argsort(f[i], descending=True)] for f, i in zip(s.ffn, k.ffn)],
                  heads=[torch.cat([i[:2][torch.argsort(h[i[:2]], descending=True)],
                                    i[2:][torch.argsort(h[i[2:]], descending=True)]]) for h, i in zip(s.heads, k.heads)],
                  hidden=k.hidden[torch.argsort(s.hidden[k.hidden], descending=True)])
    a, b = (_build(*reversed(prune_state(state, cfg, keep))) for keep in (k, k_desc))
    torch.testing.assert_close(_logits(a, tokens), _logits(b, tokens), rtol=0, atol=1e-9)


def test_hidden_pruning_equals_an_independently_sliced_reference(world_of_one):
    cfg, model, state = _dense()
    tokens = _tokens()
    kept = torch.tensor(sorted(torch.randperm(64, generator=torch.Generator().manual_seed(3))[:40].tolist()))
    small_state, small = prune_state(state, cfg, Keep(hidden=kept))
    assert small.model.hidden_size == 40 and small.model.head_dim == 8  # heads keep their width: kv_channels
    # The reference: every tensor sliced by hand from its role (rows read the stream, columns write it)
    ix = kept.numpy()
    ref = {}
    for k, v in state.items():
        v = v.numpy()
        if k in ("embed.weight", "head.weight"):
            ref[k] = v[:, ix]
        elif k.endswith("norm.weight"):
            ref[k] = v[ix]
        elif k.endswith(("attn.o.weight", "mlp.down.weight")):
            ref[k] = v[ix, :]
        else:
            ref[k] = v[:, ix]
    want, _ = numpy_forward({k: torch.from_numpy(v) for k, v in ref.items()}, cfg.model, tokens)
    np.testing.assert_allclose(_logits(_build(small, small_state), tokens).numpy(), want, atol=1e-9)


def test_gqa_keeps_each_groups_best_query_heads_and_k_v_bit_identical(world_of_one):
    cfg, model, state = _dense()
    s = activation_scores(model, [_tokens()])
    keep = Keep(heads=[top_heads(h, 2, 4) for h in s.heads])
    for h, kept in zip(s.heads, keep.heads):
        want = [sorted((torch.argsort(h[g * 4:(g + 1) * 4], descending=True)[:2] + g * 4).tolist()) for g in range(2)]
        assert kept.tolist() == want[0] + want[1]
    small_state, small = prune_state(state, cfg, keep)
    assert (small.model.num_heads, small.model.kv_heads) == (4, 2)
    for i in range(3):
        assert torch.equal(small_state[f"layers.{i}.attn.kv.weight"], state[f"layers.{i}.attn.kv.weight"])
    with pytest.raises(ConfigError, match="multiple of the 2 KV groups"):
        top_heads(s.heads[0], 2, 3)


def test_a_planted_identity_layer_goes_first_and_a_dead_head_is_pruned_first(world_of_one):
    cfg, model, state = _dense(heads=8, kv=8)
    state["layers.1.attn.o.weight"].zero_()
    state["layers.1.mlp.down.weight"].zero_()
    state["layers.2.attn.kv.weight"][8 * 8 + 3 * 8:8 * 8 + 4 * 8] = 0  # head 3's V rows (K|V, K first)
    s = activation_scores(_build(cfg, state), [_tokens()])
    assert abs(s.depth[1].item()) < 1e-12 and s.depth.min().item() == s.depth[1].item()
    assert top_k(s.depth, 2).tolist() == [0, 2]
    assert s.heads[2][3].item() == 0.0 and s.heads[2].argmin().item() == 3
    assert 3 not in top_heads(s.heads[2], 1, 7).tolist()


def test_keeping_everything_is_the_identical_model():
    cfg, _, state = _dense()
    everything = Keep(ffn=[torch.arange(96)] * 3, heads=[torch.arange(8)] * 3, hidden=torch.arange(64),
                      layers=[0, 1, 2])
    for keep in (Keep(), everything):
        same_state, same = prune_state(state, cfg, keep)
        assert same_state.keys() == state.keys() and all(torch.equal(same_state[k], state[k]) for k in state)
        assert same.model == cfg.model


def test_recurrent_width_pruning_equals_zeroing_block_and_lora(world_of_one):
    cfg, _, state = _dense(layers=4)
    rec_state, rec = compress({k: v.float() for k, v in state.items()}, cfg, 2, "average", lora_rank=4)
    rec_state = {k: v.double() for k, v in rec_state.items()}
    model = _build(rec, rec_state)
    s = activation_scores(model, [_tokens()])
    assert len(s.ffn) == 2 and len(s.depth) == 4  # width per shared block, depth per position
    # per-position norms stand in for the block's norm modules: no hidden-channel scores
    assert (s.hidden is None) == rec.recurrent.iteration_norms
    keep = Keep(ffn=[top_k(f, 80) for f in s.ffn], heads=[top_heads(h, 2, 6) for h in s.heads])
    small_state, small = prune_state(rec_state, rec, keep)
    zeroed = dict(rec_state)
    a_down, a_o = rec_state["lora_down_A"].clone(), rec_state["lora_o_A"].clone()
    for b in range(2):
        down, o = rec_state[f"layers.{b}.mlp.down.weight"].clone(), rec_state[f"layers.{b}.attn.o.weight"].clone()
        gone_f = [j for j in range(96) if j not in keep.ffn[b].tolist()]
        gone_o = [h * 8 + d for h in range(8) if h not in keep.heads[b].tolist() for d in range(8)]
        down[:, gone_f], o[:, gone_o] = 0, 0
        zeroed[f"layers.{b}.mlp.down.weight"], zeroed[f"layers.{b}.attn.o.weight"] = down, o
        for pos, blk in enumerate(rec.recurrent.resolved_schedule(4)):
            if blk == b:
                a_down[pos][:, gone_f], a_o[pos][:, gone_o] = 0, 0
    zeroed["lora_down_A"], zeroed["lora_o_A"] = a_down, a_o
    tokens = _tokens()
    torch.testing.assert_close(_logits(_build(small, small_state), tokens), _logits(_build(rec, zeroed), tokens),
                               rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="width only"):
        prune_state(rec_state, rec, Keep(layers=[0]))


def _prune(load, out, *args):
    proc = run_cli(["tools/prune.py", "--load", str(load), "--output", str(out), "--calib-samples", "8",
                    "--seq-length", "64", "--eval-tokens", "1024", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_pruning_a_tp2_checkpoint_equals_tp1_and_the_result_trains_at_tp2(baseline, corpus, tmp_path):
    from tools.convert_checkpoint import main as convert

    convert(["--input", str(baseline), "--input-format", "deepspeed", "--output", str(tmp_path / "tp2"),
             "--output-format", "deepspeed", "--target-tp", "2"])
    targets = ["--calib", str(corpus.train), "--target-heads", "2", "--target-ffn", "512", "--target-hidden",
               "192", "--target-layers", "1"]
    proc, result = _prune(baseline, tmp_path / "p1", *targets)
    _prune(tmp_path / "tp2", tmp_path / "p2", *targets)
    assert "highest dropped" in proc.stdout and result["params_after"] < result["params_before"]
    assert result["heldout_loss_after"] > result["heldout_loss_before"]
    a, b = load_file(str(tmp_path / "p1/model.safetensors")), load_file(str(tmp_path / "p2/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["layers.0.attn.q.weight"].shape == (2 * 64, 192) and "layers.1.attn.q.weight" not in a
    # keep-all through the CLI: the same weights back
    _prune(baseline, tmp_path / "same", "--calib", str(corpus.train))
    same = load_file(str(tmp_path / "same/model.safetensors"))
    from cherry_megatron.convert.load import load_consolidated

    orig, _ = load_consolidated(str(baseline))
    assert same.keys() == orig.keys() and all(torch.equal(same[k], orig[k]) for k in orig)
    proc = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "cherry_megatron.train", "--config", str(tmp_path / "p1/config.yaml"), "--run-dir",
                    str(tmp_path / "retrain"), "--set", "parallel.tp=2", "train.steps=2", "train.micro_batch_size=2",
                    "train.global_batch_size=2", "train.seq_length=64", "train.eval_interval=2",
                    "train.eval_tokens=1024", "train.save_interval=2", "train.warmup_steps=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_bad_targets_are_one_error_and_write_nothing(baseline, corpus, tmp_path):
    for args, message in [(["--target-heads", "3"], "multiple of the 2 KV groups"),
                          (["--target-ffn", "5000"], "--target-ffn 5000 must be in"),
                          (["--importance", "taylor"], "--importance must be one of")]:
        proc = run_cli(["tools/prune.py", "--load", str(baseline), "--calib", str(corpus.train), "--output",
                        str(tmp_path / "out"), *args])
        assert proc.returncode != 0 and len(error_lines(proc)) == 1 and message in error_lines(proc)[0], proc.stderr
        assert not (tmp_path / "out").exists()
