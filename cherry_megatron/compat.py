"""Every place this package patches or reaches into DeepSpeed, megatron-core or torch internals, in one module.

Each was read against the versions in `CHECKED` (requirements.txt allows only those); `PATCHED` lists the
private symbols touched, and tests/test_compat.py asserts each still exists, so an upgrade that moves one
fails there, by name, instead of deep inside a run. `check_versions` refuses other versions at start
(CHERRY_UNCHECKED_VERSIONS=1 skips it, at the operator's risk). Each function imports the library it patches
itself: `distributed` imports this module, and must stay loadable without DeepSpeed (see there).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from importlib import metadata

import torch

from cherry_megatron.errors import UserError

CHECKED = {"deepspeed": "0.19.8", "megatron-core": "0.16.1"}

# (module, attribute path) of every private or patched symbol below.
PATCHED = [
    ("deepspeed.ops", "__compatible_ops__"),
    ("deepspeed.moe.mappings", "_gather_tokens"),
    ("deepspeed.moe.sharded_moe", "TopKGate.forward"),
    ("deepspeed.moe.layer", "MoE.set_deepspeed_parallelism"),
    ("deepspeed.utils.groups", "mpu"),
    ("deepspeed.utils.groups", "_get_expert_parallel_rank"),
    ("deepspeed.utils.groups", "_EXPERT_PARALLEL_GROUP"),
    ("deepspeed.utils.groups", "_EXPERT_PARALLEL_GROUP_RANKS"),
    ("deepspeed.utils.groups", "_EXPERT_DATA_PARALLEL_GROUP"),
    ("deepspeed.utils.groups", "_EXPERT_DATA_PARALLEL_GROUP_RANKS"),
    ("deepspeed.utils.bwc", "bwc_tensor_model_parallel_group"),
    ("deepspeed.utils.bwc", "bwc_tensor_model_parallel_world_size"),
    ("deepspeed.checkpoint.ds_to_universal", "_inject_missing_state"),
    ("deepspeed.checkpoint.ds_to_universal", "main"),
    ("deepspeed.utils.zero_to_fp32", "_get_fp32_state_dict_from_zero_checkpoint"),
    ("deepspeed.runtime.pipe.engine", "PipelineEngine.eval_batch"),
    ("deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine", "TorchCheckpointEngine.save"),
    ("megatron.core.tokenizers.text.libraries.huggingface_tokenizer", "HAVE_TRANSFORMERS"),
    ("megatron.core.tensor_parallel.cross_entropy", "VocabParallelCrossEntropy.calculate_predicted_logits"),
]


def check_versions() -> None:
    """One error line naming an installed DeepSpeed or megatron-core other than the one the patches were checked on."""
    if os.environ.get("CHERRY_UNCHECKED_VERSIONS") == "1":
        return
    for package, version in CHECKED.items():
        try:
            found = metadata.version(package)
        except metadata.PackageNotFoundError:
            raise UserError(f"{package} is not installed (cherry_megatron needs {package}=={version})") from None
        if found.split("+")[0] != version:
            raise UserError(f"{package} {found} is installed; cherry_megatron's patches of its internals were checked "
                            f"against {version} (cherry_megatron/compat.py): install {package}=={version}, or set "
                            "CHERRY_UNCHECKED_VERSIONS=1 to run anyway")


# ------------------------------------------------------------------------------------------ DeepSpeed comm
def skip_shm_comm_build() -> None:
    """DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce when it starts on CPU (~90 s and a C++
    toolchain on a fresh machine) that only its inference kernels call (`inference_all_reduce`); training
    collectives go through torch.distributed. Marking the op unavailable makes DeepSpeed skip the build."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# --------------------------------------------------------------------------------------- DeepSpeed groups
def deepspeed_mpu():
    from deepspeed.utils import groups

    return groups.mpu


def set_deepspeed_mpu(mpu) -> None:
    """What deepspeed.initialize(mpu=...) sets; expert groups built before the engine (model construction)
    need it to exclude TP ranks, and a pipeline engine never gets one."""
    from deepspeed.utils import groups

    groups.mpu = mpu


def expert_parallel_rank(group_name: str) -> int:
    from deepspeed.utils import groups

    return groups._get_expert_parallel_rank(group_name)


