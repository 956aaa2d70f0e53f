"""The bundled "clickbait test" of the quickstart: one hand-written source, clickbait_headlines.jsonl
({"headline", "label"} rows, 450 of each label), from which `write_clickbait_files` derives the committed tables.

The split has RLHF's asymmetry (InstructGPT: ~13k demonstrations, ~33k comparisons, ~31k answer-free RL prompts):
few demonstrations, many more comparisons, and answer-free RL prompts for every training headline. With SFT, reward
model and RL all built from the same headlines, RL could only reshuffle what SFT already knew (the quickstart's PPO
averaged exactly the SFT); here the reward model has seen five times the headlines SFT has.

    clickbait_sft          48 demonstrations (24 per label)
    clickbait_preferences  comparisons on 240 headlines (a superset of the demonstrations): a label pair each, a
                           format pair for every second one
    clickbait_prompts      500 RL prompts: every training headline, answer-free (the label column feeds eval metrics)
    clickbait_validation   80 headlines for every choice (RUN/best, settings)
    clickbait_heldout      320 headlines, never used for a choice: a 5-point paired gain is told from 0 at 95%
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from .errors import DataError
from .tables import BUNDLED_DIR, write_jsonl_tables

CLICKBAIT_PROMPT = "Is this headline clickbait? Answer yes or no.\nHeadline: {headline}"
CLICKBAIT_SOURCE = "clickbait_headlines"  # {"headline", "label"} rows: the one hand-written source of the others
CLICKBAIT_FILES = ("clickbait_sft", "clickbait_preferences", "clickbait_prompts", "clickbait_validation",
                   "clickbait_heldout")
# Per label, in the order of each headline's SHA-1 (which mixes the source's writing batches): the first HELDOUT are
# held out, the next VALIDATION validate, the rest train; of those, the first DEMONSTRATIONS are demonstrations and
# the first COMPARED get comparisons.
PER_LABEL = {"heldout": 160, "validation": 40, "demonstrations": 24, "compared": 120}
FORMAT_PAIR_EVERY = 2  # every 2nd compared headline of each label also gets a format pair

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
    """From {"headline", "label"} rows to the bundled tables, deterministically (see the module docstring).

    Preferences: every compared headline gets a "label" pair (the right label over the wrong one), so a reward model
    that ignores the headline cannot rank these pairs better than chance; every FORMAT_PAIR_EVERY-th of each label
    also gets a "format" pair (the right label over a rambling answer, RAMBLING_ANSWERS in turn). The `kind` column
    says which. Every table is sorted by the SHA-1 of the headline, which mixes the labels."""
    seen: set[str] = set()
    by_label: dict[str, list[str]] = {"yes": [], "no": []}
    for row in headlines:
        headline, label = row["headline"].strip(), row["label"]
        if label not in by_label:
            raise DataError(f"{CLICKBAIT_SOURCE}: label {label!r} of {headline!r}; allowed values: yes, no")
        if headline.lower() in seen:
            raise DataError(f"{CLICKBAIT_SOURCE}: duplicate headline {headline!r}")
        seen.add(headline.lower())
        by_label[label].append(headline)
    splits: dict[str, list[tuple[str, str]]] = {k: [] for k in ("heldout", "validation", "train")}
    for label, heads in by_label.items():
        heads = sorted(heads, key=_order_key)
        n_held, n_val = PER_LABEL["heldout"], PER_LABEL["validation"]
        if len(heads) <= n_held + n_val + PER_LABEL["compared"]:
            raise DataError(f"{CLICKBAIT_SOURCE}: {len(heads)} {label!r} headlines; the splits need more than "
                            f"{n_held + n_val + PER_LABEL['compared']}")
        splits["heldout"] += [(h, label) for h in heads[:n_held]]
        splits["validation"] += [(h, label) for h in heads[n_held:n_held + n_val]]
        splits["train"] += [(h, label) for h in heads[n_held + n_val:]]

    def assistant(text: str) -> list[dict]:
        return [{"role": "assistant", "content": text}]

    sft, prefs = [], []
    rank = {"yes": 0, "no": 0}  # a headline's place among the training headlines of its label (SHA-1 order)
    n_format = 0
    for headline, label in sorted(splits["train"], key=lambda h: (h[1], _order_key(h[0]))):
        prompt, place = clickbait_prompt(headline), rank[label]
        rank[label] += 1
        if place < PER_LABEL["demonstrations"]:
            sft.append({"prompt": prompt, "completion": assistant(label)})
        if place >= PER_LABEL["compared"]:
            continue
        wrong = "no" if label == "yes" else "yes"
        prefs.append({"prompt": prompt, "chosen": assistant(label), "rejected": assistant(wrong), "kind": "label"})
        if place % FORMAT_PAIR_EVERY == 0:  # balanced by label
            rambling = RAMBLING_ANSWERS[n_format % len(RAMBLING_ANSWERS)].format(answer=label,
                                                                                 Answer=label.capitalize())
            prefs.append({"prompt": prompt, "chosen": assistant(label), "rejected": assistant(rambling),
                          "kind": "format"})
            n_format += 1

    def by_hash(rows: list[dict]) -> list[dict]:
        return sorted(rows, key=lambda r: _order_key(r["prompt"][0]["content"]))

    def prompts(split: str) -> list[dict]:
        return by_hash([{"prompt": clickbait_prompt(h), "label": label} for h, label in splits[split]])
    tables = (by_hash(sft), by_hash(prefs), prompts("train"), prompts("validation"), prompts("heldout"))
    return dict(zip(CLICKBAIT_FILES, tables))


def write_clickbait_files(out_dir: str | Path = BUNDLED_DIR) -> dict[str, int]:
    """(Re)generate the clickbait_*.jsonl tables from clickbait_headlines.jsonl; returns rows per file.
    The files are committed; a test checks they match this function's output."""
    source = BUNDLED_DIR / f"{CLICKBAIT_SOURCE}.jsonl"
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    return write_jsonl_tables(build_clickbait_rows(rows), out_dir)
