"""Run logging: one JSON object per logged step in metrics.jsonl, the same scalars in TensorBoard."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

# Dense peak throughput per device for MFU, by the precision a run computes in (vendor figures).
GPU_PEAK_TFLOPS = {"H200": {"bf16": 989.0, "fp32": 67.0}, "H100": {"bf16": 989.0, "fp32": 67.0},
                   "A100": {"bf16": 312.0, "fp32": 19.5}, "L40S": {"bf16": 362.0, "fp32": 91.6}}
# Measured on the 2-core development CPU: 2048^3 fp32 matmul, 155 GFLOP/s on 2 threads (docs/DESIGN.md).
CPU_PEAK_TFLOPS_PER_THREAD = 0.0775


def peak_tflops(device: torch.device, precision: str, override: float) -> float:
    """Peak TFLOP/s of the hardware one process drives."""
    if override > 0:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peaks["fp32" if precision == "fp32" else "bf16"]
        return float("nan")
    return CPU_PEAK_TFLOPS_PER_THREAD * torch.get_num_threads()


def _fmt(key: str, value) -> str:
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

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in values.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        print(" | ".join(_fmt(k, v) for k, v in row.items()), flush=True)
        for k, v in values.items():
            if isinstance(v, (int, float)) and v is not None:
                self.tb.add_scalar(f"train/{k}" if not k.startswith("eval") else f"eval/{k}", v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
