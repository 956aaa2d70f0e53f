"""A run directory and what keeps it sound: ownership of its files, the lock, atomic checkpoints, the resume guard,
stop signals, and the base-model metadata every stage writes.

    directory.py     which files a run owns (RUN/.lowrank_rlhf-owned) and refusing to overwrite others'
    lock.py          one process per run directory (a lock file with the holder's pid)
    checkpoint.py    atomic writes and checkpoint directories (write to a temporary name, fsync, rename)
    resume_guard.py  a resumed run must use the recipe (and data) it started with
    signals.py       SIGTERM/SIGINT -> a clean stop at the next safe point
    metadata.py      RUN/lowrank_rlhf.json: the base model, quantization and compute dtype the adapters belong to
"""
