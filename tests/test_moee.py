"""MoEE: fusion exactness, router losses by hand, MTP targets, expert/tensor parallelism, checkpoints."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from cherry_megatron.checkpoint.consolidate import load_into, save_consolidated
from cherry_megatron.convert.load import load_consolidated
from cherry_megatron.config import ConfigError, load_config
from cherry_megatron.fuse.moee import fuse
from cherry_megatron.metrics import read_metrics
from cherry_megatron.model import build_model, parameter_count
from cherry_megatron.model.moee import RoutedMLP
from cherry_megatron.model.mtp import mtp_targets, next_inputs
from conftest import run_cli, train

MOEE = ["moee.num_experts=2", "moee.mtp_depth=1"]


def _model(preset, sets, seed=0):
    cfg = load_config(preset, ["model.vocab_size=1024", "model.num_layers=4", *sets])
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():  # LoRA B starts at zero; make every per-position part matter
        for name, p in model.named_parameters():
            if "lora" in name or "iter_embed" in name:
                p.normal_(0, 0.02)
    return cfg, model, {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.parametrize("preset, sets", [("recurrent-tiny", ["recurrent.num_blocks=2", "recurrent.lora_rank=4"]),
                                          ("tiny", [])])
def test_one_expert_top1_is_the_expert_model(world_of_one, preset, sets):
    cfg, expert, state = _model(preset, sets)
    fused_state, fused_cfg = fuse([state], [cfg], top_k=1)
    moee = build_model(fused_cfg)
    load_into(moee, fused_state, "fused")
    expert.eval(), moee.eval()
    tokens, labels = torch.randint(0, 1024, (2, 24)), torch.randint(0, 1024, (2, 24))
    assert torch.allclose(moee(tokens).logits, expert(tokens).logits, atol=1e-5)
    assert torch.allclose(moee(tokens, labels).per_token, expert(tokens, labels).per_token, atol=1e-5)
    assert parameter_count(fused_cfg)["total"] == sum(p.numel() for p in moee.parameters())


def test_two_experts_take_each_models_mlps_and_average_the_rest(world_of_one):
    cfg, _, a = _model("recurrent-tiny", ["recurrent.num_blocks=2", "recurrent.lora_rank=4"], seed=1)
    _, _, b = _model("recurrent-tiny", ["recurrent.num_blocks=2", "recurrent.lora_rank=4"], seed=2)
    fused, fcfg = fuse([a, b], [cfg, cfg], top_k=2)
    e = "mlp.deepspeed_moe.experts.deepspeed_experts"
    assert torch.equal(fused[f"layers.1.{e}.1.down.weight"], b["layers.1.mlp.down.weight"])
    # block 1 runs positions 2 and 3 of 4: its experts keep those positions' MLP LoRA
    assert torch.equal(fused[f"layers.1.{e}.0.gate_up_lora_A"], a["lora_gate_up_A"][2:4])
    assert torch.allclose(fused["layers.0.attn.q.weight"], (a["layers.0.attn.q.weight"] + b["layers.0.attn.q.weight"]) / 2)
    assert fused["layers.0.mlp.deepspeed_moe.gate.wg.weight"].shape == (2, cfg.model.hidden_size)
    counts = parameter_count(fcfg)
    assert counts["active"] == counts["total"]  # top-2 of 2
    with pytest.raises(ConfigError, match="differs from expert 0"):
        fuse([a, b], [cfg, load_config("recurrent-tiny", ["model.vocab_size=1024", "model.num_layers=4"])])
    for routed in (load_config("tiny", ["moee.num_experts=2"]), load_config("smoe-tiny")):  # MoEE, sparse
        with pytest.raises(ConfigError, match="expert 1 is a routed model already"):
            fuse([a, b], [cfg, routed])


@pytest.mark.parametrize("k", [1, 2])
def test_router_losses_match_a_hand_computation(world_of_one, k):
    cfg = load_config("tiny", ["model.vocab_size=1024", "moee.num_experts=4", f"moee.top_k={k}"])
    torch.manual_seed(0)
    layer = RoutedMLP(cfg.model, cfg.moee, positions=1, lora_rank=0, dtype=torch.float32)
    x = torch.randn(1, 10, cfg.model.hidden_size)
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.normal_(0, 1.0)  # decided routing, unequal loads
    _, l_aux, z = layer.route(x, 0)
    logits = x[0] @ layer.deepspeed_moe.gate.wg.weight.T
    gates = logits.softmax(-1)
    first_choice = F.one_hot(gates.argmax(-1), 4).float()
    # GShard/Switch: E * sum_e (mean router probability of e) * (share of tokens whose first choice is e)
    assert l_aux.item() == pytest.approx(4 * (gates.mean(0) * first_choice.mean(0)).sum().item(), rel=1e-5)
    assert z.item() == pytest.approx((torch.logsumexp(logits, -1) ** 2).mean().item(), rel=1e-5)


def test_routed_model_reports_summed_router_losses_only_for_training(world_of_one):
    cfg, model, _ = _model("tiny", MOEE)
    tokens, labels = torch.randint(0, 1024, (2, 16)), torch.randint(0, 1024, (2, 16))
    assert model(tokens, labels).aux == {}  # evaluation: the next-token loss alone
    routing = []  # each routed call's load-balancing loss, as DeepSpeed's MoE layer returns it
    for block in model.layers:
        block.mlp.register_forward_hook(lambda module, args, out: routing.append(out[1]))
    aux = model(tokens, labels, loss_mask=torch.ones(2, 16)).aux
    assert set(aux) == {"mtp_loss", "load_balance_loss", "router_z_loss"}
    assert len(routing) == 4  # one routed call per layer, summed
    lb = sum(routing)
    assert aux["load_balance_loss"][1].item() == pytest.approx(lb.item())
    assert aux["load_balance_loss"][0] == cfg.moee.load_balance_weight
    assert aux["mtp_loss"][0] == cfg.moee.mtp_weight == 0.1
    sum(w * t for w, t in aux.values()).backward()
    assert model.mtp.depths[0].proj.weight.grad.abs().sum() > 0
    assert model.layers[0].mlp.deepspeed_moe.gate.wg.weight.grad.abs().sum() > 0


def test_experts_get_optimizer_groups_of_their_own(world_of_one):
    from cherry_megatron.engine import param_groups

    _, model, _ = _model("tiny", MOEE)
    groups = param_groups(model, 0.1)
    experts = {id(p) for n, p in model.named_parameters() if ".deepspeed_experts." in n}
    moe = [g for g in groups if g.get("moe")]
    assert moe and {id(p) for g in moe for p in g["params"]} == experts
    assert not experts & {id(p) for g in groups if not g.get("moe") for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_mtp_targets_shift_and_stop_at_sequence_end_and_document_end():
    eod = 0
    labels = torch.tensor([[6, 7, eod, 9, 10, 11, 12]])  # tokens 5 6 7 EOD 9 10 11, shifted by one
    loss_mask = (labels != eod).float()  # what GPTDataset gives with eod_mask_loss
    t1, m1 = mtp_targets(labels, loss_mask, 1)
    assert t1[0, :6].tolist() == [7, eod, 9, 10, 11, 12]
    # position 0 (token 5) -> token 7: same document; position 1 would predict EOD (masked); position 2
    # (token 7) -> token 9 crosses the document end; the last position has no token j+2 in the sequence
    assert m1[0].tolist() == [True, False, False, True, True, True, False]
    t2, m2 = mtp_targets(labels, loss_mask, 2)
    assert t2[0, :5].tolist() == [eod, 9, 10, 11, 12]
    assert m2[0].tolist() == [False, False, False, True, True, False, False]
    assert next_inputs(labels, 1).equal(labels) and next_inputs(labels, 2)[0].tolist() == [7, eod, 9, 10, 11, 12, 0]
    no_eod_mask = torch.ones_like(loss_mask)  # EOD mask off: documents run into each other, as the main loss does
    assert mtp_targets(labels, no_eod_mask, 1)[1][0].tolist() == [True] * 6 + [False]


def test_bad_moee_configs():
    for sets, message in [(["moee.num_experts=3", "moee.ep_size=2"], "does not divide moee.num_experts"),
                          (["moee.num_experts=2", "moee.top_k=3"], "must lie in 1..moee.num_experts"),
                          (["moee.num_experts=2", "parallel.zero_stage=3"], "ZeRO stage 3"),
                          (["moee.ep_size=2"], "moee.num_experts is 0")]:
        with pytest.raises(ConfigError, match=message):
            load_config("tiny", sets)


def _losses(run_dir, key="loss"):
    return {r["step"]: r[key] for r in read_metrics(run_dir) if r.get(key) is not None}


@pytest.fixture(scope="module")
def ep2(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "ep2"
    train(run_dir, MOEE + ["moee.ep_size=2"], nproc=2)
    return run_dir


@pytest.mark.slow
def test_expert_and_tensor_parallel_give_the_same_curve(ep2, tmp_path):
    """ep_size=2 (one expert per rank) and TP=2 (TP-split experts, ZeRO-2) against ep_size=1 on 2 data-parallel ranks."""
    train(tmp_path / "ep1", MOEE, nproc=2)
    train(tmp_path / "tp2", MOEE + ["parallel.tp=2", "parallel.zero_stage=2"], nproc=2)
    base = _losses(tmp_path / "ep1")
    assert len(base) >= 3 and _losses(tmp_path / "ep1", "mtp_loss")
    for run in (ep2, tmp_path / "tp2"):
        other = _losses(run)
        assert other.keys() == base.keys()
        for step in base:
            assert other[step] == pytest.approx(base[step], rel=1e-4), (run, step)
        assert _losses(run, "grad_norm")[6] == pytest.approx(_losses(tmp_path / "ep1", "grad_norm")[6], rel=1e-3)


@pytest.mark.slow
def test_moee_checkpoint_saves_resumes_and_converts(ep2, tmp_path):
    sets = MOEE + ["moee.ep_size=2"]
    train(tmp_path / "resumed", sets + ["train.exit_at_step=3"], nproc=2)
    proc = train(tmp_path / "resumed", sets, nproc=2)
    assert "start_step=3" in proc.stdout
    assert _losses(tmp_path / "resumed") == _losses(ep2)
    # convert: DeepSpeed layout (experts split over 2 ranks) -> one safetensors file -> a 1-process model
    state, cfg = load_consolidated(ep2)
    assert sum(".deepspeed_experts." in k for k in state) == 2 * 2 * 2  # layers x experts x (gate_up, down)
    save_consolidated(tmp_path / "export", state, cfg)
    proc = run_cli(["-m", "cherry_megatron.evaluate", "--load", str(tmp_path / "export"), "--data",
                    "data/tokens/heldout_text_document", "--seq-length", "64", "--max-tokens", "1024"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss = json.loads(proc.stdout.splitlines()[-1])["loss"]
    assert math.isfinite(loss) and loss == pytest.approx(_losses(ep2, "eval_loss")[6], rel=1e-5)


def test_moee_preset_counts_by_hand():
    counts = parameter_count(load_config("moee-2x6l"))
    mlp = 6 * 3 * 1280 * 3520  # one expert's MLPs over the 6 blocks
    mtp = 18_434_560 + 2 * 1280 * 1280 + 3 * 1280  # a block, the [h; emb] projection, three norms
    assert counts["total"] == 226_082_560 + mlp + 6 * 2 * 1280 + mtp
    assert counts["active"] == counts["total"] - mlp  # top-1 of 2


@pytest.mark.slow
def test_build_moee_from_checkpoints_of_different_tp_trains_with_expert_parallelism(corpus, tmp_path):
    sets = ["recurrent.num_blocks=1", "recurrent.lora_rank=4", "recurrent.exit_depths=[]", "train.lr=0"]  # lr 0: both hold the initial weights
    train(tmp_path / "tp1", sets, config="recurrent-tiny")
    train(tmp_path / "tp2", sets + ["parallel.tp=2"], config="recurrent-tiny", nproc=2)
    proc = run_cli(["tools/build_moee.py", "--experts", str(tmp_path / "tp1"), str(tmp_path / "tp2"), "--output",
                    str(tmp_path / "moee"), "--top-k", "2", "--eval-tokens", "1024"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "active per token" in proc.stdout and out["params_active"] == out["params_total"]
    # identical experts under any router: the fused model is each expert's model
    assert out["heldout_loss_moee"] == pytest.approx(out["heldout_loss_experts"][0], rel=1e-5)
    assert out["heldout_loss_experts"][0] == pytest.approx(out["heldout_loss_experts"][1], rel=1e-5)
    proc = run_cli(["-m", "cherry_megatron.train", "--config", str(tmp_path / "moee/config.yaml"), "--run-dir",
                    str(tmp_path / "run"), "--set", "train.steps=2", "train.log_interval=1", "train.eval_interval=2",
                    "train.micro_batch_size=2", "train.global_batch_size=4", "train.seq_length=64",
                    "train.eval_tokens=1024", "moee.ep_size=2", "moee.mtp_depth=1"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = _losses(tmp_path / "run", "eval_loss")
    assert evals[0] == pytest.approx(out["heldout_loss_moee"], rel=1e-5)  # same model, loaded over 2 expert ranks
    assert run_cli(["tools/build_moee.py", "--experts", str(tmp_path / "tp1"), "--output", str(tmp_path / "moee"),
                    ]).returncode == 2  # refuses to overwrite


def test_sgt_selects_for_the_next_token_loss_while_mtp_sees_every_valid_position(world_of_one):
    from cherry_megatron.sgt import RandomPolicy, Selection

    _, model, _ = _model("tiny", ["moee.mtp_depth=1"])
    tokens, labels = torch.randint(0, 1024, (2, 16)), torch.randint(0, 1024, (2, 16))
    valid = torch.ones(2, 16, dtype=torch.bool)
    select = Selection(RandomPolicy(1), 0.25, "sequence", labels, valid, key=0)
    out = model(tokens, labels, select=select, loss_mask=valid.float())
    per_token, mask = out.per_token, out.mask
    assert mask.sum() == 8 and (per_token[~mask] == 0).all()
    with_sgt = out.aux["mtp_loss"][1]
    without = model(tokens, labels, loss_mask=valid.float()).aux["mtp_loss"][1]
    # the MTP loss does not depend on which positions SGT picked for the next-token loss
    assert torch.isfinite(with_sgt) and with_sgt.item() == pytest.approx(without.item(), rel=1e-6)
