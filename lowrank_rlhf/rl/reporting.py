"""Where step metrics go: RUN/metrics.jsonl always (one JSON line per step, TRL's metric names), plus an
accelerate tracker (tensorboard or wandb) when the recipe asks for one."""

from __future__ import annotations

import json
from pathlib import Path

ALLOWED = "none, tensorboard, wandb"


def make_tracker(kind: str, run_dir: Path, config: dict):
    """An accelerate tracker, started, with the recipe stored as its configuration; a clear error when the
    package behind it is missing."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    package = {"tensorboard": "tensorboard", "wandb": "wandb"}[kind]
    try:
        __import__("torch.utils.tensorboard" if kind == "tensorboard" else "wandb")
    except ImportError:
        raise RuntimeError(f"ppo.report_to: {kind} needs `pip install {package}`; allowed: {ALLOWED}") from None
    tracker = (TensorBoardTracker("tensorboard", str(run_dir)) if kind == "tensorboard"
               else WandBTracker(run_dir.name, dir=str(run_dir)))
    tracker.start()
    if kind == "wandb":  # tensorboard's hparams want scalars only; the recipe is in RUN/recipe.yaml anyway
        tracker.store_init_configuration(config)
    return tracker


class MetricsLog:
    def __init__(self, run_dir: Path, report_to: str, config: dict):
        self.path = run_dir / "metrics.jsonl"
        self.report_to, self.config = report_to, config
        self.tracker = None

    def write(self, metrics: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if self.report_to == "none":
            return
        if self.tracker is None:
            self.tracker = make_tracker(self.report_to, self.path.parent, self.config)
        self.tracker.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"},
                         step=metrics["step"])
