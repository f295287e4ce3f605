import pytest

from cherry_megatron.distributed import first_host


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[07-09,12],cpu1", "gpu07"), ("n1,n2", "n1"), ("node5", "node5"), ("a-b[1-2]", "a-b1"), ("n[3,1]", "n3"),
])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.slow
def test_megatron_and_deepspeed_groups_agree():
    """4 gloo ranks: megatron's TP/DP/PP groups are DeepSpeed's model/data/pipe axes, rank by rank, in 4 layouts."""
    from conftest import run_cli

    layouts = ["2x2", "1x2", "2x1", "1x4"]
    proc = run_cli(["-m", "tests.check_topology", *layouts], nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import re

    assert len(re.findall(r"\d+x\d+ rank \d+: pipe \d+ data \d+ model \d+ ok", proc.stdout)) == 4 * len(layouts), proc.stdout


@pytest.mark.parametrize("local_rank, visible, ordinal", [(0, 8, 0), (5, 8, 5), (3, 1, 0), (7, 4, 3)])
def test_each_rank_takes_local_rank_modulo_the_visible_gpus(monkeypatch, local_rank, visible, ordinal):
    """One GPU bound per task (--gpus-per-task=1) shows each task one device, ordinal 0: cuda:LOCAL_RANK would be
    an invalid ordinal on every rank but the first. torch's CUDA calls are faked; DeepSpeed gets the same ordinal."""
    import torch

    from cherry_megatron.distributed import select_device
    from cherry_megatron.engine import engine_args

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    precision = torch.get_float32_matmul_precision()
    try:
        device = select_device(local_rank)
        assert torch.get_float32_matmul_precision() == "high"  # TF32: fp32 paths (evaluation, SGT reference)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert device == torch.device("cuda", ordinal) and chosen == [device]
    assert engine_args(device).device_rank == ordinal and engine_args(torch.device("cpu")) is None


def test_threads_follow_the_cores_this_process_may_use(monkeypatch):
    import os

    import torch

    from cherry_megatron.distributed import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
        monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's, not ours
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        set_threads(0)
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # an operator's setting is respected
        set_threads(0)
        assert torch.get_num_threads() == 2
        set_threads(5)  # an explicit train.threads wins over both
        assert torch.get_num_threads() == 5
    finally:
        torch.set_num_threads(before)


def test_mfu_peaks_are_looked_up_by_exact_device_name(monkeypatch):
    import math

    import torch

    from cherry_megatron.metrics import peak_tflops

    cuda = torch.device("cuda", 0)
    for name, bf16 in [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200 NVL", 835.0)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d, n=name: n)
        assert peak_tflops(cuda, "bf16", 0.0) == bf16, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA H100 PCIe-like prototype")
    assert math.isnan(peak_tflops(cuda, "bf16", 0.0))  # unknown: no guess
    assert peak_tflops(cuda, "bf16", 500.0) == 500.0  # train.peak_tflops overrides


def test_collective_timeout_must_be_below_the_watchdog():
    from cherry_megatron.config import ConfigError, load_config

    assert load_config("tiny").train.collective_timeout_s < load_config("tiny").train.step_timeout_s
    with pytest.raises(ConfigError, match="collective_timeout_s=2000 must be > 0 and below train.step_timeout_s=1800"):
        load_config("tiny", ["train.collective_timeout_s=2000"])
    load_config("tiny", ["train.collective_timeout_s=2000", "train.step_timeout_s=0"])  # no watchdog: any


def test_megatron_builds_its_gloo_copies_of_the_groups_only_on_a_gloo_world(monkeypatch):
    """On nccl worlds megatron's extra gloo groups are unused and hang at creation on multi-NIC nodes without
    GLOO_SOCKET_IFNAME: not asked for there. The world is gloo (CPU); its backend's name is faked for the second
    call, and megatron's initialisation is recorded, not run, for both."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from cherry_megatron import distributed
    from cherry_megatron.config import ParallelConfig

    class Recorded(Exception):
        pass

    asked = []

    def record(**kwargs):
        asked.append(kwargs)
        raise Recorded

    monkeypatch.setattr(parallel_state, "initialize_model_parallel", record)
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: False)
    try:
        for backend in ("gloo", "nccl"):
            monkeypatch.setattr(dist, "get_backend", lambda *a, backend=backend: backend)
            with pytest.raises(Recorded):
                distributed.init(ParallelConfig(tp=1), timeout_s=90)
    finally:
        monkeypatch.undo()
        distributed.shutdown()
    assert [kw["create_gloo_process_groups"] for kw in asked] == [True, False]
    assert asked[0]["distributed_timeout_minutes"] == 2  # 90 s, in megatron's whole minutes
