"""bf16 on CPU (slow without bf16 units, but DeepSpeed's GPU mixed-precision path): fp32 gradient accumulation
and communication, and fp32 master weights read back the same at every ZeRO stage and pipeline layout."""
import json

import pytest

from cherry_megatron.config import load_config
from cherry_megatron.metrics import read_metrics
from conftest import run_cli

MICRO = ["model.vocab_size=256", "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2",
         "model.num_kv_heads=1", "model.ffn_hidden_size=64", "train.precision=bf16", "train.micro_batch_size=2",
         "train.global_batch_size=4"]


def test_bf16_accumulates_and_reduces_gradients_in_fp32(world_of_one):
    """At ZeRO-1 the engine takes DeepSpeed's BF16_Optimizer with fp32 gradient accumulation and fp32
    communication, and trains; ZeRO-0, which would accumulate and all-reduce in bf16, is refused in one line."""
    import torch

    from cherry_megatron.config import ConfigError
    from cherry_megatron.engine import build_engine, deepspeed_config
    from cherry_megatron.model import build_model

    with pytest.raises(ConfigError, match="bf16 needs parallel.zero_stage >= 1"):
        deepspeed_config(load_config("tiny", MICRO + ["parallel.zero_stage=0"]), 1, torch.device("cpu"))
    cfg = load_config("tiny", MICRO + ["parallel.zero_stage=1"])
    torch.manual_seed(0)
    engine, ds_cfg = build_engine(build_model(cfg, torch.bfloat16), cfg, 1, torch.device("cpu"))
    assert ds_cfg["data_types"]["grad_accum_dtype"] == "fp32"
    assert engine.get_data_types() == (torch.bfloat16, torch.float32)
    assert engine.communication_data_type == torch.float32
    assert type(engine.optimizer).__name__ == "BF16_Optimizer"
    tokens = torch.randint(0, 256, (2, 16))
    first = None
    for _ in range(6):  # 3 optimizer steps of 2 micro-batches
        loss = engine(tokens, tokens.roll(-1, 1)).per_token.float().mean()
        engine.backward(loss)
        engine.step()
        first = loss.item() if first is None else first
    assert torch.isfinite(loss) and loss.item() < first


RUN = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.num_kv_heads=1",
       "model.ffn_hidden_size=64", "train.precision=bf16", "train.micro_batch_size=2", "train.global_batch_size=4",
       "train.seq_length=32", "train.steps=3", "train.save_interval=3", "train.eval_interval=3",
       "train.eval_tokens=256", "train.log_interval=1"]


@pytest.fixture(scope="module")
def bf16_runs(corpus, tmp_path_factory):
    """The same 3-step bf16 run at ZeRO-1, ZeRO-3 and ZeRO-1 x PP=2."""
    root = tmp_path_factory.mktemp("bf16")
    runs = {"zero1": (["parallel.zero_stage=1"], 1), "zero3": (["parallel.zero_stage=3"], 1),
            "zero1_pp2": (["parallel.zero_stage=1", "parallel.pp=2"], 2)}
    for name, (sets, nproc) in runs.items():
        args = ["-m", "cherry_megatron.train", "--config", "tiny", "--run-dir", str(root / name), "--set", *RUN, *sets]
        proc = run_cli(args[1:] if nproc > 1 else args, nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.slow
def test_bf16_checkpoints_read_the_same_fp32_masters_at_every_zero_stage(bf16_runs):
    """ZeRO-1 saves bf16 module weights, ZeRO-3 none (fp32 partitions only), a pipeline per-layer bf16 files:
    every reader gives the fp32 masters, bit for bit the same, not the bf16 rounding of them."""
    import torch

    from cherry_megatron.convert.load import read_any

    ck = {name: read_any(bf16_runs / name) for name in ("zero1", "zero3", "zero1_pp2")}
    module = torch.load(bf16_runs / "zero1" / "checkpoints" / "global_step3" / "mp_rank_00_model_states.pt",
                        weights_only=True)["module"]
    module = {n: t for n, t in module.items() if torch.is_tensor(t) and not n.endswith("._extra_state")}
    assert all(t.dtype == torch.bfloat16 for t in module.values())  # what a module-weights reader would give
    for name in module:
        masters = [c.get(name) for c in ck.values()]
        assert all(m.dtype == torch.float32 for m in masters), name
        assert torch.equal(masters[0], masters[1]) and torch.equal(masters[0], masters[2]), name
        assert not torch.equal(masters[0].bfloat16().float(), masters[0]), name  # not bf16 values stored as fp32
    assert sorted(ck["zero1"].specs) == sorted(ck["zero3"].specs) == sorted(ck["zero1_pp2"].specs) == sorted(module)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero1", "zero3"])
def test_evaluate_runs_in_the_training_precision(bf16_runs, name):
    """`evaluate` of a bf16 run computes in bf16, as the trainer's evaluation did: the same loss to the last bit;
    `--precision fp32` measures the masters (a different number)."""
    last = [r["eval_loss"] for r in read_metrics(bf16_runs / name) if "eval_loss" in r][-1]
    out = {}
    for precision in ("train", "fp32"):
        proc = run_cli(["-m", "cherry_megatron.evaluate", "--load", str(bf16_runs / name), "--data",
                        "data/tokens/heldout_text_document", "--max-tokens", "256", "--precision", precision])
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[precision] = json.loads(proc.stdout.splitlines()[-1])["loss"]
    assert out["train"] == last
    assert out["fp32"] != last
