"""The launch scripts for clusters without SLURM, each starting 2 real processes on this machine: the trainer
finds its rank from whichever launcher started it and trains the same curve as one process."""
import subprocess

import pytest

from cherry_megatron.distributed import child_env
from cherry_megatron.metrics import read_metrics
from conftest import ROOT, SHORT_RUN

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script", ["launchers/deepspeed/train.sh"])  # torchrun: every multi-process test
def test_launcher_runs_the_trainer_on_two_processes(script, baseline, tmp_path):
    env = child_env({"NPROC": "2", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_PORT": "29613"})
    proc = subprocess.run(["bash", str(ROOT / script), "--config", "tiny", "--run-dir", str(tmp_path / "run"),
                           "--set", *SHORT_RUN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2 = tp 1 x dp 2" in proc.stdout
    last = lambda run: [r["loss"] for r in read_metrics(run) if "loss" in r][-1]  # noqa: E731
    assert last(tmp_path / "run") == pytest.approx(last(baseline), rel=1e-5)
