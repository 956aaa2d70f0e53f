"""The bundled "clickbait test" of the quickstart: one hand-written source, clickbait_headlines.jsonl
({"headline", "label"} rows), from which `write_clickbait_files` derives the four committed tables (SFT,
preferences, PPO prompts, held-out prompts)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from .errors import DataError
from .tables import BUNDLED_DIR

CLICKBAIT_PROMPT = "Is this headline clickbait? Answer yes or no.\nHeadline: {headline}"
CLICKBAIT_SOURCE = "clickbait_headlines"  # {"headline", "label"} rows: the one hand-written source of the others
CLICKBAIT_FILES = ("clickbait_sft", "clickbait_preferences", "clickbait_prompts", "clickbait_heldout")
HELDOUT_EVERY = 5  # every 5th headline of each label is held out: 20 %, balanced
FORMAT_PAIR_EVERY = 2  # every 2nd training headline of each label also gets a format pair

# Rejected answers for the preference pairs that are not simply the wrong label: hedging, refusing to commit, or
# the right answer buried in extra words, so the reward model learns "exactly yes or no", not only "correct".
RAMBLING_ANSWERS = (
    "Well, it depends on how you look at it; some readers might think so, others might not.",
    "That's a tricky one. The headline could be read either way, so I'd rather not commit to an answer.",
    "Hmm, let me think. Clickbait usually means a headline that exaggerates or holds back information, and this "
    "one might or might not do that.",
    "It's hard to say without reading the full article first.",
    "Possibly? There are some signs of clickbait here, but I wouldn't want to jump to conclusions.",
    "Great question! Headlines are written to get attention, so in a sense every headline is a little bit "
    "clickbait.",
    "I can't really tell. Maybe yes, maybe no.",
    "Clickbait is a subjective term, and different editors would disagree about this headline.",
    "Sort of. It has a few features of clickbait but also reads like an ordinary news story.",
    "To answer that properly I would need to know which publication ran it and who its readers are.",
    "{Answer}, probably, although it's a judgement call and other readers may disagree.",
    "My answer would be {answer}, but let me explain my reasoning in a bit more detail first.",
)


def clickbait_prompt(headline: str) -> list[dict]:
    """The user turn of the clickbait test for one headline."""
    return [{"role": "user", "content": CLICKBAIT_PROMPT.format(headline=headline)}]


def _order_key(headline: str) -> str:
    return hashlib.sha1(headline.encode("utf-8")).hexdigest()


def build_clickbait_rows(headlines: Iterable[dict]) -> dict[str, list[dict]]:
    """From {"headline", "label"} rows to the four bundled tables, deterministically.

    Split: within each label, every HELDOUT_EVERY-th headline (in source order) is held out. Order: rows are sorted
    by the SHA-1 of the headline, which mixes the labels. Preferences: every training headline gets a "label" pair
    (the right label over the wrong one), so a reward model that ignores the headline cannot rank these pairs
    better than chance; every FORMAT_PAIR_EVERY-th headline of each label also gets a "format" pair (the right label
    over a rambling answer, RAMBLING_ANSWERS in turn). The `kind` column says which."""
    seen: set[str] = set()
    per_label = {"yes": 0, "no": 0}
    train, heldout = [], []
    for row in headlines:
        headline, label = row["headline"].strip(), row["label"]
        if label not in per_label:
            raise DataError(f"{CLICKBAIT_SOURCE}: label {label!r} of {headline!r}; allowed values: yes, no")
        if headline.lower() in seen:
            raise DataError(f"{CLICKBAIT_SOURCE}: duplicate headline {headline!r}")
        seen.add(headline.lower())
        per_label[label] += 1
        (heldout if per_label[label] % HELDOUT_EVERY == 0 else train).append((headline, label))
    train.sort(key=lambda h: _order_key(h[0]))
    heldout.sort(key=lambda h: _order_key(h[0]))

    def assistant(text: str) -> list[dict]:
        return [{"role": "assistant", "content": text}]

    sft, prefs, prompts = [], [], []
    seen_per_label = {"yes": 0, "no": 0}
    n_format = 0
    for headline, label in train:
        prompt = clickbait_prompt(headline)
        sft.append({"prompt": prompt, "completion": assistant(label)})
        wrong = "no" if label == "yes" else "yes"
        prefs.append({"prompt": prompt, "chosen": assistant(label), "rejected": assistant(wrong), "kind": "label"})
        if seen_per_label[label] % FORMAT_PAIR_EVERY == 0:  # balanced by label
            rambling = RAMBLING_ANSWERS[n_format % len(RAMBLING_ANSWERS)].format(answer=label,
                                                                                 Answer=label.capitalize())
            prefs.append({"prompt": prompt, "chosen": assistant(label), "rejected": assistant(rambling),
                          "kind": "format"})
            n_format += 1
        seen_per_label[label] += 1
        prompts.append({"prompt": prompt, "label": label})
    held = [{"prompt": clickbait_prompt(h), "label": label} for h, label in heldout]
    return dict(zip(CLICKBAIT_FILES, (sft, prefs, prompts, held)))


def write_clickbait_files(out_dir: str | Path = BUNDLED_DIR) -> dict[str, int]:
    """(Re)generate the four clickbait_*.jsonl files from clickbait_headlines.jsonl; returns rows per file.
    The files are committed; a test checks they match this function's output."""
    source = BUNDLED_DIR / f"{CLICKBAIT_SOURCE}.jsonl"
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for stem, table in build_clickbait_rows(rows).items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in table)
        (out_dir / f"{stem}.jsonl").write_text(text, encoding="utf-8")
        counts[stem] = len(table)
    return counts
