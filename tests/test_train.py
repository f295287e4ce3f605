"""End-to-end training runs on real gloo process groups: TP, ZeRO, resume, evaluation, bad input."""
import json

import pytest

from cherry_megatron.config import load_config
from cherry_megatron.metrics import read_metrics
from conftest import SHORT_RUN, error_lines, run_cli, train

pytestmark = pytest.mark.slow


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r.get("loss") is not None}


def eval_losses(run_dir):
    return {r["step"]: r["eval_loss"] for r in read_metrics(run_dir) if r.get("eval_loss") is not None}


def assert_same_curve(a, b, rtol):
    assert a.keys() == b.keys() and len(a) >= 3
    for step in a:
        assert abs(a[step] - b[step]) <= rtol * abs(b[step]), f"step {step}: {a[step]} vs {b[step]}"


@pytest.fixture(scope="module")
def tp2(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tp2"
    train(run_dir, ["parallel.tp=2"], nproc=2)
    return run_dir


def test_run_dir_contract(baseline):
    assert {"config.yaml", "metrics.jsonl", "tensorboard", "checkpoints"} <= {p.name for p in baseline.iterdir()}
    assert (baseline / "checkpoints" / "latest").read_text().strip() == "global_step6"
    rows = read_metrics(baseline)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "consumed_tokens"):
        assert all(r[key] is not None for r in train_rows), key
    assert train_rows[-1]["consumed_tokens"] == 6 * 4 * 64
    ev = eval_losses(baseline)
    assert set(ev) == {0, 3, 6} and ev[6] < ev[0]
    assert list((baseline / "tensorboard").iterdir())


def test_tp2_matches_tp1(baseline, tp2):
    assert_same_curve(losses(tp2), losses(baseline), rtol=1e-4)
    assert_same_curve(eval_losses(tp2), eval_losses(baseline), rtol=1e-4)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stages_give_the_same_curve(baseline, tmp_path, stage):
    """ZeRO 0-2 over 2 data-parallel ranks against the single-process run: same global batches, same loss."""
    train(tmp_path / "run", [f"parallel.zero_stage={stage}"], nproc=2)
    assert_same_curve(losses(tmp_path / "run"), losses(baseline), rtol=1e-4)