def clear_deepspeed_groups() -> None:
    """DeepSpeed caches its expert groups (and our mpu) in module globals: a later world in this process must
    not find the groups of a destroyed one."""
    from deepspeed.utils import groups

    for cache in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                  groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
        cache.clear()
    groups.mpu = None


# ------------------------------------------------------------------------------------------- DeepSpeed MoE
def _gather_tokens_gloo(input_: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """deepspeed.moe.mappings._gather_tokens (TP > 1 only) all-gathers into a flat buffer, which nccl takes and
    gloo rejects ("invalid tensor size"): gloo wants the output shaped [world * d0, ...]. Same memory layout,
    so the same result."""
    import deepspeed
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_group, bwc_tensor_model_parallel_world_size

    mpu = deepspeed_mpu()
    world = bwc_tensor_model_parallel_world_size(mpu)
    if world == 1:
        return input_
    input_ = input_.contiguous()
    buffer = torch.empty((world * input_.shape[0], *input_.shape[1:]), dtype=input_.dtype, device=input_.device)
    deepspeed.comm.all_gather_into_tensor(buffer, input_, group=bwc_tensor_model_parallel_group(mpu))
    return torch.cat(buffer.chunk(world, dim=0), dim=dim).contiguous() if dim else buffer


def use_gloo_token_gather() -> None:
    """Installed for gloo only; nccl runs DeepSpeed's own gather."""
    import torch.distributed as dist
    from deepspeed.moe import mappings

    if dist.is_initialized() and dist.get_backend() == "gloo":
        mappings._gather_tokens = _gather_tokens_gloo


def pad_capacity_to_tp(gate) -> None:
    """DeepSpeed's gate, with the expert capacity rounded up to a multiple of TP. With tensor-parallel experts
    DeepSpeed splits the capacity slots over TP ranks around its all-to-all but pads the capacity to TP only
    for non-TP experts (deepspeed/moe/sharded_moe.py), so an odd capacity fails. Extra slots stay empty: they
    change no output. The gate keeps its state; only its class changes (no rebuild from positional arguments)."""
    from deepspeed.moe.sharded_moe import TopKGate

    assert type(gate) is TopKGate, type(gate)
    gate.__class__ = _tp_padded_gate()


@functools.cache
def _tp_padded_gate() -> type:
    from deepspeed.moe.sharded_moe import TopKGate
    from megatron.core import parallel_state

    class TPPaddedGate(TopKGate):
        def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):
            out = super().forward(input, used_token, sparse_routes, use_tutel)
            tp = parallel_state.get_tensor_model_parallel_world_size()
            if not sparse_routes or tp == 1:
                return out
            l_aux, capacity, *rest = out
            return (l_aux, -(-int(capacity) // tp) * tp, *rest)

    return TPPaddedGate


# ------------------------------------------------------------------------------------ megatron-core losses
def sync_free_cross_entropy() -> None:
    """megatron's vocab-parallel cross-entropy zeroes out-of-shard targets with `x[mask] = 0`: a boolean-mask
    write, which on a GPU first counts the mask on the host (a sync, twice per loss call, every micro-batch).
    The same function with `masked_fill_`, bit for bit the same values; idempotent."""
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

    if getattr(VocabParallelCrossEntropy.calculate_predicted_logits, "_cherry", False):
        return

    def calculate_predicted_logits(vocab_parallel_logits, target, logits_max, vocab_start_index, vocab_end_index):
        vocab_parallel_logits -= logits_max.unsqueeze(dim=-1)
        target_mask = (target < vocab_start_index) | (target >= vocab_end_index)
        masked_target = (target.clone() - vocab_start_index).masked_fill_(target_mask, 0)
        partition_vocab_size = vocab_parallel_logits.size()[-1]
        logits_2d = vocab_parallel_logits.view(-1, partition_vocab_size)
        masked_target_1d = masked_target.view(-1)
        arange_1d = torch.arange(start=0, end=logits_2d.size()[0], device=logits_2d.device)
        predicted_logits = logits_2d[arange_1d, masked_target_1d].clone().contiguous().view_as(target)
        predicted_logits.masked_fill_(target_mask, 0.0)
        exp_logits = torch.exp(vocab_parallel_logits, out=vocab_parallel_logits)
        return target_mask, masked_target_1d, predicted_logits, exp_logits.sum(dim=-1), exp_logits

    calculate_predicted_logits._cherry = True
    VocabParallelCrossEntropy.calculate_predicted_logits = staticmethod(calculate_predicted_logits)


# ----------------------------------------------------------------------------------- DeepSpeed checkpoints
@contextlib.contextmanager
def torch_load_as(load):
    """Every `torch.load` inside the block is `load`: DeepSpeed's conversion tools (`zero_to_fp32`,
    `ds_to_universal`) call torch.load(weights_only=False) themselves, and a weights-only `load` keeps a
    checkpoint that smuggles a callable from running it."""
    saved = torch.load
    torch.load = load
    try:
        yield
    finally:
        torch.load = saved


def zero3_fp32_state_dict(folder: str) -> dict:
    """DeepSpeed's own gathering of ZeRO-3 flat partitions into fp32 tensors (lazily, one when touched), for
    one TP rank's files in `folder`."""
    from deepspeed.utils import zero_to_fp32

    return zero_to_fp32._get_fp32_state_dict_from_zero_checkpoint(folder, False)


@contextlib.contextmanager
def universal_conversion(info: dict, safe_load):
    """ds_to_universal 0.19.8 with (1) a checkpoint lacking UNIVERSAL_CHECKPOINT_INFO given ours (DeepSpeed would
    inject an empty one, which treats every weight as split along dim 0) and (2) megatron's `_extra_state = None`
    entries dropped on load (ds_to_universal calls `.float()` on every module value); every load weights-only."""
    from deepspeed.checkpoint import ds_to_universal as d
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    def inject(ds_checkpoint):
        if ds_checkpoint.get_checkpoint_info(UNIVERSAL_CHECKPOINT_INFO) is None:
            ds_checkpoint.global_state[UNIVERSAL_CHECKPOINT_INFO] = info

    def load(*args, **kwargs):
        out = safe_load(*args, **kwargs)
        if isinstance(out, dict) and isinstance(out.get("module"), dict):
            out["module"] = {k: v for k, v in out["module"].items() if v is not None}
        return out

    saved = d._inject_missing_state
    d._inject_missing_state = inject
    try:
        with torch_load_as(load):
            yield d.main
    finally:
        d._inject_missing_state = saved


def wrap_checkpoint_save(engine, wrapper) -> None:
    """The engine's checkpoint writes go through `wrapper(save, state_dict, path)` (fault injection in tests)."""
    ce = engine.checkpoint_engine
    save = ce.save
    ce.save = lambda state_dict, path: wrapper(save, state_dict, path)


# -------------------------------------------------------------------------------------- DeepSpeed pipeline
def reset_pipeline_loss(engine) -> None:
    """eval_batch adds into the loss its last train_batch left (a scalar) where train_batch starts from None."""
    engine.total_loss = None


def count_in_grad_norm(params) -> None:
    """DeepSpeed marks every parameter of a tied module's later copies as replicated (`ds_pipe_replicated`),
    which leaves them out of the gradient norm; these live on one stage only."""
    for p in params:
        p.ds_pipe_replicated = False


# ------------------------------------------------------------------------------------------------- imports
@contextlib.contextmanager
def hidden_module(module: str):
    """`import module` fails inside the block (and works again after): megatron.core.tokenizers imports every
    library it wraps to load any one of them, transformers costing each process ~1.5 s for a sentencepiece
    model; its wrappers tolerate a missing transformers (HAVE_TRANSFORMERS)."""
    if module in sys.modules or "megatron.core.tokenizers.text" in sys.modules:
        yield
        return
    sys.modules[module] = None  # `import module` raises ModuleNotFoundError while this is set
    try:
        yield
    finally:
        if sys.modules.get(module, 0) is None:
            del sys.modules[module]


def transformers_for_megatron_tokenizers() -> None:
    """A process that loaded a sentencepiece model first imported megatron's Hugging Face wrapper with
    transformers hidden (`hidden_module`): it then holds no AutoTokenizer. Give it the real one before a
    Hugging Face tokenizer loads (megatron-core 0.16.1, text/libraries/huggingface_tokenizer.py)."""
    from megatron.core.tokenizers.text.libraries import huggingface_tokenizer as hft

    if getattr(hft, "AutoTokenizer", None) is None:
        from transformers import AutoTokenizer

        hft.AutoTokenizer = AutoTokenizer
