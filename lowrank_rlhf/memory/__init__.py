"""Memory: what a PPO step needs and how it fits the card.

    sizes.py     "24GiB" <-> bytes
    estimate.py  pure per-phase peak estimates from a shape
    plan.py      the largest micro-batch per phase under a budget, for a recipe
    levers.py    the memory levers: what each saves in a plan, and which would make a plan fit
    floor_table.py  docs/memory.md's table of floors with and without the levers

Model shapes (models/shapes.py) and the run-time micro-batch runner that halves a phase's micro-batch on OOM
(models/runner.py) live with the models; the planner reads them.
"""

# The phases of a PPO step, in order: every plan, runner, timer and report is keyed by them.
PHASES = ("generate", "score", "train")
