"""The recipe runner: recipe files checked before anything runs, stages skipped when finished, refused when
changed, and a short recipe run end to end through the real tools."""
import json

import pytest

from cherry_megatron.errors import ConfigError
from cherry_megatron.recipe import runner
from cherry_megatron.recipe.spec import load_recipe

GOOD = """
- name: dense
  kind: train
  config: tiny
  set: {train.steps: 4}
- name: small
  kind: compress
  from: dense
  args: {target-layers: 1, lora-rank: 2}
- name: up
  kind: train
  config: tiny
  init: "@small"
  set: {distill.teacher: "@dense"}
- name: check
  kind: evaluate
  from: [dense, up]
  args: {data: data/tokens/heldout_text_document}
"""


def _recipe(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_recipe_reads_with_its_references_and_overrides(tmp_path):
    stages = load_recipe(_recipe(tmp_path, GOOD), ["train.lr=0.001", "up:train.steps=2", "small:lora-rank=4"])
    assert [s.name for s in stages] == ["dense", "small", "up", "check"]
    dense, small, up, check = stages
    assert dense.set == {"train.steps": 4, "train.lr": 0.001} and up.set["train.lr"] == 0.001
    assert up.set["train.steps"] == 2 and "train.steps" not in small.args and small.args["lora-rank"] == 4
    assert up.references() == ["small", "dense"] and check.references() == ["dense", "up"]


@pytest.mark.parametrize("text, message", [
    ("- {name: a, kind: bake}", "unknown kind 'bake'"),
    ("- {name: a, kind: compress, from: b, args: {target-layers: 1}}\n- {name: b, kind: train, config: tiny}",
     "uses 'b', which comes later"),
    ("- {name: a, kind: train, config: tiny}\n- {name: b, kind: compress, from: zz, args: {target-layers: 1}}",
     "'zz', which is no stage"),
    ("- {name: a, kind: train, config: tiny, init: '@a'}", "uses itself: a cycle"),
    ("- {name: a, kind: train, config: tiny}\n- {name: b, kind: compress, from: a}", "needs args: {target-layers"),
    ("- {name: a, kind: train}", "needs `config`"),
    ("- {name: a, kind: train, config: tiny}\n- {name: b, kind: train, init: a}", "init names an earlier stage as @name"),
    ("- {name: a, kind: train, config: tiny}\n- {name: a, kind: train, config: tiny}", "two stages are named 'a'"),
    ("- {name: a, kind: train, config: tiny, colour: red}", "unknown field 'colour'"),
    ("- {name: a, kind: evaluate, args: {data: x}}", "needs `from`"),
    ("stages: 3", "expected a list of stages"),
])
def test_bad_recipes_are_one_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(_recipe(tmp_path, text))


def test_a_bad_override_is_one_error(tmp_path):
    path = _recipe(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="no stage named 'nope'"):
        load_recipe(path, ["nope:train.steps=3"])
    with pytest.raises(ConfigError, match="expects KEY=VALUE"):
        load_recipe(path, ["train.steps"])


def test_a_finished_stage_is_skipped_and_a_changed_one_refused_with_the_difference(tmp_path):
    stages = load_recipe(_recipe(tmp_path, GOOD))
    run_dir = tmp_path / "run"
    (run_dir / "dense").mkdir(parents=True)
    (run_dir / "dense" / runner.MARKER).write_text(json.dumps({"settings": stages[0].settings(), "summary": {}}))
    assert [a for _, a in runner.plan(stages, run_dir)] == ["skip", "run", "run", "run"]
    assert [a for _, a in runner.plan(stages, run_dir, rerun="dense")] == ["rerun", "run", "run", "run"]
    assert [a for _, a in runner.plan(stages, run_dir, until="small")] == ["skip", "run"]
    changed = load_recipe(_recipe(tmp_path, GOOD), ["dense:train.steps=5"])
    with pytest.raises(ConfigError, match=r"\(set.train.steps: 4 -> 5\); give --rerun dense"):
        runner.plan(changed, run_dir)
    with pytest.raises(ConfigError, match="--until zz: no stage named"):
        runner.plan(stages, run_dir, until="zz")


def test_a_stage_whose_input_ran_again_runs_again(tmp_path):
    stages = load_recipe(_recipe(tmp_path, GOOD))
    run_dir = tmp_path / "run"
    for s in stages[:2]:  # dense and small finished, small made from this dense
        (run_dir / s.name).mkdir(parents=True)
        (run_dir / s.name / runner.MARKER).write_text(json.dumps(
            {"settings": s.settings(), "inputs": runner.inputs_of(s, run_dir), "summary": {}}))
    assert [a for _, a in runner.plan(stages, run_dir)][:2] == ["skip", "skip"]
    assert [a for _, a in runner.plan(stages, run_dir, rerun="dense")][:2] == ["rerun", "rerun"]
    # dense made again by a run that stopped there (--rerun dense --until dense): small is stale
    (run_dir / "dense" / runner.MARKER).write_text(json.dumps({"settings": stages[0].settings(), "summary": {"x": 1}}))
    assert [a for _, a in runner.plan(stages, run_dir)][:2] == ["skip", "rerun"]


def test_stage_references_and_keys_on_the_command_line(tmp_path):
    stages = load_recipe(_recipe(tmp_path, GOOD), ["up:distill.teacher=@small"])
    assert stages[2].set["distill.teacher"] == "@small"
    with pytest.raises(ConfigError, match="stage 'dense': unknown config key 'train.stepz'"):
        load_recipe(_recipe(tmp_path, GOOD), ["dense:train.stepz=3"])


def test_the_shipped_recipes_read_and_the_1b_one_fits_two_eight_gpu_nodes(tmp_path):
    from types import SimpleNamespace

    from cherry_megatron.launch.slurm import Partition, check_fits
    from cherry_megatron.recipe import chain

    tiny = load_recipe("recipes/cherry-tiny.yaml")
    assert [s.kind for s in tiny] == ["train", "compress", "train", "train", "train", "fuse", "train", "evaluate"]
    big = load_recipe("recipes/cherry-1b.yaml")
    assert big[0].config == "dense-1b-48l" and big[0].set["sgt.ratio"] == 0.15
    assert big[1].args["target-layers"] == 6 and big[-2].set["moee.ep_size"] == 2
    opts = SimpleNamespace(nodes=2, gpus_per_node=8, cpus_per_task=12, partition="", time="", account="",
                           launcher="srun")
    shapes = {s.name: chain.shape(s, opts) for s in big}
    assert (shapes["dense"].nodes, shapes["dense"].tasks_per_node, shapes["dense"].gpus_per_node) == (2, 8, 8)
    assert (shapes["branch-ko"].nodes, shapes["branch-ko"].tasks_per_node) == (2, 4)
    assert (shapes["compressed"].nodes, shapes["compressed"].tasks_per_node, shapes["compressed"].gpus_per_node) == (1, 1, 1)
    for job in shapes.values():
        check_fits(job, Partition("gpu", nodes=2, cpus=96, gpus=8))
    with pytest.raises(ConfigError, match="nproc 16 needs 16 GPUs on each of 1 nodes"):
        chain.shape(big[0], SimpleNamespace(**{**vars(opts), "nodes": 1}))
    with pytest.raises(ConfigError, match="nproc 16 does not spread evenly over 3 nodes"):
        chain.shape(big[0], SimpleNamespace(**{**vars(opts), "nodes": 3}))


def test_a_published_model_is_named_once_and_read_like_a_stage(tmp_path):
    from cherry_megatron.recipe import stages as kinds

    stages = load_recipe("recipes/cherry-smollm2.yaml")
    by = {s.name: s for s in stages}
    assert by["compressed"].references() == [] and by["uptrain"].references() == ["compressed"]
    assert by["uptrain"].settings()["models"] == {"smollm2": "data/models/smollm2-135m"}
    (cmd,) = kinds.commands(by["compressed"], tmp_path)
    assert cmd[cmd.index("--load") + 1] == "data/models/smollm2-135m"
    (cmd,) = kinds.commands(by["uptrain"], tmp_path)
    assert 'distill.teacher="data/models/smollm2-135m"' in cmd and cmd[cmd.index("--config") + 1] == str(tmp_path / "compressed")
    (cmd,) = kinds.commands(by["evaluate"], tmp_path)
    assert cmd[cmd.index("--load") + 1:cmd.index("--load") + 3] == ["data/models/smollm2-135m", str(tmp_path / "compressed")]
    assert [s.kind for s in stages].count("train") == 5  # uptrain, two branches, the MoEE, the single student
    bad = _recipe(tmp_path, "models: {dense: data/models/smollm2-135m}\nstages:\n" + GOOD.replace("\n", "\n  "))
    with pytest.raises(ConfigError, match="stage 'dense' has the name of a published model"):
        load_recipe(bad)
