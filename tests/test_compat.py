"""The library internals cherry_megatron/compat.py patches or reads still exist, with the shapes it relies on."""
import importlib
import inspect

import pytest

from cherry_megatron import compat
from cherry_megatron.errors import UserError


@pytest.mark.parametrize("module, path", compat.PATCHED, ids=[f"{m}:{p}" for m, p in compat.PATCHED])
def test_every_patched_symbol_still_exists(module, path):
    obj = importlib.import_module(module)
    for part in path.split("."):
        assert hasattr(obj, part), f"{module}.{path}: no {part}"
        obj = getattr(obj, part)


def test_the_internals_have_the_shapes_the_patches_rely_on():
    from deepspeed.moe import mappings
    from deepspeed.moe.sharded_moe import TopKGate
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.pipe import module as pipe_module
    from deepspeed.runtime.pipe.engine import PipelineEngine

    assert list(inspect.signature(TopKGate.forward).parameters) == ["self", "input", "used_token", "sparse_routes",
                                                                    "use_tutel"]
    assert list(inspect.signature(mappings._gather_tokens).parameters) == ["input_", "dim"]
    assert list(inspect.signature(TorchCheckpointEngine.save).parameters)[:3] == ["self", "state_dict", "path"]
    assert "self.total_loss" in inspect.getsource(PipelineEngine.eval_batch) or \
        "total_loss" in inspect.getsource(PipelineEngine._exec_forward_pass)
    assert "ds_pipe_replicated = True" in inspect.getsource(pipe_module)
    from deepspeed.checkpoint import ds_to_universal

    assert "torch.load" in inspect.getsource(ds_to_universal)  # what `torch_load_as` intercepts


def test_versions_are_the_checked_ones_and_another_is_refused_by_name(monkeypatch):
    compat.check_versions()  # the installed versions are the checked ones (requirements.txt pins them)
    monkeypatch.setitem(compat.CHECKED, "deepspeed", "0.0.1")
    with pytest.raises(UserError, match=r"deepspeed .* is installed; .* checked against 0\.0\.1"):
        compat.check_versions()
    monkeypatch.setenv("CHERRY_UNCHECKED_VERSIONS", "1")
    compat.check_versions()


def test_requirements_allow_only_the_checked_versions():
    from pathlib import Path

    req = [line.split("#")[0].strip() for line in
           (Path(__file__).resolve().parents[1] / "requirements.txt").read_text().splitlines()]
    for package, version in compat.CHECKED.items():
        assert f"{package}=={version}" in req, package
