"""python -m cherry_megatron.recipe run --recipe RECIPE.yaml --run-dir DIR [--set [STAGE:]KEY=VALUE ...]
        [--until STAGE] [--rerun STAGE]
        [--slurm --nodes N --gpus-per-node G [--tasks-per-node T] [--cpus-per-task C] [--partition P]
         [--time T] [--account A] [--launcher srun|torchrun]]
python -m cherry_megatron.recipe status --recipe RECIPE.yaml --run-dir DIR

Both end with one JSON line, {"stages": {name: {kind, status, params, active_params, tokens, wall_s,
eval_loss}}}, also written to DIR/report.json beside DIR/report.md and DIR/report.png. The recipe is copied
to DIR/recipe.yaml at the first run. With --slurm, `run` submits the stages that have to run as a chain of
jobs (recipe.chain) and returns; its JSON line adds {"jobs": {stage: job id}}; `status` follows the chain.
(`stage` is what one job of a chain runs.)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path

from cherry_megatron.errors import cli_errors


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="[STAGE:]KEY=VALUE")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or submit) every stage that is not finished")
    _arguments(run)
    run.add_argument("--until", default="")
    run.add_argument("--rerun", default="")
    g = run.add_argument_group("SLURM (--slurm): the shape each training stage's job may take")
    g.add_argument("--slurm", action="store_true", help="submit the stages as a chain of SLURM jobs")
    g.add_argument("--nodes", type=int, default=1, help="the most nodes one stage's job takes")
    g.add_argument("--gpus-per-node", type=int, default=0, help="0 on CPU-only nodes (gloo)")
    g.add_argument("--cpus-per-task", type=int, default=8)
    g.add_argument("--partition", default="")
    g.add_argument("--time", default="", help="SLURM time limit of each job, e.g. 1-00:00:00")
    g.add_argument("--account", default="")
    g.add_argument("--launcher", choices=("srun", "torchrun"), default="srun")
    g.add_argument("--python", default=sys.executable, help="the interpreter on the compute nodes")
    _arguments(sub.add_parser("status", help="the stage table of a run dir"))
    stage = sub.add_parser("stage", help="run one stage (what a job of a --slurm chain runs)")
    _arguments(stage)
    stage.add_argument("--stage", required=True)
    stage.add_argument("--launcher", choices=("srun", "torchrun", "local"), default="local")
    stage.add_argument("--tasks-per-node", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli_errors():
        from cherry_megatron.recipe import runner
        from cherry_megatron.recipe.spec import load_recipe

        overrides = [x for group in args.overrides for x in group]
        stages = load_recipe(args.recipe, overrides)
        with contextlib.redirect_stdout(sys.stderr):  # stdout: the one JSON line
            if args.command == "stage":
                launch = None if args.launcher == "local" else (args.launcher, args.tasks_per_node)
                runner.run_one(stages, args.run_dir, args.stage, launch)
                result = runner.status(stages, args.run_dir)
            elif args.command == "run":
                steps = runner.plan(stages, args.run_dir, args.until, args.rerun)  # every refusal first
                args.run_dir.mkdir(parents=True, exist_ok=True)
                if not (args.run_dir / "recipe.yaml").exists():
                    shutil.copyfile(args.recipe, args.run_dir / "recipe.yaml")
                if args.slurm:
                    from cherry_megatron.recipe import chain

                    name = Path(args.recipe).stem
                    jobs = chain.submit(name, steps, args.run_dir, Path(args.recipe), overrides, args)
                    result = {**runner.status(stages, args.run_dir), "jobs": jobs}
                else:
                    result = runner.run(stages, args.run_dir, args.until, args.rerun)
            else:
                result = runner.status(stages, args.run_dir)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
