"""Language blends (cherry_megatron/data/blend.py, tools/build_blend.py): UniMax, temperature and natural
weights against hand-computed examples, the realised shares of megatron's blended sampler, the trainer's
per-language logging and the per-language evaluate."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import ROOT, SHORT_RUN, error_lines, run_cli, train

from cherry_megatron.data.blend import allocate, read_blend, temperature_weights, unimax

DATA = ROOT / "data" / "tokens"
PREFIXES = {"ko": DATA / "train_ko_text_document", "en": DATA / "train_en_text_document",
            "small": DATA / "heldout_text_document"}


def test_unimax_matches_a_worked_example():
    # By hand, budget 4000, N = 4, sizes a 100 < b 300 < c 1000 < d 5000: a gets min(4000/4, 400) = 400 (capped);
    # b min(3600/3, 1200) = 1200 (exactly its cap); c and d min(2400/2, ...) = 1200 each.
    counts = {"d": 5000, "a": 100, "c": 1000, "b": 300}
    assert unimax(counts, 4000, 4) == pytest.approx({"a": 400, "b": 1200, "c": 1200, "d": 1200})
    # N = 1: a 100, b 300 (capped), c min(3600/2, 1000) = 1000 (capped), d the remaining 2600.
    blend = allocate(counts, "unimax", 4000, 1)
    assert blend.tokens == pytest.approx({"a": 100, "b": 300, "c": 1000, "d": 2600})
    assert blend.weights == pytest.approx({"a": 0.025, "b": 0.075, "c": 0.25, "d": 0.65})
    assert blend.epochs == pytest.approx({"a": 1, "b": 1, "c": 1, "d": 0.52})


@pytest.mark.parametrize("budget,cap", [(4000, 4), (4000, 1), (6400, 1), (10_000, 2.5), (2000, 100)])
def test_unimax_properties(budget, cap):
    counts = {"a": 100, "b": 300, "c": 1000, "d": 5000, "e": 17}
    blend = allocate(counts, "unimax", budget, cap)
    assert sum(blend.weights.values()) == pytest.approx(1)
    assert sum(blend.tokens.values()) == pytest.approx(budget)
    assert max(blend.epochs.values()) <= cap + 1e-12
    capped = [lang for lang in counts if blend.epochs[lang] >= cap - 1e-12]
    free = [lang for lang in counts if lang not in capped]
    if free:
        assert max(blend.tokens[f] for f in free) == pytest.approx(min(blend.tokens[f] for f in free))
        assert all(blend.tokens[f] >= blend.tokens[c] - 1e-9 for f in free for c in capped)


def test_temperature_one_is_natural_and_a_large_one_tends_to_uniform():
    counts = {"a": 100, "b": 300, "c": 1000, "d": 5000}
    natural = allocate(counts, "natural").weights
    assert natural == pytest.approx({k: v / 6400 for k, v in counts.items()})
    assert allocate(counts, "temperature", temperature=1.0).weights == pytest.approx(natural)
    # mT5's T = 3.33 by hand: p ~ n^0.3003
    expect = {k: v ** (1 / 3.33) for k, v in counts.items()}
    assert temperature_weights(counts, 3.33) == pytest.approx({k: v / sum(expect.values()) for k, v in expect.items()})
    assert temperature_weights(counts, 1e6) == pytest.approx({k: 0.25 for k in counts}, abs=1e-5)
    assert temperature_weights({"a": 10**12, "b": 1}, 0.01) == pytest.approx({"a": 1, "b": 0})  # no overflow


def _cli(args, tmp_path):
    return run_cli(["tools/build_blend.py", *args], timeout=120)


def test_build_blend_writes_the_table_json_and_a_blend_file(tmp_path):
    out = tmp_path / "blend.yaml"
    proc = _cli(["--inputs", *(f"{k}={v}" for k, v in PREFIXES.items()), "--method", "unimax",
                 "--max-epochs", "2", "--output", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"weights", "tokens", "epochs"} and sum(result["weights"].values()) == pytest.approx(1)
    assert "allocated" in proc.stderr and "epochs" in proc.stderr
    blend = read_blend(str(out))
    assert {k: w for k, (w, _) in blend.items()} == pytest.approx(result["weights"])
    assert {k: p for k, (_, p) in blend.items()} == {k: str(v) for k, v in PREFIXES.items()}
    counts = _cli(["--counts", "a=100", "b=300", "c=1000", "d=5000", "--method", "unimax", "--budget", "4000",
                   "--max-epochs", "4"], tmp_path)
    assert json.loads(counts.stdout.strip().splitlines()[-1])["tokens"] == {"a": 400, "b": 1200, "c": 1200, "d": 1200}


@pytest.mark.parametrize("args,message", [
    (["--counts", "a=100", "b=300", "--method", "unimax", "--budget", "801", "--max-epochs", "2"], "cannot be filled"),
    (["--counts", "a=100", "--method", "zipf"], "unknown blend method"),
    (["--inputs", "a=/nonexistent/prefix", "--method", "natural", "--output", "OUT"], "missing data file"),
    (["--inputs", f"a={PREFIXES['ko']}", "--method", "unimax", "--budget", "1e9", "--output", "OUT"],
     "cannot be filled"),
    (["--counts", "a=0", "b=3", "--method", "natural"], "positive, finite count"),
    (["--counts", "a=5", "--method", "natural", "--output", "OUT"], "--output needs --inputs"),
    (["--counts", "a5", "--method", "natural"], "is not LANG=TOKENS"),
    (["--counts", "a=inf", "--method", "natural"], "--counts"),
    (["--counts", "a=5", "--method", "unimax", "--budget", "nan"], "finite"),
])
def test_bad_blends_are_one_error_and_write_nothing(tmp_path, args, message):
    proc = _cli([str(tmp_path / "b.yaml") if a == "OUT" else a for a in args], tmp_path)
    assert proc.returncode != 0 and len(error_lines(proc)) == 1 and message in error_lines(proc)[0], proc.stderr
    assert not list(tmp_path.iterdir())


N_SAMPLES, SEQ = 100_000, 16  # the long sample: 1.6M tokens, the budget of the blend below


@pytest.fixture(scope="module")
def blend_file(tmp_path_factory):
    """A UniMax blend of the shipped corpus's Korean, English+code and (as a small language) held-out files for
    a budget of N_SAMPLES x SEQ tokens, with the small one capped at 2 epochs."""
    from cherry_megatron.data.blend import token_count, write_blend

    counts = {k: token_count(str(v)) for k, v in PREFIXES.items()}
    path = tmp_path_factory.mktemp("blend") / "blend.yaml"
    blend = allocate(counts, "unimax", budget=N_SAMPLES * SEQ, max_epochs=2)
    assert blend.epochs["small"] == pytest.approx(2) and blend.epochs["ko"] < 2
    write_blend(path, blend, PREFIXES, {"method": "unimax", "budget": N_SAMPLES * SEQ, "max_epochs": 2})
    return path, counts, blend


def test_the_realised_shares_of_a_long_sample_match_the_weights_within_the_caps(blend_file, tmp_path, world_of_one):
    from cherry_megatron.config import load_config
    from cherry_megatron.data.blend import resolve
    from cherry_megatron.data.gpt_data import TrainData
    from cherry_megatron.data.tokenizer import load_tokenizer

    path, counts, blend = blend_file
    n_samples, seq = N_SAMPLES, SEQ
    cfg = load_config("tiny", ["train.seq_length=16", "train.global_batch_size=1000", "train.micro_batch_size=1000",
                               "train.steps=100", f"data.blend_file={path}"])
    cfg.data.paths = []
    resolve(cfg.data)
    data = TrainData(cfg, load_tokenizer(cfg.data.tokenizer_model), 0, 1, str(tmp_path / "cache"))
    shares = data.shares.at(n_samples)
    assert list(shares["lang_tokens"]) == list(PREFIXES)
    total = sum(shares["lang_tokens"].values())
    assert total == n_samples * seq
    for lang, w in blend.weights.items():
        share = shares["lang_tokens"][lang] / total
        assert abs(share - w) <= 4 * math.sqrt(w * (1 - w) / n_samples), (lang, share, w)
        assert shares["lang_epochs"][lang] == pytest.approx(shares["lang_tokens"][lang] / counts[lang], rel=0.01)
    # The whole budget drawn: the capped language has been read twice, to within one sample, and not more.
    assert shares["lang_epochs"]["small"] == pytest.approx(2, abs=2 * seq / counts["small"])
    assert shares["lang_epochs"]["small"] <= 2 + 2 * seq / counts["small"]
    assert all(shares["lang_epochs"][k] < 2 for k in ("ko", "en"))
    # The dataset ids megatron's BlendedDataset reports per sample are what the count is made of.
    ids = np.array([data.dataset[i]["dataset_id"] for i in range(0, 2000)])
    assert np.array_equal(ids, data.dataset.dataset_index[:2000])


@pytest.fixture(scope="module")
def blend_run(blend_file, tmp_path_factory):
    """The SHORT_RUN trained on the blend (read only)."""
    run = tmp_path_factory.mktemp("blend_run") / "run"
    train(run, ["data.paths=[]", f"data.blend_file={blend_file[0]}"])
    return run


def test_the_trainer_logs_the_shares_it_draws(blend_file, blend_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, counts, blend = blend_file
    run = blend_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "lang_tokens" in r]
    steps = int(next(s.split("=")[1] for s in SHORT_RUN if s.startswith("train.steps")))
    gbs = int(next(s.split("=")[1] for s in SHORT_RUN if s.startswith("train.global_batch_size")))
    seq = int(next(s.split("=")[1] for s in SHORT_RUN if s.startswith("train.seq_length")))
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    for r in logged:
        assert sum(r["lang_tokens"].values()) == r["consumed_tokens"] == r["step"] * gbs * seq
        assert r["lang_epochs"] == pytest.approx({k: r["lang_tokens"][k] / counts[k] for k in counts}, rel=1e-3)
    # megatron's blending is deterministic (largest deficit first): after 24 samples each language is within one
    # sample of its weight's share.
    last = logged[-1]["lang_tokens"]
    for lang, w in blend.weights.items():
        assert abs(last[lang] / (seq) - w * steps * gbs) <= 1.0 + 1e-9, (lang, last, w)
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {f"train/lang_tokens/{k}" for k in counts} <= set(events.Tags()["scalars"])
    config = (run / "config.yaml").read_text()
    assert "blend_file" in config and str(PREFIXES["small"]) in config


def test_a_blend_run_resumes_with_its_counts(blend_file, blend_run, tmp_path):
    path, _, _ = blend_file
    whole, part = blend_run, tmp_path / "part"
    train(part, ["data.paths=[]", f"data.blend_file={path}", "train.exit_at_step=3"])
    proc = run_cli(["-m", "cherry_megatron.train", "--config", str(part / "config.yaml"), "--run-dir", str(part),
                    "--set", "train.exit_at_step=0"])
    assert proc.returncode == 0, proc.stderr

    def rows(run):
        return {r["step"]: (r["lang_tokens"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").open())
                if "lang_tokens" in r}
    a, b = rows(whole), rows(part)
    assert a.keys() == b.keys() and all(a[k][0] == b[k][0] and a[k][1] == pytest.approx(b[k][1], rel=1e-6) for k in a)


@pytest.mark.parametrize("sets,message", [
    ([], "disagree"),  # the tiny config's own data.paths
    (["data.paths=[]", "train.steps=30000"], "past its blend's cap"),
])
def test_bad_blend_runs_are_one_error(blend_file, tmp_path, sets, message):
    path, _, _ = blend_file
    proc = train(tmp_path / "run", [f"data.blend_file={path}", *sets], check=False)
    assert proc.returncode != 0 and message in error_lines(proc)[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_language_names_stay_apart():
    from types import SimpleNamespace

    from cherry_megatron.data.blend import language_names

    data = SimpleNamespace(blend_file="", paths=["0.5", "a/train_ko_text_document", "0.3", "b/train_ko_text_document",
                                                 "0.2", "train_en_text_document"])
    assert language_names(data) == ["train_ko.0", "train_ko.1", "train_en"]


def test_per_language_evaluate_equals_each_file_alone(baseline):
    def line(data):
        proc = run_cli(["-m", "cherry_megatron.evaluate", "--load", str(baseline), "--data", *data,
                        "--max-tokens", "512"], timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    both = line([f"ko={PREFIXES['ko']}", f"en={PREFIXES['en']}"])
    alone = {k: line([str(PREFIXES[k])]) for k in ("ko", "en")}
    assert set(both["languages"]) == {"ko", "en"}
    for k in ("ko", "en"):
        assert both["languages"][k] == {"loss": alone[k]["loss"], "tokens": alone[k]["tokens"]}
        assert alone[k]["tokens"] == 512
    assert both["loss"] == pytest.approx((alone["ko"]["loss"] + alone["en"]["loss"]) / 2) and both["tokens"] == 1024
