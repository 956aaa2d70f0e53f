"""The commands that use a run (cli.py wires them): quickstart, eval, compare, generate, export.

    quickstart.py    the clickbait demo end to end on the embedded SmolLM2-135M
    evaluation.py    `eval`: greedy held-out scores of base, SFT, the final policy and RUN/best
    compare.py       `compare`: RL vs SFT over seeds, with paired_stats.py's intervals and tests
    paired_stats.py  paired bootstrap intervals, McNemar and sign tests
    inference.py     `generate`: load a run's roles and answer prompts
    export.py        `export`: the policy adapter, or merged into a standalone model
"""
