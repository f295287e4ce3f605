"""Pipeline parallelism on real gloo groups: TP x PP and PP x DP against the unpipelined run, resume,
activation checkpointing, and what a pipeline refuses."""
import pytest

from cherry_megatron.config import ConfigError, load_config, validate
from cherry_megatron.metrics import read_metrics
from conftest import train

pytestmark = pytest.mark.slow
SETS = ["model.num_layers=4"]  # 2 blocks per stage at PP=2


def curve(run_dir, key):
    return {r["step"]: r[key] for r in read_metrics(run_dir) if r.get(key) is not None}


def assert_same(a, b, rtol):
    assert a.keys() == b.keys() and len(a) >= 3
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=rtol), step


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tp1pp1"
    train(run_dir, SETS)
    return run_dir


@pytest.fixture(scope="module")
def tp2pp2(reference, tmp_path_factory):
    """TP=2 x PP=2, stopped after step 3 (checkpoint) and resumed at the same layout."""
    run_dir = tmp_path_factory.mktemp("runs") / "tp2pp2"
    sets = SETS + ["parallel.tp=2", "parallel.pp=2"]
    train(run_dir, sets + ["train.exit_at_step=3"], nproc=4)
    proc = train(run_dir, sets, nproc=4)
    assert "start_step=3" in proc.stdout
    return run_dir


def test_tp2_pp2_matches_tp1_pp1_across_a_resume(reference, tp2pp2):
    """The curve of steps 1-3 and, from the TP2xPP2 checkpoint, 4-6 is the unpipelined one."""
    for key in ("loss", "eval_loss", "grad_norm"):
        assert_same(curve(tp2pp2, key), curve(reference, key), rtol=1e-4)


def test_recurrent_tp2_pp2_matches_tp1_pp1(corpus, tmp_path):
    """2 shared blocks over 4 positions (LoRA, iteration embeddings and norms) split over 2 stages with the
    interleaved schedule [0,1,0,1]: both blocks run on both stages, so each block is tied across them.
    (The consecutive schedule [0,0,1,1], one block per stage, passed too; left out to keep CI short.)"""
    for schedule in ("[0,1,0,1]",):
        sets = ["model.num_layers=4", "recurrent.num_blocks=2", "recurrent.lora_rank=4", "recurrent.exit_depths=[]",
                f"recurrent.schedule={schedule}", "train.steps=4", "train.eval_interval=2"]
        train(tmp_path / f"ref{schedule}", sets, config="recurrent-tiny")
        train(tmp_path / f"tp2pp2{schedule}", sets + ["parallel.tp=2", "parallel.pp=2"], config="recurrent-tiny", nproc=4)
        for key in ("loss", "eval_loss"):
            assert_same(curve(tmp_path / f"tp2pp2{schedule}", key), curve(tmp_path / f"ref{schedule}", key), rtol=1e-4)


def test_pp2_dp2_zero1_with_activation_checkpointing_matches(reference, tmp_path):
    """PP=2 x DP=2 under ZeRO-1, every layer checkpointed: the unpipelined curve (either feature wrong would
    show; each was also checked alone)."""
    train(tmp_path / "pp2dp2", SETS + ["parallel.pp=2", "parallel.zero_stage=1", "train.activation_checkpointing=1"],
          nproc=4)
    for key in ("loss", "eval_loss", "grad_norm"):
        assert_same(curve(tmp_path / "pp2dp2", key), curve(reference, key), rtol=1e-4)


