"""Host syncs: the counter finds what stops a GPU's host, on CPU; a training step has none per micro-batch.

A step's syncs at 2 and at 4 micro-batches differ by the micro-batches' own: that difference must be 0 with
SGT (selection counted on the host, positions gathered by index) and with a routed model at a set capacity;
dropless routing (DeepSpeed reads the largest expert load back) costs one per routed layer and micro-batch.
"""
import pytest
import torch

from cherry_megatron.host_syncs import HostSyncs


def test_the_counter_finds_the_reads_a_gpu_host_waits_for_and_nothing_else():
    x = torch.randn(8)
    with HostSyncs() as s:
        capacity = torch.ceil(torch.tensor(2.0) * 3).to(torch.int64)
        int(capacity)  # made from Python numbers: a host tensor on any device, free to read
        y = x * 2
        y.nonzero_static(size=3)  # a fixed-size result needs no count
        y.masked_fill(y > 0, 0.0)
        torch.nn.functional.one_hot(torch.tensor([0, 2]) + y[:2].long().abs().clamp(max=0), 3)  # device assert on GPU
    assert s.count == 0, s.sites
    with HostSyncs() as s:
        y = x * 2
        y.sum().item()
        bool((y > 0).any())
        y[y > 0]
        y[y > 0] = 0.0
        y.tolist()
        torch.nonzero(y)
    assert s.count == 6, s.sites
    assert sum(n for site, n in s.sites.items() if "test_host_syncs.py" in site) == 6


def _trainer(tmp_path, sets, micro_batches: int):
    from cherry_megatron import distributed
    from cherry_megatron.preflight import preflight
    from cherry_megatron.train import Trainer

    overrides = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=2", "model.num_kv_heads=1",
                 "model.ffn_hidden_size=128", "train.seq_length=32", "train.micro_batch_size=2",
                 f"train.global_batch_size={2 * micro_batches}", "train.steps=3", "train.warmup_steps=1",
                 "train.precision=fp32", *sets]
    cfg, tokenizer, run_dir = preflight("tiny", overrides, tmp_path / f"run{micro_batches}", 1)
    return Trainer(cfg, run_dir, distributed.init(cfg.parallel), tokenizer)


def _syncs_per_step(tmp_path, sets, micro_batches: int) -> int:
    from cherry_megatron import distributed

    trainer = _trainer(tmp_path, sets, micro_batches)
    try:
        trainer.step(0)  # the first step builds DeepSpeed's buffers
        with HostSyncs() as s:
            trainer.step(1)
        return s.count
    finally:
        distributed.shutdown()


@pytest.mark.parametrize("sets, per_micro_batch", [
    (["sgt.ratio=0.15", "sgt.policy=random"], 0),
    (["sgt.ratio=0.15", "sgt.policy=loss"], 0),
    (["sgt.ratio=0.15", "sgt.policy=loss", "sgt.sampling=poisson"], 0),
    (["sgt.ratio=0.15", "sgt.policy=frequency", "sgt.sampling=conditional"], 0),
    (["moee.num_experts=4", "moee.top_k=2", "moee.capacity_factor=1.25"], 0),
    (["moee.num_experts=4", "moee.top_k=2", "moee.capacity_factor=0"], 2),  # dropless: one per routed layer
], ids=["sgt-random", "sgt-loss", "sgt-loss-poisson", "sgt-frequency-conditional", "moee-capacity",
        "moee-dropless"])
def test_a_training_step_has_no_host_sync_per_micro_batch(corpus, tmp_path, sets, per_micro_batch):
    two, four = (_syncs_per_step(tmp_path, sets, n) for n in (2, 4))
    assert (four - two) / 2 == per_micro_batch, (two, four)
    # The optimizer step's own, once per step: DeepSpeed's overflow check and grad norm, and the logged loss.
    assert two - 2 * per_micro_batch < 10, two
