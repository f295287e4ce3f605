import pytest

from cherry_megatron.config import load_config, parse_override, validate
from cherry_megatron.errors import ConfigError


def test_presets_load():
    for name in ("tiny", "small", "dense-1b-48l"):
        cfg = load_config(name)
        assert cfg.name == name
    small = load_config("small")
    assert small.model.hidden_size == 512 and small.train.micro_batch_size == 8  # inherited from tiny


def test_every_preset_builds_with_its_documented_parameter_count(capsys):
    """Each configs/*.yaml, built on the meta device by `python -m cherry_megatron.model.count`, has as many
    parameters as the analytic count, and as README's Presets table documents (stored and, for MoEE, active)."""
    import json
    import re
    from pathlib import Path

    from cherry_megatron.config import PRESET_DIR
    from cherry_megatron.model.count import main as count

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("\n## Presets\n"):].split("\n\n")[1].splitlines()[2:]  # past heading and rule
    documented = {}
    for row in table:
        cells = [c.strip() for c in row.strip("|").split("|")]
        documented[cells[0]] = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", cells[-1])]
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert sorted(documented) == presets  # a new preset needs its row
    for name in presets:
        count([name])
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        total, *active = documented[name]
        assert got["counted"] == got["total"] == total, (name, got)
        assert got["active"] == (active[0] if active else total), (name, got)


def test_set_values_are_yaml():
    cfg = load_config("tiny", ["train.lr=3e-4", "data.paths=[0.3, a, 0.7, b]", "model.tie_embeddings=true"])
    assert cfg.train.lr == 3e-4
    assert cfg.data.paths == ["0.3", "a", "0.7", "b"]
    assert cfg.model.tie_embeddings is True
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


def test_yaml_with_base(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("base: tiny\nmodel:\n  num_layers: 2\ntrain:\n  steps: 7\n")
    cfg = load_config(str(f), ["train.steps=9"])
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == 256 and cfg.train.steps == 9


@pytest.mark.parametrize("override, message", [
    ("model.hiden_size=3", "unknown config key 'model.hiden_size'"),
    ("trian.steps=3", "unknown config key 'trian'"),
    ("train.steps=abc", "expects int"),
    ("parallel.tp=3", "does not divide the attention heads"),
    ("parallel.zero_stage=4", "zero_stage must be 0, 1, 2 or 3"),
    ("train.precision=fp8", "train.precision"),
])
def test_bad_config_is_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", [override])


def test_malformed_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(str(f))


def test_layout_checks_need_world_size():
    cfg = load_config("tiny", ["parallel.tp=2"])
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        validate(cfg, world_size=3)
    with pytest.raises(ConfigError, match="global_batch_size"):
        validate(load_config("tiny", ["train.global_batch_size=12"]), world_size=4)
    validate(cfg, world_size=4)


def test_pipeline_with_zero_2_or_3_is_refused_at_config_time():
    for stage in (2, 3):
        with pytest.raises(ConfigError, match="pipeline engine supports ZeRO stage 0 or 1 only"):
            load_config("tiny", ["parallel.pp=2", f"parallel.zero_stage={stage}"])
