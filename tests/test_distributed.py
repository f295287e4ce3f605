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
