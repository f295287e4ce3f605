"""Run under torchrun: for each layout TPxPP given, every rank checks megatron's groups against
DeepSpeed's topology (one launch, megatron's groups rebuilt per layout)."""
import sys

from megatron.core import parallel_state

from cherry_megatron import distributed
from cherry_megatron.config import ParallelConfig

for spec in sys.argv[1:]:
    tp, pp = (int(x) for x in spec.split("x"))
    parallel = ParallelConfig(tp=tp, pp=pp)
    layout = distributed.init(parallel)
    topo = distributed.topology(parallel, layout.world)
    distributed.check_topology(topo)
    coord = topo.get_coord(layout.rank)
    assert (coord.model, coord.data, coord.pipe) == (layout.tp_rank, layout.dp_rank,
                                                      parallel_state.get_pipeline_model_parallel_rank()), (coord, layout)
    # one write per line: print's separate newline write lets lines of 4 processes run together
    sys.stdout.write(f"{spec} rank {layout.rank}: pipe {coord.pipe} data {coord.data} model {coord.model} ok\n")
    sys.stdout.flush()
    parallel_state.destroy_model_parallel()
distributed.shutdown()
