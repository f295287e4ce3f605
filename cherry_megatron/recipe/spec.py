"""A recipe file: a YAML list of named stages (or {name:, stages: [...]}), each of one kind.

    - name: dense            # DIR/dense/ is its output; later stages name it
      kind: train            # train | compress | prune | fuse | convert | evaluate
      config: tiny           # train: a preset or a YAML file: every section but the architecture's
      init: "@small"         # train: start from that stage's model (its architecture and weights)
      set: {parallel.tp: 2, train.steps: 60, distill.teacher: "@dense"}
      nproc: 2               # train: processes (torchrun on this machine)
    - name: small
      kind: compress         # compress | prune | convert: `from` one stage; fuse: `from` a list
      from: dense
      args: {target-layers: 2, lora-rank: 8}   # the tool's own options, without the dashes
    - name: check
      kind: evaluate
      from: [dense, small]
      args: {data: data/tokens/heldout_text_document, max-tokens: 4096}

Any string value "@name" stands for DIR/name. A stage may name only stages before it: that rules out
cycles, and the order in the file is the order they run in. A published model the recipe starts from is
named once, in a mapping beside the stages, and then used like a stage's output (`from: smollm2`, `init:
"@smollm2"`, `distill.teacher: "@smollm2"`):

    name: cherry-smollm2
    models: {smollm2: data/models/smollm2-135m}
    stages: [...]
 `--set KEY=VALUE` applies to every train stage
(a config key); `--set STAGE:KEY=VALUE` to that stage alone (a config key of a train stage, an option of a
tool stage).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cherry_megatron.config import read_yaml
from cherry_megatron.errors import ConfigError

KINDS = ("train", "compress", "prune", "fuse", "convert", "evaluate")
ONE_INPUT = ("compress", "prune", "convert")
FIELDS = {"name", "kind", "config", "init", "set", "nproc", "from", "args"}


@dataclass
class Stage:
    name: str
    kind: str
    config: str = ""
    init: str = ""  # "@stage"
    set: dict = field(default_factory=dict)
    nproc: int = 1
    inputs: list[str] = field(default_factory=list)  # `from`, in order
    args: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)  # the recipe's published models: {name: path}, every stage's

    def names(self) -> list[str]:
        """Every name this stage reads, stage or published model: its `from` and every "@name" among its values."""
        refs = list(self.inputs)
        for value in [self.config, self.init, *self.set.values(), *self.args.values()]:
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, str) and v.startswith("@"):
                    refs.append(v[1:])
        return refs

    def references(self) -> list[str]:
        """The stages this one reads (what must be finished before it runs)."""
        return [r for r in self.names() if r not in self.models]

    def settings(self) -> dict:
        """What defines the stage's output: compared with a finished stage's before it is skipped (with
        the content of a YAML file `config` names, so an edited file counts as a change)."""
        path = Path(self.config)
        content = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if self.config and path.is_file() else ""
        used = {r: self.models[r] for r in self.names() if r in self.models}
        return {"kind": self.kind, "config_sha256": content, "config": self.config, "init": self.init, "set": self.set,
                "nproc": self.nproc, "from": self.inputs, "args": self.args, **({"models": used} if used else {})}


def _parse_value(raw: str, where: str):
    if raw.startswith("@"):
        return raw  # a stage reference: YAML reserves a plain @ at the start of a value
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"{where}: cannot parse '{raw}' as YAML") from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> list[Stage]:
    data = read_yaml(path, "recipe")
    items = data.get("stages") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ConfigError(f"recipe {path}: expected a list of stages (or a mapping with `stages:`)")
    models = data.get("models", {}) if isinstance(data, dict) else {}
    if not isinstance(models, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in models.items()):
        raise ConfigError(f"recipe {path}: `models` maps names to model paths")
    stages = [_stage(item, i, path) for i, item in enumerate(items)]
    for s in stages:
        if s.name in models:
            raise ConfigError(f"stage '{s.name}' has the name of a published model of the recipe ({models[s.name]})")
        s.models = dict(models)
    _apply_overrides(stages, overrides)
    check(stages)
    return stages


def _stage(item, i: int, path) -> Stage:
    if not isinstance(item, dict):
        raise ConfigError(f"recipe {path}: stage {i + 1} is not a mapping")
    name, kind = item.get("name"), item.get("kind")
    if not name or not isinstance(name, str) or "/" in name or name.startswith("."):
        raise ConfigError(f"recipe {path}: stage {i + 1} needs a `name` (a plain directory name)")
    if kind not in KINDS:
        raise ConfigError(f"stage '{name}': unknown kind '{kind}' (one of {', '.join(KINDS)})")
    unknown = sorted(set(item) - FIELDS)
    if unknown:
        raise ConfigError(f"stage '{name}': unknown field '{unknown[0]}' (fields: {', '.join(sorted(FIELDS))})")
    inputs = item.get("from", [])
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
        raise ConfigError(f"stage '{name}': `from` names a stage or a list of stages")
    if not isinstance(item.get("nproc", 1), int) or isinstance(item.get("nproc", 1), bool):
        raise ConfigError(f"stage '{name}': nproc must be a whole number")
    for key in ("set", "args"):
        if not isinstance(item.get(key, {}), dict):
            raise ConfigError(f"stage '{name}': `{key}` must be a mapping")
    return Stage(name, kind, str(item.get("config", "")), str(item.get("init", "")), dict(item.get("set", {})),
                 int(item.get("nproc", 1)), inputs, dict(item.get("args", {})))


def _apply_overrides(stages: list[Stage], overrides) -> None:
    by_name = {s.name: s for s in stages}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE or STAGE:KEY=VALUE, got '{item}'")
        key, raw = item.split("=", 1)
        value = _parse_value(raw, f"--set {key}")
        if ":" in key:
            name, key = key.split(":", 1)
            if name not in by_name:
                raise ConfigError(f"--set {name}:{key}: no stage named '{name}'")
            stage = by_name[name]
            (stage.set if stage.kind == "train" else stage.args)[key] = value
        else:
            trains = [s for s in stages if s.kind == "train"]
            if not trains:
                raise ConfigError(f"--set {key}: the recipe has no train stage (name one: STAGE:{key}=...)")
            for s in trains:
                s.set[key] = value


def check(stages: list[Stage]) -> None:
    """Everything a recipe can get wrong without running: one error, before anything runs."""
    seen: dict[str, Stage] = {}
    names = [s.name for s in stages]
    for s in stages:
        if s.name in seen:
            raise ConfigError(f"two stages are named '{s.name}'")
        for ref in s.names():
            if ref in s.models:
                continue
            if ref == s.name:
                raise ConfigError(f"stage '{s.name}' uses itself: a cycle")
            if ref not in names:
                raise ConfigError(f"stage '{s.name}' uses '{ref}', which is no stage of the recipe")
            if ref not in seen:
                raise ConfigError(f"stage '{s.name}' uses '{ref}', which comes later: stages run in the order "
                                  "given, so a stage can use only earlier ones (a cycle cannot run)")
        _check_fields(s, seen)
        seen[s.name] = s


def _check_keys(s: Stage) -> None:
    """Every `set` key is a config key (values are checked by the trainer, against the model it starts from)."""
    from cherry_megatron.config import check_keys

    try:
        check_keys([f"{key}={json.dumps(value)}" for key, value in s.set.items()])
    except ConfigError as e:
        raise ConfigError(f"stage '{s.name}': {e}") from None


def _check_fields(s: Stage, earlier: dict[str, Stage]) -> None:
    if s.kind == "train":
        _check_keys(s)
        if not s.config and not s.init:
            raise ConfigError(f"stage '{s.name}' (train) needs `config` (a preset or YAML file) or `init` (@stage)")
        if s.init and not s.init.startswith("@"):
            raise ConfigError(f"stage '{s.name}': init names an earlier stage as @name, got '{s.init}'")
        if s.init and s.init[1:] in earlier and earlier[s.init[1:]].kind in ("evaluate",):
            raise ConfigError(f"stage '{s.name}' starts from '{s.init[1:]}', an evaluate stage that holds no model")
        if s.inputs:
            raise ConfigError(f"stage '{s.name}' (train) takes no `from`: name the model it starts from as init: @stage")
        if s.nproc < 1:
            raise ConfigError(f"stage '{s.name}': nproc must be >= 1")
        return
    if s.set:
        raise ConfigError(f"stage '{s.name}' ({s.kind}) takes `args`, not `set` (set is a train stage's config)")
    if s.kind in ONE_INPUT and len(s.inputs) != 1:
        raise ConfigError(f"stage '{s.name}' ({s.kind}) needs `from` naming one earlier stage")
    if s.kind in ("fuse", "evaluate") and not s.inputs:
        raise ConfigError(f"stage '{s.name}' ({s.kind}) needs `from` naming the stages it reads")
    required = {"compress": ["target-layers"], "convert": ["output-format"], "evaluate": ["data"]}.get(s.kind, [])
    for key in required:
        if key not in s.args:
            raise ConfigError(f"stage '{s.name}' ({s.kind}) needs args: {{{key}: ...}}")
    for name in s.references():
        if name not in s.inputs:
            continue
        if earlier[name].kind == "evaluate" or (s.kind in ("compress", "prune") and earlier[name].kind == "convert"):
            raise ConfigError(f"stage '{s.name}' ({s.kind}) reads '{name}', a {earlier[name].kind} stage that holds "
                              "no model it can read")


def diff(old: dict, new: dict) -> str:
    """The settings that differ, as `key: old -> new` (`set` and `args` entries one by one)."""
    def flat(d):
        return {f"{k}.{kk}" if isinstance(v, dict) else k: vv for k, v in d.items()
                for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])}
    old, new = flat(old), flat(new)
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        if old.get(k) != new.get(k):
            out.append(f"{k}: {json.dumps(old.get(k), sort_keys=True)} -> {json.dumps(new.get(k), sort_keys=True)}")
    return "; ".join(out)