def test_tied_embeddings_stay_identical_on_first_and_last_stage(corpus, tmp_path):
    sets = SETS + ["model.tie_embeddings=true"]
    train(tmp_path / "pp1", sets)
    train(tmp_path / "pp2", sets + ["parallel.pp=2"], nproc=2)
    assert_same(curve(tmp_path / "pp2", "loss"), curve(tmp_path / "pp1", "loss"), rtol=1e-4)
    from conftest import run_cli

    proc = run_cli(["-m", "tests.check_tied"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("tied embedding identical on both stages") == 2


@pytest.mark.parametrize("sets, message", [
    (["recurrent.num_blocks=2", "recurrent.exit_depths=[2]", "recurrent.exit_loss_weights=[0.1]"],
     "does not support recurrent.exit_loss_weights yet"),
    (["sgt.ratio=0.15"], "does not support sgt.ratio < 1 yet"),
    (["moee.mtp_depth=1", "train.precision=fp16"], "with router or MTP losses needs train.precision fp32 or bf16"),
    (["parallel.pipeline_partition=bytes"], "must be layers or parameters, got 'bytes'"),
    (["model.num_layers=1"], "more stages than model.num_layers=1"),
])
def test_pipeline_refuses_what_it_cannot_run_yet(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", ["parallel.pp=2", *sets])


def test_expert_parallelism_must_divide_each_stages_data_parallel_size():
    cfg = load_config("tiny", ["parallel.pp=2", "moee.num_experts=4", "moee.ep_size=4"])
    with pytest.raises(ConfigError, match="moee.ep_size=4 does not divide the data-parallel size 2 of each pipeline"):
        validate(cfg, 4)
    validate(load_config("tiny", ["parallel.pp=2", "moee.num_experts=4", "moee.ep_size=2"]), 4)


MOEE = ["model.num_layers=4", "recurrent.num_blocks=2", "recurrent.lora_rank=4", "recurrent.exit_depths=[]",
        "recurrent.schedule=[0,1,0,1]", "moee.num_experts=2", "moee.mtp_depth=1", "train.steps=4",
        "train.eval_interval=2"]


def test_moee_with_mtp_in_a_pipeline_matches_the_unpipelined_model(corpus, tmp_path):
    """A routed recurrent model (each block's MLP 2 experts, both blocks on both stages, so experts tied
    across stages) with an MTP head: its router and MTP losses join the gradient on the stage they arise
    on. TP=2 x PP=2 gives the unpipelined curves: loss, eval loss, grad norm and each auxiliary loss.
    (PP=2 x DP=2 with the experts split over the DP ranks, ep_size=2, stopped at step 3 and resumed, gave
    them too: checked by hand with the trainer, left out of CI for time.)"""
    train(tmp_path / "ref", MOEE, config="recurrent-tiny")
    train(tmp_path / "tp2pp2", MOEE + ["parallel.tp=2", "parallel.pp=2"], config="recurrent-tiny", nproc=4)
    for key in ("loss", "eval_loss", "grad_norm", "load_balance_loss", "router_z_loss", "mtp_loss"):
        assert_same(curve(tmp_path / "tp2pp2", key), curve(tmp_path / "ref", key), rtol=1e-4)


def test_plan_counts_each_ranks_parameters_as_the_real_sharded_model():
    import json

    from conftest import run_cli

    layouts = ["2x2", "1x4", "1x4p", "1x4pt", "2x1"]
    proc = run_cli(["-m", "tests.check_plan_counts", *layouts], nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import re

    rows = [json.loads(m) for m in re.findall(r"\{\"layout\"[^{}]*\}", proc.stdout)]
    assert len(rows) == 4 * len(layouts)
    for r in rows:
        assert r["held"] == r["planned"], r
    blocks = {(r["layout"], r["stage"]): r["blocks"] for r in rows}
    # 5 blocks over 4 stages: by count the embedding stage takes 2; by parameters the embedding weighs as one
    assert [blocks["1x4", k] for k in range(4)] == [2, 1, 1, 1]
    assert [blocks["1x4p", k] for k in range(4)] == [1, 2, 1, 1]


def test_plan_cli_recommends_a_fitting_layout(capsys):
    import json

    from cherry_megatron.cli.plan import main
    from conftest import run_cli

    args = ["tools/plan.py", "--config", "dense-1b-48l", "--nodes", "2", "--gpus-per-node", "8"]
    proc = run_cli(args + ["--json"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)  # the whole of stdout: one document
    rows = plan["layouts"]
    assert rows and all(r["tp"] * r["pp"] * r["dp"] == 16 for r in rows)
    assert {r["tp"] for r in rows} == {1, 2}  # 20 heads / 10 KV heads: TP 4 and 8 do not divide them
    assert not any(r["pp"] > 1 and r["zero"] > 1 for r in rows)  # no ZeRO-2/3 with a pipeline
    best = plan["recommended"]
    assert best in rows and best["fits"] and best["step_s"] == min(r["step_s"] for r in rows if r["fits"])
    main(args[1:])  # the table (in-process: one real process is enough for the CLI) recommends the same
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"recommended: parallel.tp={best['tp']} parallel.pp={best['pp']} "
                           f"parallel.zero_stage={best['zero']} (dp={best['dp']})")


def test_plan_says_when_no_layout_fits(capsys):
    import json

    from cherry_megatron.cli.plan import main

    args = ["--config", "dense-1b-48l", "--nodes", "1", "--gpus-per-node", "1", "--gpu-memory-gib", "8"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and "error: no layout fits in memory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(args + ["--json"])
    out = capsys.readouterr()
    assert exit_.value.code == 2 and "error: no layout fits in memory" in out.err
    plan = json.loads(out.out)
    assert plan["recommended"] is None and plan["layouts"] and not any(r["fits"] for r in plan["layouts"])
