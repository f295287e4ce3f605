"""Early-exit training for any model (train.exit_depths, LayerSkip) and exit distillation (RRT's exit KD)."""
import pytest
import torch
import torch.nn.functional as F

from cherry_megatron.config import ConfigError, load_config
from cherry_megatron.config_checks import validate
from cherry_megatron.model import build_model


def _model(sets):
    cfg = load_config("tiny", ["model.vocab_size=1024", "model.num_layers=4", *sets])
    torch.manual_seed(0)
    return build_model(cfg).train()


def test_a_dense_exit_adds_its_weighted_next_token_loss(world_of_one):
    model = _model(["train.exit_depths=[2]", "train.exit_loss_weights=[0.5]"])
    tokens, labels = torch.randint(0, 1000, (2, 16)), torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16)
    got = model(tokens, labels, loss_mask=mask).per_token
    model.eval()
    with torch.no_grad():
        final, early = model(tokens, labels).per_token, model(tokens, labels, depth=2).per_token
    assert torch.allclose(got.detach(), final + 0.5 * early, atol=1e-5)


def test_exit_distillation_is_the_kl_to_the_detached_final_distribution(world_of_one):
    model = _model(["train.exit_depths=[1,3]", "train.exit_loss_weights=[0,0]", "train.exit_distill_weight=0.3"])
    tokens, labels = torch.randint(0, 1000, (2, 16)), torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16)
    mask[1, 10:] = 0
    weight, term = model(tokens, labels, loss_mask=mask).aux["exit_kd_loss"]
    assert weight == 0.3
    with torch.no_grad():
        final = model.logits(model.hidden_states(tokens)).float()
        ref = 0.0
        for d in (1, 3):
            exit_logits = model.logits(model.hidden_states(tokens, depth=d)).float()
            kl = F.kl_div(exit_logits.log_softmax(-1), final.log_softmax(-1), log_target=True, reduction="none").sum(-1)
            ref += (kl * mask).sum() / mask.sum()
    assert term.item() == pytest.approx(ref.item(), rel=1e-5)
    term.backward()  # the final distribution is a target: no gradient reaches the units after the last exit
    assert model.layers[3].mlp.down.weight.grad is None or model.layers[3].mlp.down.weight.grad.abs().max() == 0
    assert model.layers[0].mlp.down.weight.grad.abs().max() > 0


@pytest.mark.parametrize("sets, message", [
    (["train.exit_depths=[4]", "train.exit_loss_weights=[1]"], "must lie in 1..3"),
    (["train.exit_depths=[2]"], "one weight per train.exit_depths"),
    (["train.exit_depths=[2]", "train.exit_loss_weights=[-1]"], ">= 0"),
    (["train.exit_distill_weight=0.5"], "needs exits to distil into"),
    (["train.exit_depths=[2]", "train.exit_loss_weights=[1]", "parallel.pp=2"], "does not support train.exit_depths"),
])
def test_bad_exit_settings_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config("tiny", ["model.num_layers=4", *sets]))
