import pytest

from cherry_megatron.distributed import first_host


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[07-09,12],cpu1", "gpu07"), ("n1,n2", "n1"), ("node5", "node5"), ("a-b[1-2]", "a-b1"), ("n[3,1]", "n3"),
])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host
