"""The CHERRY recipe as one resumable command: a YAML list of named stages run in order into one directory.

    spec.py      the recipe file: stages, their kinds, inputs named by earlier stages, --set overrides, checks
    stages.py    what each kind runs (the project's own tools, as a user would) and what it reports
    runner.py    run in order, skip finished stages (marker written last), refuse changed ones, the report
    chain.py     --slurm: one SLURM job per stage, each afterok on the jobs of the stages it reads
    report.py    DIR/report.md and DIR/report.png
    __main__.py  `python -m cherry_megatron.recipe run | status | stage`
"""