def test_zero3_with_tp2_gives_the_same_curve(baseline, zero3_tp2):
    """ZeRO-3 over 2 data-parallel ranks x TP=2; its weights live only in optimizer shards, which evaluation
    (and tools/convert_checkpoint.py, test_convert) must still find."""
    assert_same_curve(losses(zero3_tp2), losses(baseline), rtol=1e-4)
    proc = run_cli(["-m", "cherry_megatron.evaluate", "--load", str(zero3_tp2), "--data",
                    "data/tokens/heldout_text_document", "--seq-length", "64", "--max-tokens", "1024"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["loss"] == pytest.approx(eval_losses(zero3_tp2)[6], rel=1e-5)


def test_activation_checkpointing_changes_no_loss(baseline, tmp_path):
    train(tmp_path / "ckpt", ["train.activation_checkpointing=1"])
    assert_same_curve(losses(tmp_path / "ckpt"), losses(baseline), rtol=1e-6)
    assert_same_curve(eval_losses(tmp_path / "ckpt"), eval_losses(baseline), rtol=1e-6)


def test_stop_and_resume_equals_uninterrupted(baseline, tmp_path):
    run_dir = tmp_path / "resumed"
    train(run_dir, ["train.exit_at_step=3"])
    assert max(losses(run_dir)) == 3
    proc = train(run_dir)
    assert "start_step=3" in proc.stdout
    assert losses(run_dir) == losses(baseline)  # same process layout: bit-identical
    assert eval_losses(run_dir) == eval_losses(baseline)


def test_evaluate_cli_reproduces_trainer_eval_from_tp2_checkpoint(tp2):
    proc = run_cli(["-m", "cherry_megatron.evaluate", "--load", str(tp2), "--data", "data/tokens/heldout_text_document",
                    "--seq-length", "64", "--max-tokens", "1024"])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["tokens"] == 1024
    assert out["loss"] == pytest.approx(eval_losses(tp2)[6], rel=1e-5)
    assert out["ppl"] == pytest.approx(2.718281828 ** out["loss"], rel=1e-6)


@pytest.mark.parametrize("sets, message", [
    (["model.hiden_size=3"], "error: unknown config key 'model.hiden_size'"),
    (["parallel.tp=2"], "error: parallel.tp=2 x parallel.pp=1 does not divide the world size 1"),
    (["model.vocab_size=1024"], "error: tokenizer vocabulary (8192) is larger than model.vocab_size (1024)"),
    (["data.paths=[data/tokens/nope]"], "error: missing data file data/tokens/nope.idx"),
    (["parallel.tp=3"], "error: parallel.tp=3 does not divide the attention heads"),
    (["train.universal_from=runs/nope"], "error: train.universal_from=runs/nope is not a universal checkpoint"),
])
def test_bad_input_is_one_error_line(corpus, tmp_path, sets, message, capsys):
    """In-process (the CLI's own `main`, as `python -m` runs it; the first case also as a real process)."""
    from cherry_megatron.train import main

    with pytest.raises(SystemExit) as exit_:
        main(["--config", "tiny", "--run-dir", str(tmp_path / "run"), "--set", *SHORT_RUN, *sets])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith(message), err[-2000:]
    assert not (tmp_path / "run").exists()  # nothing half-written
    if sets == ["model.hiden_size=3"]:
        proc = train(tmp_path / "run", sets, check=False)
        assert proc.returncode == 2 and error_lines(proc) == lines and "Traceback" not in proc.stderr
        assert not (tmp_path / "run").exists()


def test_truncated_data_file_is_one_error_line(corpus, tmp_path):
    import shutil
    prefix = tmp_path / "cut"
    shutil.copy("data/tokens/heldout_text_document.idx", f"{prefix}.idx")
    data = open("data/tokens/heldout_text_document.bin", "rb").read()
    open(f"{prefix}.bin", "wb").write(data[: len(data) // 2])
    proc = train(tmp_path / "run", [f"data.paths=[{prefix}]"], check=False)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "truncated" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_run_dir_with_another_config_is_refused(baseline):
    before = (baseline / "config.yaml").read_text()
    proc = train(baseline, ["model.hidden_size=128"], check=False)
    assert proc.returncode == 2
    assert error_lines(proc)[0].startswith(f"error: run dir {baseline} holds a run with model.hidden_size=256, requested 128")
    assert (baseline / "config.yaml").read_text() == before


def test_deepspeed_configs_use_torchs_adamw_fused_on_gpus_and_build_nothing():
    """No DeepSpeed op is compiled at start-up (FusedAdam needs nvcc, CPUAdam a C++ toolchain): torch's AdamW,
    with its fused CUDA kernel where the optimizer state is on a GPU; ZeRO overlaps its gradient reduction
    with the backward pass. The device is only named, not used."""
    import torch

    from cherry_megatron.engine import deepspeed_config

    for stage, ds_config in [(0, ""), (1, ""), (2, ""), (3, ""), (3, "cherry_megatron/ds_configs/zero3_offload.json")]:
        cfg = load_config("tiny", [f"parallel.zero_stage={stage}", f"parallel.ds_config={ds_config}",
                                   "train.precision=fp32"])
        full = deepspeed_config(cfg, 1, torch.device("cuda", 0))
        # gradient reduction on its own stream, overlapping the backward pass
        assert full["zero_optimization"].get("overlap_comm") is (True if stage else None), (stage, ds_config)
        gpu = full["optimizer"]["params"]
        cpu = deepspeed_config(cfg, 1, torch.device("cpu"))["optimizer"]["params"]
        assert gpu["torch_adam"] is True and cpu["torch_adam"] is True, (stage, ds_config)
        assert gpu.get("fused") is (None if ds_config else True) and "fused" not in cpu, (stage, ds_config)
