"""SGT's unbiased selection (sgt_sampling.py): Poisson and conditional Poisson draws against their definitions."""
import itertools
import math

import numpy as np
import pytest
import torch

from cherry_megatron.config import load_config
from cherry_megatron.errors import ConfigError
from cherry_megatron.losses import sgt_objective
from cherry_megatron.model.gpt import GPT
from cherry_megatron.sgt import FrequencyPolicy, LossPolicy, PayloadPolicy, RandomPolicy, Selection, selected_count
from cherry_megatron.sgt_sampling import cps_draw, cps_inclusion, fit_cps, inclusion_probabilities, poisson_bucket
from conftest import run_cli


def _batch(b=4, s=64, vocab=200, seed=0):
    """Labels from a skewed (Zipf-like) unigram, its counts, per-token losses and a ragged valid mask."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1)
    p /= p.sum()
    labels = torch.from_numpy(rng.choice(vocab, size=(b, s), p=p))
    counts = np.bincount(rng.choice(vocab, size=50_000, p=p), minlength=vocab)
    # A model's loss grows with the target's rarity: what makes `top` on rarity a biased estimate.
    losses = torch.from_numpy(-np.log(p[labels.numpy()]) * rng.gamma(4.0, 0.25, size=(b, s))).float()
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[1, s // 2:] = False  # a short document: its sequence has fewer valid positions
    return labels, counts, losses, valid


def _estimates(sel_for_key, losses, valid, draws):
    """Horvitz-Thompson estimates of the full mean loss and the masks over `draws` seeds."""
    est, masks = [], []
    for key in range(draws):
        picked = sel_for_key(key)(lambda: losses)
        est.append(sgt_objective(losses, picked.mask, valid, 0.0, picked.weight).item())
        masks.append(picked.mask)
        assert not (picked.mask & ~valid).any()
        assert torch.equal(picked.weight > 0, picked.mask)
    return np.array(est), torch.stack(masks).double()


@pytest.mark.parametrize("policy", ["frequency", "loss", "random"])
def test_poisson_weighted_loss_is_unbiased_and_counts_ratio_n(policy):
    """Over 3000 seeds the mean Horvitz-Thompson estimate equals the full-sequence mean loss within 4 standard
    errors (the estimates' own spread / sqrt(3000)), and the mean count per sequence is ratio * n_valid within
    4 standard errors; under `top` the same frequency policy misses the mean by far more."""
    labels, counts, losses, valid = _batch()
    pol = {"frequency": FrequencyPolicy(counts), "loss": LossPolicy(), "random": RandomPolicy(0)}[policy]
    draws, full = 3000, ((losses * valid).sum() / valid.sum()).item()
    est, masks = _estimates(lambda key: Selection(pol, 0.15, "sequence", labels, valid, key, sampling="poisson",
                                                  temperature=0.5), losses, valid, draws)
    count = masks.sum(2)
    se = est.std() / math.sqrt(draws)
    assert abs(est.mean() - full) < 4 * se, (est.mean(), full, se)
    n = valid.sum(1).double()
    assert torch.all((count.mean(0) - 0.15 * n).abs() < 4 * count.std(0) / math.sqrt(draws) + 1e-9)
    if policy == "frequency":
        top = Selection(pol, 0.15, "sequence", labels, valid, 0)(lambda: losses)
        biased = sgt_objective(losses, top.mask, valid, 0.0, top.weight).item()
        assert abs(biased - full) > 20 * se  # top: the rarest targets only, not the full loss


def test_conditional_takes_exactly_round_ratio_n_with_inclusion_pi():
    """Every draw holds exactly round(0.15 n) positions per sequence; over 800 draws each position's inclusion
    frequency matches pi (|z| < 5.5 for all ~200 positions, mean z^2 within 0.75..1.3 of its expectation 1),
    and the weighted loss is unbiased (4 standard errors)."""
    labels, counts, losses, valid = _batch(b=3, s=64)
    pol = FrequencyPolicy(counts)
    sel = lambda key: Selection(pol, 0.15, "sequence", labels, valid, key, sampling="conditional")  # noqa: E731
    draws = 800
    est, masks = _estimates(sel, losses, valid, draws)
    count = masks.sum(2)
    expect = torch.tensor([selected_count(0.15, int(n)) for n in valid.sum(1)], dtype=torch.float64)
    assert torch.equal(count, expect.expand_as(count))
    freq = masks.mean(0)
    m = torch.tensor(sel(0).counts)
    pi = inclusion_probabilities(pol.log_scores(labels, 0), valid, m)
    assert torch.allclose(pi.sum(1), m.double())
    inner = valid & (pi < 1)
    z = (freq - pi)[inner] / (pi * (1 - pi) / draws)[inner].sqrt()
    assert z.abs().max() < 5.5 and 0.75 < (z ** 2).mean() < 1.3, (z.abs().max(), (z ** 2).mean())
    full = ((losses * valid).sum() / valid.sum()).item()
    assert abs(est.mean() - full) < 4 * est.std() / math.sqrt(draws)


def _enumerated(logw: torch.Tensor, m: int) -> torch.Tensor:
    """Inclusion probabilities of P(S) ~ prod w over all subsets of size m, by brute force."""
    w, total, inc = logw.exp(), 0.0, torch.zeros(len(logw), dtype=torch.float64)
    for subset in itertools.combinations(range(len(logw)), m):
        p = torch.prod(w[list(subset)])
        total += p
        inc[list(subset)] += p
    return inc / total


def test_cps_inclusion_and_draw_match_enumeration_and_the_fit_reaches_pi():
    """The design's inclusion probabilities equal a brute-force sum over all subsets (rows of different sizes, an
    excluded position); 40000 draws of the sequential sampler hit them within 5 standard errors, always exactly m;
    the fit reaches a skewed target (1024 positions, 154 drawn, scores spanning 4 decades) to 1e-6."""
    torch.manual_seed(0)
    logw = torch.randn(2, 9, dtype=torch.float64) * 3
    logw[1, 2] = float("-inf")
    m = torch.tensor([3, 2])
    got = cps_inclusion(logw, m, 3)
    exact = torch.stack([_enumerated(logw[r], int(m[r])) for r in range(2)])
    assert torch.allclose(got, exact, atol=1e-12)
    reps = 20000
    rows = logw.repeat(reps, 1)
    drawn = cps_draw(rows, m.repeat(reps), torch.rand(2 * reps, 9, dtype=torch.float64), 3)
    assert torch.equal(drawn.sum(1), m.repeat(reps))
    freq = drawn.view(reps, 2, 9).double().mean(0)
    se = (exact * (1 - exact) / reps).sqrt().clamp(min=1e-12)
    assert ((freq - exact).abs() <= 5 * se + 1e-12).all(), (freq - exact) / se
    scores = torch.rand(1, 1024, dtype=torch.float64).pow(4) * 10 + 1e-3
    pi = inclusion_probabilities(scores.log(), torch.ones(1, 1024, dtype=torch.bool), torch.tensor([154]), 0.5)
    assert (pi == 1).any() and pi.min() < 1e-6  # capped positions and near-zero ones: the hard case
    drawn = torch.where(pi < 1, pi, torch.zeros_like(pi))
    _, design, _ = fit_cps(drawn, torch.tensor([154]) - (pi == 1).sum(1), 154)
    assert (design - drawn).abs().max() < 1e-6


def test_inclusion_probabilities_follow_the_formula():
    """pi = min(1, c s^(1/T)) with sum pi = m: checked against numpy on a row with capped positions."""
    s = torch.tensor([[50.0, 1.0, 2.0, 3.0, 0.5, 4.0, 1.0, 1.0]], dtype=torch.float64)
    valid = torch.ones_like(s, dtype=torch.bool)
    valid[0, 6] = False
    pi = inclusion_probabilities(s.log(), valid, torch.tensor([2.5]), temperature=2.0)[0].numpy()
    a = np.sqrt(s[0].numpy())
    a[6] = 0
    assert pi[0] == 1.0 and pi[6] == 0.0
    c = 1.5 / a[1:].sum()  # the first is capped, the rest share 2.5 - 1
    assert np.allclose(pi[1:], np.minimum(1, c * a[1:])) and abs(pi.sum() - 2.5) < 1e-12


@pytest.mark.parametrize("sampling", ["poisson", "conditional"])
def test_no_valid_position_is_left_out(sampling):
    """Scores 900 nats apart (a loss near 0 at a small temperature) and rows too short for round(0.15 n) > 0:
    every valid position keeps pi > 0 (the weights stay finite), conditional still draws its exact count."""
    log_s = torch.zeros(3, 10)
    log_s[0, 2:] = -900.0
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[2, 3:] = False  # 3 valid positions: round(0.45) = 0
    pi = inclusion_probabilities(log_s, valid, torch.tensor([3.0, 3.0, 0.45]))
    assert (pi[valid] > 0).all() and torch.isfinite(1 / pi[valid]).all()
    policy = FrequencyPolicy(np.ones(10))
    policy.log_scores = lambda labels, key, losses=None, ref_losses=None: log_s  # the scores above
    for key in range(20):
        picked = Selection(policy, 0.3, "sequence", torch.zeros(3, 10, dtype=torch.long), valid, key,
                           sampling=sampling)(None)
        assert torch.isfinite(picked.weight).all()
        if sampling == "conditional":
            assert picked.mask.sum(1).tolist() == [3, 3, 1]


def test_a_poisson_draw_past_its_bucket_drops_and_counts_the_excess(monkeypatch, world_of_one):
    """With the bucket forced below the draw, the excess positions are dropped from the mask, counted in
    `sgt_dropped`, and the gathered loss still equals the masked weighted full loss."""
    import cherry_megatron.sgt as sgt

    monkeypatch.setattr(sgt, "poisson_bucket", lambda expected, n: 5)
    cfg = load_config("tiny", ["model.vocab_size=256", "model.num_layers=1"]).model
    torch.manual_seed(0)
    model = GPT(cfg)
    tokens, labels = torch.randint(0, 256, (2, 40)), torch.randint(0, 256, (2, 40))
    valid = torch.ones(2, 40, dtype=torch.bool)
    sel = Selection(RandomPolicy(0), 0.3, "sequence", labels, valid, 1, sampling="poisson")
    out = model(tokens, labels, select=sel)
    assert out.mask.sum() == 5 and out.stats["sgt_dropped"] > 0
    full = model(tokens, labels).per_token
    assert torch.allclose(sgt_objective(out.per_token, out.mask, valid, 0.0, out.weight),
                          (full * out.weight).sum() / valid.sum(), atol=1e-6)


def test_payload_scores_keep_function_pieces_possible():
    counts = np.array([1000, 10, 500, 1])
    content = np.array([False, True, True, False])
    pol = PayloadPolicy(counts, content)
    labels = torch.tensor([[0, 1, 2, 3]])
    top, sampled = pol.scores(labels, 0), pol.log_scores(labels, 0).exp()
    assert top[0, 0] < 0 and top[0, 3] < 0 < top[0, 2] < top[0, 1]  # top: content first, rarest first
    assert (sampled > 0).all() and sampled[0, 0] == sampled[0, 3] < sampled[0, 2]  # sampling: never zero


@pytest.mark.parametrize("sampling", ["poisson", "conditional"])
def test_gathered_weighted_loss_equals_masked_weighted_full_loss(sampling, world_of_one):
    cfg = load_config("tiny", ["model.vocab_size=1024", "model.num_layers=2"]).model
    torch.manual_seed(0)
    model = GPT(cfg)
    tokens, labels = torch.randint(0, 1024, (3, 32)), torch.randint(0, 1024, (3, 32))
    valid = torch.rand(3, 32, generator=torch.Generator().manual_seed(1)) > 0.2
    for policy in (RandomPolicy(3), LossPolicy()):
        sel = Selection(policy, 0.15, "sequence", labels, valid, key=5, sampling=sampling)
        out = model(tokens, labels, select=sel)
        gathered = sgt_objective(out.per_token, out.mask, valid, 0.0, out.weight)
        g1 = torch.autograd.grad(gathered, list(model.parameters()))
        full = model(tokens, labels).per_token
        masked = (full * out.weight).sum() / valid.sum()
        g2 = torch.autograd.grad(masked, list(model.parameters()))
        assert out.mask.any() and abs(gathered.item() - masked.item()) < 1e-5
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))
        assert out.stats["sgt_dropped"] == 0
    anchored = Selection(RandomPolicy(3), 0.15, "sequence", labels, valid, key=5, sampling=sampling, full_loss=True)
    out = model(tokens, labels, select=anchored)
    full = model(tokens, labels).per_token
    expect = 0.7 * (full * out.weight).sum() / valid.sum() + 0.3 * (full * valid).sum() / valid.sum()
    assert abs(sgt_objective(out.per_token, out.mask, valid, 0.3, out.weight).item() - expect.item()) < 1e-5
    if sampling == "poisson":  # the head is padded to the bucket, a fixed size above the mean count
        assert sel.total == poisson_bucket(0.15 * int(valid.sum()), int(valid.sum())) > 0.15 * int(valid.sum())


def test_weight_clipping_caps_and_is_logged():
    labels, counts, losses, valid = _batch()
    picked = Selection(FrequencyPolicy(counts), 0.15, "sequence", labels, valid, 0, sampling="poisson",
                       temperature=0.25, max_weight=5.0)(None)
    raw = Selection(FrequencyPolicy(counts), 0.15, "sequence", labels, valid, 0, sampling="poisson",
                    temperature=0.25)(None)
    assert torch.equal(picked.mask, raw.mask) and raw.weight.max() > 5.0 and picked.weight.max() == 5.0
    assert picked.stats["sgt_clipped_share"].item() == pytest.approx(
        ((raw.weight > 5) & raw.mask).sum().item() / raw.mask.sum().item())


@pytest.mark.parametrize("override, message", [
    (["sgt.sampling=bernoulli"], "sgt.sampling must be one of"), (["sgt.temperature=0"], "must be positive"),
    (["sgt.max_weight=0.5"], "at least 1"),
    (["sgt.ratio=0.15", "sgt.sampling=conditional", "sgt.scope=batch"], "draws per sequence"),
])
def test_bad_sampling_config(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", override)


@pytest.mark.slow
def test_selections_and_weights_are_identical_on_tp_ranks():
    """Two TP ranks of one model draw the same positions with the same weights for each sampling mode, with the
    loss policy scoring from the vocab-parallel cross-entropy (tests/check_sgt_ranks.py)."""
    proc = run_cli(["-m", "tests.check_sgt_ranks"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("same ")]
    assert lines == [f"same {m}" for m in ("top", "poisson", "conditional")]
