"""What each stage kind runs, and what it reports. Every stage runs the project's own command-line tool in a
child process, as a user would type it, so a recipe is nothing a user could not do by hand."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from cherry_megatron.recipe.spec import Stage

TOOLS = {"compress": "cherry_megatron.cli.compress", "prune": "cherry_megatron.cli.prune",
         "fuse": "cherry_megatron.cli.build_moee", "convert": "cherry_megatron.cli.convert",
         "evaluate": "cherry_megatron.evaluate"}


def resolve(value, run_dir: Path, models: dict | None = None):
    """"@name" -> that stage's model dir, or the published model's path (lists elementwise); anything else
    as given."""
    if isinstance(value, list):
        return [resolve(v, run_dir, models) for v in value]
    if isinstance(value, str) and value.startswith("@"):
        return str(model_dir_of(value[1:], run_dir, models))
    return value


def _options(args: dict, run_dir: Path, models: dict) -> list[str]:
    out = []
    for key, value in args.items():
        value = resolve(value, run_dir, models)
        if value is True:
            out.append(f"--{key}")
        elif value is not False and value is not None:
            out += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return out


def commands(stage: Stage, run_dir: Path, launch: tuple[str, int] | None = None) -> list[list[str]]:
    """The command lines of `stage`, output in DIR/<stage>. A train stage runs under torchrun on this
    machine, or inside a SLURM job (`launch` = (srun | torchrun, tasks per node)) through the launcher's
    own line, so a chained stage trains exactly as `cherry-submit` would train it."""
    out, py = run_dir / stage.name, sys.executable
    if stage.kind == "train":
        config = train_config(stage, run_dir)
        sets = [f"{k}={json.dumps(resolve(v, run_dir, stage.models))}" for k, v in stage.set.items()]
        train = ["-m", "cherry_megatron.train", "--config", str(config), "--run-dir", str(out),
                 *(["--set", *sets] if sets else [])]
        if launch:
            from cherry_megatron.launch.slurm import launch_line

            return [["bash", "-c", launch_line(launch[0], launch[1], shlex.quote(py),
                                               " ".join(shlex.quote(a) for a in train))]]
        if stage.nproc == 1:
            return [[py, *train]]
        return [[py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={stage.nproc}", *train]]
    tool = [py, "-m", TOOLS[stage.kind]]
    inputs = [str(model_dir_of(name, run_dir, stage.models)) for name in stage.inputs]
    if stage.kind in ("compress", "prune"):
        return [[*tool, "--load", inputs[0], "--output", str(out), *_options(stage.args, run_dir, stage.models)]]
    if stage.kind == "fuse":
        return [[*tool, "--experts", *inputs, "--output", str(out), *_options(stage.args, run_dir, stage.models)]]
    if stage.kind == "convert":
        fmt = stage.args.get("input-format", "deepspeed")
        rest = {k: v for k, v in stage.args.items() if k != "input-format"}
        return [[*tool, "--input", inputs[0], "--input-format", fmt, "--output", str(out / "model"),
                 *_options(rest, run_dir, stage.models)]]
    return [[*tool, "--load", *inputs, *_options(stage.args, run_dir, stage.models)]]  # evaluate: one line per input


ARCHITECTURE = ("name", "model", "recurrent", "moee")


def train_config(stage: Stage, run_dir: Path) -> str:
    """The trainer's --config: the preset or YAML, the earlier stage's model dir, or both: then DIR/<stage>.yaml
    with that model as its base and every section of the preset but the architecture's (data, train,
    parallel, sgt, ...), so a stage starting from a compressed model keeps the preset's training settings."""
    if not stage.init:
        return stage.config
    init = str(model_dir_of(stage.init[1:], run_dir, stage.models))
    if not stage.config:
        return init
    import yaml

    from cherry_megatron.config import load_config

    sections = {k: v for k, v in load_config(stage.config).to_dict().items() if k not in ARCHITECTURE}
    path = run_dir / f"{stage.name}.config.yaml"
    path.write_text(yaml.safe_dump({"base": init, **sections}, sort_keys=False))
    return str(path)


def model_dir_of(name: str, run_dir: Path, models: dict | None = None) -> Path:
    """An earlier stage's model: its dir, or the converted model inside a convert stage's; or a published
    model of the recipe (`models:`)."""
    if models and name in models:
        return Path(models[name])
    converted = run_dir / name / "model"
    return converted if converted.is_dir() else run_dir / name


def model_dir(stage: Stage, run_dir: Path) -> Path | None:
    """Where the stage's model is (what the next stages load), or None for a stage that makes none."""
    return {"train": run_dir / stage.name, "compress": run_dir / stage.name, "prune": run_dir / stage.name,
            "fuse": run_dir / stage.name, "convert": run_dir / stage.name / "model"}.get(stage.kind)


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.strip().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def last_json(text: str) -> dict:
    return (json_lines(text) or [{}])[-1]


EVAL_KEYS = {"compress": "heldout_loss_recurrent", "prune": "heldout_loss_after", "fuse": "heldout_loss_moee"}


def summary(stage: Stage, run_dir: Path, outputs: list[str]) -> dict:
    """{params, active_params, tokens, eval_loss} of a finished stage (None where it has no such thing)."""
    from cherry_megatron.config import load_config
    from cherry_megatron.convert.load import checkpoint_layer
    from cherry_megatron.metrics import read_metrics
    from cherry_megatron.model import parameter_count

    out = {"params": None, "active_params": None, "tokens": None, "eval_loss": None}
    where = model_dir(stage, run_dir)
    if where is not None and stage.kind != "convert":
        counts = parameter_count(load_config(str(where), read_checkpoint=checkpoint_layer))
        out["params"], out["active_params"] = counts["total"], counts["active"]
    if stage.kind == "train":
        rows = read_metrics(run_dir / stage.name)
        tokens = [r["consumed_tokens"] for r in rows if "consumed_tokens" in r]
        evals = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
        out["tokens"] = tokens[-1] if tokens else None
        out["eval_loss"] = evals[-1] if evals else None
        out["curve"] = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    elif stage.kind == "evaluate":
        results = json_lines(outputs[0])
        out["eval_loss"] = {name: r.get("loss") for name, r in zip(stage.inputs, results)}
        out["tokens"] = results[0].get("tokens") if results else None
    elif stage.kind in EVAL_KEYS:
        out["eval_loss"] = last_json(outputs[0]).get(EVAL_KEYS[stage.kind])
    return out
