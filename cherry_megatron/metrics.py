"""Run logging: one JSON object per logged step in metrics.jsonl, the same scalars in TensorBoard."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

# Dense (no sparsity) peak TFLOP/s for MFU, keyed on the exact `torch.cuda.get_device_name()` (vendor data
# sheets): a substring match gave PCIe and NVL parts the SXM peak. bf16 on tensor cores; fp32 without TF32.
# An unlisted device gets no MFU (NaN) unless train.peak_tflops says its peak.
GPU_PEAK_TFLOPS = {
    "NVIDIA H200": {"bf16": 989.4, "fp32": 66.9},  # SXM
    "NVIDIA H200 NVL": {"bf16": 835.0, "fp32": 60.0},
    "NVIDIA H100 80GB HBM3": {"bf16": 989.4, "fp32": 66.9},  # SXM
    "NVIDIA H100 PCIe": {"bf16": 756.0, "fp32": 51.0},
    "NVIDIA H100 NVL": {"bf16": 835.0, "fp32": 60.0},
    "NVIDIA A100-SXM4-80GB": {"bf16": 312.0, "fp32": 19.5},
    "NVIDIA A100-SXM4-40GB": {"bf16": 312.0, "fp32": 19.5},
    "NVIDIA A100 80GB PCIe": {"bf16": 312.0, "fp32": 19.5},
    "NVIDIA A100-PCIE-40GB": {"bf16": 312.0, "fp32": 19.5},
    "NVIDIA L40S": {"bf16": 362.1, "fp32": 91.6},
}
# Measured on the 2-core development CPU: 2048^3 fp32 matmul, 155 GFLOP/s on 2 threads (docs/DESIGN.md).
CPU_PEAK_TFLOPS_PER_THREAD = 0.0775


def peak_tflops(device: torch.device, precision: str, override: float) -> float:
    """Peak TFLOP/s of the hardware one process drives."""
    if override > 0:
        return override
    if device.type == "cuda":
        peaks = GPU_PEAK_TFLOPS.get(torch.cuda.get_device_name(device).strip())
        return peaks["fp32" if precision == "fp32" else "bf16"] if peaks else float("nan")
    return CPU_PEAK_TFLOPS_PER_THREAD * torch.get_num_threads()


@contextlib.contextmanager
def returning_freed_memory():
    """Set-up (model build, DeepSpeed's partitioning) with freed blocks returned to the system. glibc serves
    blocks under its mmap threshold (raised after each large free, up to 32 MiB) from the heap and keeps them
    resident once freed; weights built whole and cut to a partition, layer by layer, then leave the heap as
    fragmented as the full model was big. A 1 MiB threshold while setting up maps such blocks apart and unmaps
    them on free; after it, 32 MiB (glibc's own ceiling; a lower one costs ~35% of a CPU step in page faults)
    and one `malloc_trim`. No-op without glibc, or where MALLOC_MMAP_THRESHOLD_ is set (then it holds all along:
    1048576 keeps a CPU run's peak near what is live, at ~35% of its step time)."""
    import ctypes
    import os

    libc = None
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # an operator's setting stays in force throughout
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(-3, 32 << 20)
            libc.malloc_trim(0)


def memory_gib(device: torch.device) -> float:
    """This process's peak memory since the last `reset_peak_memory`: the allocator's `max_memory_allocated` on a
    GPU, the peak resident set (VmHWM) on CPU (where model, optimizer and DeepSpeed's buffers all live in host
    memory). There glibc keeps freed blocks under 32 MiB resident for reuse (see `returning_freed_memory`), so
    the peak is what the process held, a little above what was live at once."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # kB
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Start `memory_gib`'s peak afresh, so that a stage is not charged with an earlier one's transient: the
    allocator's reset on a GPU; on Linux writing 5 to /proc/self/clear_refs sets VmHWM to the current resident
    set (where that is not allowed the peak stays the process's, an over-estimate)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def base_memory_gib(device: torch.device) -> float:
    """What a run's peak is measured from, taken before the model is built: on CPU the peak resident set so far
    (the interpreter, torch, DeepSpeed, megatron; the peak, not the current set, so that a transient of the
    imports is not counted as the run's); on a GPU 0 (the allocator counts only tensors)."""
    return 0.0 if device.type == "cuda" else memory_gib(device)


def _fmt(key: str, value) -> str:
    if isinstance(value, dict):
        return f"{key} " + " ".join(_fmt(k, v).replace(" ", "=", 1) for k, v in value.items())
    if value is None or isinstance(value, int):
        return f"{key} {value}"
    if key == "mfu":
        return f"mfu {100 * value:.1f}%"
    if key in ("lr",):
        return f"{key} {value:.3e}"
    return f"{key} {value:.4f}" if abs(value) < 100 else f"{key} {value:,.0f}"


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # here: only the logging rank pays its import

            self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def resume_at(self, step: int) -> None:
        """A run resumed from its checkpoint at `step`: rows an earlier attempt logged past it (steps it ran but
        never saved, which this attempt runs again) are dropped from metrics.jsonl and TensorBoard, so every step
        appears once. A run starting over (step 0) keeps none."""
        if not self.enabled:
            return
        self.file.close()
        path = Path(self.file.name)
        keep = [r for r in read_metrics(path.parent) if step and r["step"] <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        tmp.replace(path)
        self.file = open(path, "a", encoding="utf-8")
        log_dir = self.tb.log_dir
        self.tb.close()
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir, purge_step=step + 1 if step else 0)

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in values.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        print(" | ".join(_fmt(k, v) for k, v in row.items()), flush=True)
        for k, v in values.items():
            for name, x in (v.items() if isinstance(v, dict) else [("", v)]):  # {lang: value}: one scalar each
                if isinstance(x, (int, float)):
                    tag = f"{k}/{name}" if name else k
                    self.tb.add_scalar(f"train/{tag}" if not k.startswith("eval") else f"eval/{tag}", x, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
