"""Human preferences, the "H" of RLHF: a page (/feedback) that shows a prompt's answers from two adapters, blind and in
random order, and records which one a person prefers as a TRL preference pair in RUN/feedback/preferences.jsonl.

    lowrank-rlhf serve RUN                      # then open http://127.0.0.1:8000/feedback
    lowrank-rlhf train RECIPE --stage reward data.preferences=RUN/feedback/preferences.jsonl

Each judgement is one JSON line (prompt, chosen, rejected as conversations, kind "human", which adapter wrote each
answer, the sampling settings, the time), appended under a lock with one write and fsynced before the page hears
"saved": two browsers at once interleave whole lines, and a crash loses at most the line being written, whose torn
tail is cut off when the server starts again. "Tie / both bad" without a better answer is kept in ties.jsonl
(a record, not a training pair); a better answer typed in becomes the chosen one against the others.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import threading
import time
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from .. import data
from ..run.directory import claim
from .engine import Engine, RequestError

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("feedback.html")
PREFERENCES = "preferences.jsonl"
TIES = "ties.jsonl"


class JsonLines:
    """Whole lines appended atomically: a lock, one os.write of the line, fsync."""

    def __init__(self, path: Path):
        self.path, self.lock = path, threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_torn_tail()

    def _cut_torn_tail(self) -> None:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        blob = self.path.read_bytes()
        if blob.endswith(b"\n"):
            return
        keep = blob.rfind(b"\n") + 1
        log.warning("%s ended in a line cut short (a crash while it was written): dropping its %d bytes",
                    self.path, len(blob) - keep)
        with open(self.path, "r+b") as fh:
            fh.truncate(keep)
            os.fsync(fh.fileno())

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with self.lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)


class PairRequest(BaseModel):
    prompt: str = Field(min_length=1)


class Judgement(BaseModel):
    pair_id: str
    choice: str = Field(pattern="^(a|b|tie)$")
    better_answer: str | None = None


def feedback_router(engine: Engine, models: tuple[str, str] = ("sft", "policy"), max_tokens: int = 64,
                    temperature: float = 0.7) -> APIRouter:
    for model in models:
        if model not in engine.models:
            raise RequestError(f"--compare: {model!r} is not a model of this run; available: "
                               f"{', '.join(engine.models)}")
    folder = engine.run_dir / "feedback"
    claim(engine.run_dir, [folder.name])  # the run's own: later stages and --overwrite leave it be or replace it
    preferences, ties = JsonLines(folder / PREFERENCES), JsonLines(folder / TIES)
    pending: dict[str, dict] = {}  # pair id -> what the page was shown (answers in page order, their models)
    prompts = _prompt_table(engine)
    router = APIRouter()

    @router.get("/feedback", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text()

    @router.get("/feedback/prompt")
    async def draw_prompt():
        if not prompts:
            raise RequestError("this run's recipe names no data.prompts table to draw from; type a prompt", 404)
        return {"prompt": random.choice(prompts)}

    @router.post("/feedback/pair")
    def make_pair(body: PairRequest):
        ids = engine.chat_ids([{"role": "user", "content": body.prompt}])
        budget = engine.check(models[0], ids, min(max_tokens, engine.max_tokens_limit))
        seed = secrets.randbelow(2**31)
        answers = [engine.generate(m, ids, budget, temperature=temperature, seed=seed).text for m in models]
        order = [0, 1] if secrets.randbelow(2) == 0 else [1, 0]
        pair_id = secrets.token_hex(8)
        pending[pair_id] = {"prompt": body.prompt, "answers": [answers[i] for i in order],
                            "models": [models[i] for i in order], "seed": seed}
        return {"pair_id": pair_id, "answers": pending[pair_id]["answers"]}

    @router.post("/feedback/judge")
    def judge(body: Judgement):
        shown = pending.pop(body.pair_id, None)
        if shown is None:
            raise RequestError("pair_id: unknown or already judged; ask for a new pair", 404, "pair_id")
        common = {"prompt": [{"role": "user", "content": shown["prompt"]}], "kind": "human",
                  "sampling": {"temperature": temperature, "max_tokens": max_tokens, "seed": shown["seed"]},
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        better = (body.better_answer or "").strip()
        rows = []
        if body.choice in ("a", "b"):
            won, lost = (0, 1) if body.choice == "a" else (1, 0)
            chosen = better or shown["answers"][won]
            rows.append((chosen, "human-edit" if better else shown["models"][won], lost))
        elif better:
            rows += [(better, "human-edit", i) for i in (0, 1)]
        for chosen, chosen_model, lost in rows:
            preferences.append({**common, "chosen": [{"role": "assistant", "content": chosen}],
                                "rejected": [{"role": "assistant", "content": shown["answers"][lost]}],
                                "chosen_model": chosen_model, "rejected_model": shown["models"][lost]})
        if not rows:
            ties.append({**common, "answers": shown["answers"], "models": shown["models"]})
        return {"saved": len(rows), "file": str(folder / (PREFERENCES if rows else TIES))}

    return router


def _prompt_table(engine: Engine) -> list[str]:
    """The user questions of the recipe's data.prompts, as text (empty when it has none or they cannot be read)."""
    try:
        table = data.load_prompts(engine.cfg.data.prompts, name="data.prompts") if engine.cfg.data.prompts else []
    except data.DataError:
        return []
    texts = []
    for prompt in (table["prompt"] if len(table) else []):
        if isinstance(prompt, str):
            texts.append(prompt)
        elif prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "user":
            texts.append(prompt[-1]["content"])
    return texts
