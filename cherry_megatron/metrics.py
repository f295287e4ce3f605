"""Run logging: one JSON object per logged step in metrics.jsonl, the same scalars in TensorBoard."""
from __future__ import annotations

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
