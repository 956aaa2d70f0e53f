"""`lowrank-rlhf verify RUN`: is every adapter, head and checkpoint in a run directory sound?

Every adapter directory the project writes (RUN/sft, reward, policy, value, best/policy) carries a manifest of its
files' sizes and SHA-256 (run/checkpoint.py), as do the RL checkpoint and the stages' checkpoints; `generate`,
`eval`, `export`, resume and later stages check the same before they load or copy. This command checks them all
and says, per directory, sound / DAMAGED (which file) / unsealed (written before manifests existed: its files
open, and `--seal` records their checksums).
"""

from __future__ import annotations

from pathlib import Path

from ..run.checkpoint import CheckpointError, seal, verify, verify_adapter
from ..run.metadata import read_run_metadata

ADAPTER_DIRS = ("sft", "reward", "policy", "value", "best/policy")


def checked_dirs(run_dir: Path) -> list[tuple[Path, str]]:
    """(directory, kind) for everything verifiable in the run: adapters, then checkpoints."""
    found = [(run_dir / name, "adapter") for name in ADAPTER_DIRS if (run_dir / name / "adapter_config.json").is_file()]
    if (run_dir / "checkpoint").is_dir():
        found.append((run_dir / "checkpoint", "checkpoint"))
    for folder in sorted(run_dir.glob("checkpoint-*")):
        found += [(path, "checkpoint") for path in sorted(folder.glob("checkpoint-*")) if path.is_dir()]
    return found


def verify_run(run_dir: Path, seal_unsealed: bool = False) -> list[tuple[Path, str, str]]:
    """(directory, status, detail) per directory; status is sound, DAMAGED, unsealed or sealed (by --seal)."""
    read_run_metadata(run_dir)  # one clear line if this is not a run directory
    report = []
    for path, kind in checked_dirs(run_dir):
        try:
            if kind == "checkpoint":
                verify(path)
                report.append((path, "sound", "every file matches the manifest"))
            elif verify_adapter(path):
                report.append((path, "sound", "every file matches the manifest"))
            elif seal_unsealed:
                seal(path)
                report.append((path, "sealed", "its files open; their checksums are now recorded"))
            else:
                report.append((path, "unsealed", "its files open, but it predates manifests; --seal records them"))
        except CheckpointError as err:
            report.append((path, "DAMAGED", str(err).split("; retrain")[0]))
    return report


def print_report(run_dir: Path, report: list[tuple[Path, str, str]]) -> int:
    """The table; exit status 0 when everything is sound (or sealed now), 1 otherwise."""
    if not report:
        print(f"{run_dir}: no adapters or checkpoints yet")
        return 0
    for path, status, detail in report:
        print(f"{status:9} {path.relative_to(run_dir)}: {detail}")
    bad = [status for _, status, _ in report if status in ("DAMAGED", "unsealed")]
    print(f"{run_dir}: " + ("sound" if not bad else f"{len(bad)} of {len(report)} not sound"))
    return 1 if bad else 0
