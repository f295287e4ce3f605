"""Knowledge distillation: the KL against torch's on gathered logits, its gradient, vocab-parallel at TP=2,
the student's forward with a teacher, and distillation runs equal across TP and ZeRO layouts, resumed exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cherry_megatron.config import load_config
from cherry_megatron.losses import Targets, hidden_cosine_loss, vocab_parallel_kl
from cherry_megatron.metrics import read_metrics
from cherry_megatron.model.gpt import GPT
from cherry_megatron.sgt import RandomPolicy, Selection
from conftest import SHORT_RUN, error_lines, run_cli, train


def test_kl_is_zero_for_the_teacher_itself_and_matches_torch(world_of_one):
    g = torch.Generator().manual_seed(0)
    s, t = 3 * torch.randn(2, 7, 300, generator=g), 3 * torch.randn(2, 7, 300, generator=g)
    assert vocab_parallel_kl(t, t).abs().max().item() < 1e-6
    for tau in (1.0, 2.0):
        want = F.kl_div(F.log_softmax(s.double() / tau, -1), F.log_softmax(t.double() / tau, -1), log_target=True,
                        reduction="none").sum(-1)
        torch.testing.assert_close(vocab_parallel_kl(s, t, tau).double(), want, rtol=0, atol=1e-5)


def test_the_gradient_with_respect_to_the_student_logits_is_p_s_minus_p_t_over_tau(world_of_one):
    g = torch.Generator().manual_seed(1)
    s, t = (3 * torch.randn(2, 5, 64, generator=g)).requires_grad_(True), 3 * torch.randn(2, 5, 64, generator=g)
    tau = 2.0
    vocab_parallel_kl(s, t, tau).sum().backward()
    torch.testing.assert_close(s.grad, (F.softmax(s.detach() / tau, -1) - F.softmax(t / tau, -1)) / tau,
                               rtol=0, atol=1e-6)


def test_hidden_cosine_loss_is_zero_on_the_same_direction():
    h = torch.randn(2, 3, 8)
    assert hidden_cosine_loss(h, 2 * h).abs().max() < 1e-6 and hidden_cosine_loss(h, -h).min() > 1.99


@pytest.mark.parametrize("sgt", [False, True])
def test_distilling_forward_keeps_the_cross_entropy_and_adds_the_mean_kl(world_of_one, sgt):
    """The next-token losses are those of a forward without a teacher (the head's fp32 logits, which megatron's
    cross-entropy overwrites, are cloned for it); kd_loss is the KL averaged over every valid position, SGT or not."""
    cfg = load_config("tiny", ["model.vocab_size=512", "model.num_layers=2"])
    torch.manual_seed(0)
    student, teacher = GPT(cfg.model), GPT(cfg.model)
    g = torch.Generator().manual_seed(2)
    tokens, labels = torch.randint(0, 512, (2, 24), generator=g), torch.randint(0, 512, (2, 24), generator=g)
    mask = (torch.rand(2, 24, generator=g) > 0.25).float()
    with torch.no_grad():
        h_t = teacher.hidden_states(tokens)
        targets = Targets(teacher.logits(h_t), h_t, 1.0, 0.5, 0.25)
    select = (lambda: Selection(RandomPolicy(0), 0.25, "sequence", labels, mask > 0, key=3)) if sgt else (lambda: None)
    out = student(tokens, labels, select=select(), loss_mask=mask, distill=targets)
    plain = student(tokens, labels, select=select(), loss_mask=mask)
    torch.testing.assert_close(out.per_token, plain.per_token, rtol=0, atol=0)
    with torch.no_grad():
        h_s = student.hidden_states(tokens)
        kl = F.kl_div(F.log_softmax(student.logits(h_s).double(), -1),
                      F.log_softmax(targets.logits.double(), -1), log_target=True, reduction="none").sum(-1)
    weight, kd = out.aux["kd_loss"]
    assert weight == 0.5
    torch.testing.assert_close(kd.double(), (kl * mask).sum() / mask.sum(), rtol=1e-5, atol=0)
    cos = 1 - F.cosine_similarity(h_s, h_t, dim=-1)
    assert out.aux["hidden_loss"][0] == 0.25
    torch.testing.assert_close(out.aux["hidden_loss"][1], (cos * mask).sum() / mask.sum(), rtol=1e-5, atol=0)
    (kd + out.per_token.sum()).backward()  # the clone keeps both graphs intact
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.slow
def test_vocab_parallel_kl_at_tp2_equals_the_gathered_reference(world_of_one, tmp_path):
    """Two ranks holding half the vocabulary each (tests/check_distill_kl.py) against this process holding all of
    it, and both against float64 torch: the gradient to 1e-6; the KL (about 1 here) to 1e-6 relative plus 1e-6:
    the fp32 log-partition (about 7) summed in another order moves it by up to 1.1e-6 (measured), the floor of an
    fp32 KL whose sums are not done in float64 (a float64 copy of the logits would double their memory)."""
    from safetensors.torch import load_file

    from tests.check_distill_kl import TAU, logits

    proc = run_cli(["-m", "tests.check_distill_kl", str(tmp_path / "tp2.safetensors")], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tp2 = load_file(str(tmp_path / "tp2.safetensors"))
    student, teacher = logits()
    student.requires_grad_(True)
    kl = vocab_parallel_kl(student, teacher, TAU)
    kl.sum().backward()
    torch.testing.assert_close(tp2["kl"], kl.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tp2["grad"], student.grad, rtol=0, atol=1e-6)
    s64, t64 = student.detach().double() / TAU, teacher.double() / TAU
    want = F.kl_div(F.log_softmax(s64, -1), F.log_softmax(t64, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(tp2["kl"].double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tp2["grad"].double(), (F.softmax(s64, -1) - F.softmax(t64, -1)) / TAU, rtol=0, atol=1e-6)


def _curves(run_dir):
    rows = read_metrics(run_dir)
    return {key: {r["step"]: r[key] for r in rows if r.get(key) is not None}
            for key in ("loss", "kd_loss", "ce_loss", "eval_loss")}


@pytest.mark.slow
def test_distillation_is_the_same_at_tp2_and_under_zero3_and_resumes_exactly(baseline, tmp_path):
    """A fresh 2-layer student distilled from the baseline (CE 0.5 + KD 1): TP=1, TP=2, and DP=2 under ZeRO-3
    (the teacher outside the engine, whole on every rank) give the same curves; stopped at step 3 and resumed,
    the TP=1 run is bit-identical."""
    kd = [f"distill.teacher={baseline}", "distill.ce_weight=0.5", "train.seed=7"]
    train(tmp_path / "tp1", kd)
    ref = _curves(tmp_path / "tp1")
    assert sorted(ref["kd_loss"]) == [1, 2, 3, 4, 5, 6]
    assert all(ref["ce_loss"][k] == pytest.approx(ref["loss"][k], rel=1e-6) for k in ref["loss"])  # fp32 sum
    assert ref["kd_loss"][6] < ref["kd_loss"][1]  # it learns from the teacher
    for name, sets, nproc in [("tp2", ["parallel.tp=2"], 2), ("zero3", ["parallel.zero_stage=3"], 2)]:
        train(tmp_path / name, kd + sets, nproc=nproc)
        got = _curves(tmp_path / name)
        for key in ref:
            assert got[key].keys() == ref[key].keys(), (name, key)
            for step in ref[key]:
                assert got[key][step] == pytest.approx(ref[key][step], rel=1e-4), (name, key, step)
    train(tmp_path / "resumed", kd + ["train.exit_at_step=3"])
    proc = train(tmp_path / "resumed", kd)
    assert "start_step=3" in proc.stdout
    assert _curves(tmp_path / "resumed") == ref


@pytest.mark.slow
def test_a_recurrent_student_distils_from_its_dense_teacher_under_sgt(baseline, tmp_path):
    """The CHERRY/RRT uptraining recipe: the baseline compressed to one shared block, then trained on the
    ground truth of 25% of the positions (here weighted 0: SGT's draw still runs) and the teacher's distribution on
    all of them. Without LoRA (with it, this 6-step teacher's two layers are restored almost exactly: KL 0.002 at
    the start), and without the ground truth's pull (this teacher is barely trained: CE at lr 1e-3 moved the
    student away from it, KL 0.011 -> 0.04)."""
    proc = run_cli(["tools/compress_depth.py", "--load", str(baseline), "--target-layers", "1", "--lora-rank", "0",
                    "--output", str(tmp_path / "small"), "--eval-tokens", "1024"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(["-m", "cherry_megatron.train", "--config", str(tmp_path / "small/config.yaml"), "--run-dir",
                    str(tmp_path / "kd"), "--set", *[s for s in SHORT_RUN if not s.startswith("model.")],
                    f"distill.teacher={baseline}", "distill.ce_weight=0", "sgt.ratio=0.25", "sgt.sampling=poisson",
                    "train.lr=1e-4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    curves = _curves(tmp_path / "kd")
    assert sorted(curves["kd_loss"]) == [1, 2, 3, 4, 5, 6] and sorted(curves["eval_loss"]) == [0, 3, 6]
    assert curves["kd_loss"][6] < curves["kd_loss"][1], curves["kd_loss"]


@pytest.mark.parametrize("sets, message", [
    (["parallel.pp=2"], "distill.teacher with parallel.pp=2 is not built"),
    (["distill.kd_weight=0"], "distill.kd_weight and distill.hidden_weight are both 0"),
    (["distill.temperature=0"], "distill.temperature must be positive"),
])
def test_bad_distillation_settings_are_one_error(baseline, tmp_path, sets, message):
    proc = train(tmp_path / "run", [f"distill.teacher={baseline}", *sets], check=False)
    assert proc.returncode != 0 and error_lines(proc) and message in error_lines(proc)[0], proc.stderr[-2000:]


def test_a_teacher_of_another_vocabulary_is_one_error(baseline, tmp_path):
    proc = train(tmp_path / "run", ["model.vocab_size=16384", f"distill.teacher={baseline}"], check=False)
    assert proc.returncode != 0 and "must share the tokenizer" in error_lines(proc)[0], proc.stderr[-2000:]
