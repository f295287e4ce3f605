"""The package on its own: `pip install .` (not editable) gives console scripts that work from any directory,
with the presets, DeepSpeed JSONs and sbatch template inside the package; and pyproject.toml declares the
dependencies requirements.txt installs."""
import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from cherry_megatron.distributed import child_env
from conftest import ROOT

SCRIPTS = ["cherry-train-tokenizer", "cherry-preprocess", "cherry-plan", "cherry-train", "cherry-submit",
           "cherry-evaluate", "cherry-compress", "cherry-prune", "cherry-build-moee", "cherry-generate",
           "cherry-convert", "cherry-build-blend",
           "cherry-tokenizer-report"]
PACKAGE_DATA = ["configs/tiny.yaml", "configs/dense-1b-48l.yaml", "ds_configs/zero0.json", "ds_configs/zero1.json",
                "ds_configs/zero2.json", "ds_configs/zero3.json", "ds_configs/zero3_offload.json",
                "launch/train.sbatch"]


def test_pyproject_declares_the_requirements_and_every_console_script():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    required = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(set(declared)) == sorted(r for r in required if r)  # the same ranges, nothing left out
    assert sorted(project["scripts"]) == sorted(SCRIPTS)


@pytest.mark.slow
def test_installed_package_runs_from_any_directory(corpus, tmp_path):
    """A fresh venv gets `pip install --no-deps --no-build-isolation` of a copy of the package's sources (the
    in-tree build would write build/ and *.egg-info into the checkout); then, from another directory, every
    console script answers --help and cherry-train trains 2 steps.

    No network: the dependencies (and pip and setuptools, for the build) come from the project's .venv through
    a .pth file in the fresh venv's site-packages naming .venv's site-packages. Not --system-site-packages:
    that is the base interpreter's, without them. A .pth line only appends the directory to sys.path (the
    .pth files in it are not run), so .venv's editable hook that maps cherry_megatron to this checkout stays
    off, and the venv's own site-packages, where the package is installed, comes first."""
    src, venv, work = tmp_path / "src", tmp_path / "venv", tmp_path / "elsewhere"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "cherry_megatron", src / "cherry_megatron", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    env = child_env({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONNOUSERSITE": "1"})
    env.pop("PYTHONPATH", None)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], env=env,
                               capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    (site / "project_venv.pth").write_text(sysconfig.get_path("purelib") + "\n")  # .venv's (this interpreter's)
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                          "--disable-pip-version-check", str(src)], env=env, capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-3000:]
    for rel in PACKAGE_DATA:
        assert (site / "cherry_megatron" / rel).is_file(), f"{rel} is not in the installed package"

    work.mkdir()
    where = subprocess.run([str(python), "-c", "import json, cherry_megatron, cherry_megatron.launch.slurm as s; "
                            "print(json.dumps([cherry_megatron.__file__, str(s.TEMPLATE)]))"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr[-2000:]
    package, template = (Path(p) for p in json.loads(where.stdout))
    assert package.is_relative_to(site) and template.is_relative_to(site), (package, template)

    for script in SCRIPTS:
        proc = subprocess.run([str(bin_dir / script), "--help"], cwd=work, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0 and f"usage: {script} " in proc.stdout, (script, proc.stderr[-2000:])

    sets = ["train.steps=2", "model.num_layers=2", "train.seq_length=64", "train.micro_batch_size=2",
            "train.global_batch_size=2", "train.eval_interval=100", "train.save_interval=100", "train.eval_tokens=128",
            f"data.paths=[{corpus.train.resolve()}]", f"data.tokenizer_model={corpus.tokenizer.resolve()}",
            f"data.eval_path={corpus.heldout.resolve()}"]  # the preset's paths are relative to a checkout
    proc = subprocess.run([str(bin_dir / "cherry-train"), "--config", "tiny", "--run-dir", "runs/x", "--set", *sets],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    # exit status 0 too: the entry point drops main's summary dict, which sys.exit would print and exit 1 on
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (work / "runs" / "x" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2] and re.search(r"^summary: .*step=2\b", proc.stdout, re.M)
