"""Process-group set-up from whatever launched us: torchrun, the deepspeed launcher, srun, or nothing.

torchrun and the deepspeed launcher export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; srun
exports SLURM_* instead, which we translate; a plain `python -m` run is a world of one.
DeepSpeed and megatron-core are imported inside the functions that use them: launchers and tests read the
environment helpers here (`child_env`, `world_size_from_env`) without loading either.
"""
from __future__ import annotations

import datetime
import math
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cherry_megatron import compat
from cherry_megatron.config import ParallelConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_from_launcher() -> None:
    """Make the torch.distributed env:// variables exist, whichever launcher started us."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        # The sbatch script normally exports these; derive them for a bare `srun` too.
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 10000))
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = first_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07' (what `scontrol show hostnames`
    prints first; re-implemented because compute nodes do not always have scontrol on PATH)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(extra: dict | None = None) -> dict:
    """os.environ without the launcher's rendezvous variables, for starting a separate run as a child:
    it must find its own world, not join (or collide with) ours."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    return {**env, **(extra or {})}


def world_size_from_env() -> int:
    env_from_launcher()
    return int(os.environ["WORLD_SIZE"])


def set_threads(threads: int) -> None:
    """Processes x threads <= cores, or the processes fight for the same cores (docs/DESIGN.md). An explicit
    `train.threads` wins, then an operator's OMP_NUM_THREADS (torchrun sets 1 when it starts several processes
    and finds none), then the cores this process may use over the processes of its node."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if threads <= 0 and omp.isdigit() and int(omp) > 0:
        threads = int(omp)
    if threads <= 0:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")))
        # The cores this process may run on (cgroups, taskset, srun --cpu-bind), not the machine's.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // max(1, local))
    torch.set_num_threads(threads)


@dataclass
class Layout:
    rank: int
    world: int
    tp_rank: int
    tp: int
    dp_rank: int
    dp: int
    device: torch.device


def select_device(local_rank: int) -> torch.device:
    """This rank's device: GPU `LOCAL_RANK % visible GPUs`. With one GPU bound per task (`--gpus-per-task=1`,
    `--gpu-bind`) each task sees one device, ordinal 0, whatever its local rank; with all of a node's GPUs
    visible it is the local rank. DeepSpeed's engine is given the same ordinal (`engine.build_engine`)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    # fp32 matmuls outside the bf16 path (evaluation, the SGT reference, router logits) on tensor cores.
    torch.set_float32_matmul_precision("high")  # TF32
    return device


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without stopping the host: a GPU copy goes from pinned memory, asynchronously
    (from pageable memory CUDA first waits for the stream to drain)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def init(parallel: ParallelConfig, timeout_s: float = 600) -> Layout:
    """Join the process group and build megatron's TP/DP groups; returns where this rank sits. `timeout_s`
    (train.collective_timeout_s) bounds a collective in every group, the world's and megatron's alike."""
    import deepspeed
    from megatron.core import parallel_state

    env_from_launcher()
    compat.check_versions()
    compat.skip_shm_comm_build()
    device = select_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized() and int(os.environ["WORLD_SIZE"]) == 1:
        # A world of one needs no rendezvous: an in-memory store, not a TCP port. The port env:// would use was
        # found free and released (_free_port), and another process's connection can take it before the store
        # listens (EADDRINUSE, seen with many one-process tools started side by side). DeepSpeed then adopts
        # the group.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=timeout_s))
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
            distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),  # megatron takes whole minutes
            # Its extra gloo copies of every group are unused here, and on multi-NIC nodes without
            # GLOO_SOCKET_IFNAME they hang at creation: only on a gloo world (CPU), where they cost nothing new.
            create_gloo_process_groups=dist.get_backend() == "gloo")
    return Layout(rank=dist.get_rank(), world=dist.get_world_size(),
                  tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp=parallel.tp,
                  dp_rank=parallel_state.get_data_parallel_rank(),
                  dp=parallel_state.get_data_parallel_world_size(), device=device)


def topology(parallel: ParallelConfig, world: int):
    """DeepSpeed's (pipe, data, model) topology for this layout. megatron-core's default rank order
    (tp fastest, then dp, then pp) is the same order, so one rank has the same TP/DP/PP peers in both;
    `check_topology` asserts it on a live world."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=parallel.pp, num_mp=parallel.tp, num_dp=world // (parallel.tp * parallel.pp))


def check_topology(topo) -> None:
    """Raise unless megatron's TP, DP and PP groups of this rank are DeepSpeed's model, data and pipe groups."""
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    ours = {"model": ps.get_tensor_model_parallel_group(), "data": ps.get_data_parallel_group(),
            "pipe": ps.get_pipeline_model_parallel_group()}
    for axis, group in ours.items():
        theirs = next(ranks for ranks in topo.get_axis_comm_lists(axis) if rank in ranks)
        mine = dist.get_process_group_ranks(group)
        if sorted(mine) != sorted(theirs):
            raise RuntimeError(f"rank {rank}: megatron's {axis} group {mine} is not DeepSpeed's {theirs}")


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    compat.clear_deepspeed_groups()
    if dist.is_initialized():
        dist.destroy_process_group()


class MegatronMPU:
    """megatron-core's parallel_state seen through the `mpu` interface DeepSpeed expects.

    DeepSpeed uses it for the data-parallel gradient reduction group and to count tensor-parallel
    parameters once in the gradient norm; without it ZeRO would all-reduce over TP ranks too.
    """

    def __init__(self):
        from megatron.core import parallel_state as ps
        self.ps = ps

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()
