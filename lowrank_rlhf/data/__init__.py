"""Datasets for every stage: loading and validating tables, prompts as chat-template text, prompt token ids, and the
bundled "clickbait test" data for the quickstart.

Everything is a Hugging Face `datasets.Dataset` in TRL's column conventions:

- SFT (`data.sft`): `messages`, or `prompt` + `completion`, or `text`;
- preference pairs (`data.preferences`): `chosen` + `rejected`, `prompt` optional;
- PPO prompts (`data.prompts`, `data.eval_prompts`): `prompt`, plus any extra columns (e.g. `label`), which reach
  the Python reward functions as keyword arguments.

A prompt or answer is either plain text or a conversation: a list of `{"role": ..., "content": ...}` messages.
Every problem is a `DataError` whose one-line message starts with the recipe key (e.g. `data.sft: ...`).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import datasets
import torch

__all__ = [
    "BUNDLED_DIR", "CLICKBAIT_PROMPT", "DataError", "SFT_LAYOUTS", "SUPPORTED_EXTENSIONS", "build_clickbait_rows",
    "bundled_names", "clickbait_prompt", "completion_text", "encode_prompts", "holdout_split", "is_conversation",
    "left_pad", "load_preferences", "load_prompts", "load_sft", "load_table", "normalize_answer", "prompt_texts",
    "tokenize_prompts", "write_clickbait_files",
]


class DataError(ValueError):
    """A data problem, reported in one line that starts with the recipe key (data.sft, data.prompts, ...)."""


BUNDLED_DIR = Path(__file__).parent
BUNDLED_PREFIX = "bundled:"
# file extension -> datasets builder; .jsonl is JSON Lines, .json is JSON Lines or one JSON list of records.
SUPPORTED_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# The accepted SFT column layouts, in TRL's names (conversational or plain text).
SFT_LAYOUTS: tuple[tuple[str, ...], ...] = (("messages",), ("prompt", "completion"), ("text",))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# ----------------------------------------------------------------------------------------------------------- loading
def bundled_names() -> list[str]:
    """Names usable as `bundled:NAME`: the .jsonl/.json files shipped in lowrank_rlhf/data."""
    return sorted(p.stem for p in BUNDLED_DIR.iterdir() if p.suffix in (".jsonl", ".json"))


def _bundled_path(source: str, name: str) -> Path:
    stem = source[len(BUNDLED_PREFIX):]
    for suffix in (".jsonl", ".json"):
        path = BUNDLED_DIR / f"{stem}{suffix}"
        if stem and "/" not in stem and path.is_file():
            return path
    raise DataError(f"{name}: unknown bundled dataset {source!r}; bundled datasets: "
                    f"{', '.join(BUNDLED_PREFIX + n for n in bundled_names())}")


def _looks_local(source: str) -> bool:
    """A path rather than a hub id: starts with / . ~, has a file extension, or has more than one '/'.
    Hub ids look like `name` or `owner/name`."""
    return source.startswith(("/", ".", "~", "\\")) or Path(source).suffix != "" or source.count("/") > 1


def _has_no_rows(path: Path, ext: str) -> bool:
    """Empty files make the `datasets` builders fail with unhelpful errors; recognise them before loading."""
    if ext == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception:  # not a valid parquet file: let the loader report it
            return False
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if ext == ".csv":
        return len(lines) <= 1  # a header alone has no rows
    return not lines or "".join(lines).replace(" ", "") in ("[]", "{}")


def _load_file(path: Path, name: str) -> datasets.Dataset:
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{name}: unsupported file type {ext or '(none)'!r} for {path}; supported: "
                        f"{', '.join(SUPPORTED_EXTENSIONS)}, a directory saved with save_to_disk, a hub id or "
                        f"bundled:NAME")
    if _has_no_rows(path, ext):
        raise DataError(f"{name}: {path} has no rows")
    try:
        return datasets.load_dataset(SUPPORTED_EXTENSIONS[ext], data_files=str(path), split="train")
    except Exception as err:
        raise DataError(f"{name}: could not read {path} as {ext[1:]} ({_first_line(err)})") from err


def _load_dir(path: Path, name: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        state = path / "state.json"  # a saved empty Dataset has no shards and fails to load
        if state.is_file() and not json.loads(state.read_text()).get("_data_files", [None]):
            raise DataError(f"{name}: {path} has no rows") from None
        raise DataError(f"{name}: {path} is a directory but not a dataset saved with save_to_disk "
                        f"({_first_line(err)})") from err
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{name}: {path} holds no 'train' split; splits found: {', '.join(loaded)}")
        loaded = loaded["train"]
    return loaded


def _load_hub(source: str, name: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source, split="train")
    except Exception as err:
        raise DataError(f"{name}: could not load {source!r} as a hub dataset ({_first_line(err)}); a local file "
                        f"needs one of {', '.join(SUPPORTED_EXTENSIONS)}") from err


def load_table(source: str, required: Sequence[str], name: str, max_samples: int = 0) -> datasets.Dataset:
    """Load one table and check that it has rows and the `required` columns.

    source: a local .json/.jsonl/.csv/.parquet file, a directory written by `save_to_disk` (a DatasetDict gives its
    "train" split), `bundled:NAME` (a file in lowrank_rlhf/data), or else a hub id (`load_dataset(source,
    split="train")`). name: the recipe key used in error messages. max_samples > 0 keeps the first rows only.
    """
    source = str(source).strip()
    if not source:
        raise DataError(f"{name}: no dataset given; expected a file, a saved dataset dir, a hub id or bundled:NAME")
    label = source
    if source.startswith(BUNDLED_PREFIX):
        ds = _load_file(_bundled_path(source, name), name)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            ds = _load_dir(path, name)
        elif path.is_file():
            ds = _load_file(path, name)
        elif _looks_local(source):
            raise DataError(f"{name}: file not found: {source}")
        else:
            ds = _load_hub(source, name)
    if len(ds) == 0:
        raise DataError(f"{name}: {label} has no rows")
    missing = [col for col in required if col not in ds.column_names]
    if missing:
        raise DataError(f"{name}: missing column {missing[0]!r} in {label}; columns found: "
                        f"{', '.join(ds.column_names)}")
    if max_samples and max_samples > 0 and len(ds) > max_samples:
        ds = ds.select(range(max_samples))
    return ds


def load_sft(source: str, max_samples: int = 0, name: str = "data.sft") -> datasets.Dataset:
    """SFT data in one of TRL's layouts: messages | prompt + completion | text."""
    ds = load_table(source, [], name, max_samples)
    if not any(all(col in ds.column_names for col in layout) for layout in SFT_LAYOUTS):
        layouts = " | ".join(" + ".join(layout) for layout in SFT_LAYOUTS)
        raise DataError(f"{name}: missing columns in {source}; expected one of: {layouts}; columns found: "
                        f"{', '.join(ds.column_names)}")
    return ds


def load_preferences(source: str, max_samples: int = 0, name: str = "data.preferences") -> datasets.Dataset:
    """Preference pairs: chosen + rejected (prompt optional, as in TRL's RewardTrainer)."""
    return load_table(source, ["chosen", "rejected"], name, max_samples)


def load_prompts(source: str, max_samples: int = 0, name: str = "data.prompts") -> datasets.Dataset:
    """PPO prompts: a prompt column (text or messages); other columns are passed to reward functions."""
    return load_table(source, ["prompt"], name, max_samples)


def holdout_split(ds: datasets.Dataset, fraction: float, seed: int = 0
                  ) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Split off `fraction` of the rows (at least one, leaving at least one) for evaluation; 0 = no split."""
    if fraction <= 0 or len(ds) < 2:
        return ds, None
    n_eval = min(max(1, round(len(ds) * fraction)), len(ds) - 1)
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


# ------------------------------------------------------------------------------------------ prompts and completions
def is_conversation(value: Any) -> bool:
    """True for a list of {role, content} messages (TRL's conversational format)."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _prompt_column(dataset: Any) -> list:
    if isinstance(dataset, datasets.Dataset):
        return list(dataset["prompt"]) if "prompt" in dataset.column_names else None
    if isinstance(dataset, dict):
        return list(dataset["prompt"]) if "prompt" in dataset else None
    return list(dataset)  # a plain list of prompts


def prompt_texts(dataset: Any, tokenizer, name: str = "data.prompts") -> list[str]:
    """The prompts as text. Conversations are rendered with the tokenizer's chat template and the assistant turn
    opened (`add_generation_prompt=True`); plain strings pass through unchanged.

    dataset: a Dataset (or dict of columns) with a `prompt` column, or a list of prompts."""
    prompts = _prompt_column(dataset)
    if prompts is None:
        raise DataError(f"{name}: missing column 'prompt'; columns found: "
                        f"{', '.join(getattr(dataset, 'column_names', None) or list(dataset))}")
    texts = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            texts.append(prompt)
        elif is_conversation(prompt):
            if not getattr(tokenizer, "chat_template", None):
                raise DataError(f"{name}: prompts are conversations but the tokenizer has no chat template; "
                                f"use plain-text prompts or a model with a chat template")
            texts.append(tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True))
        else:
            raise DataError(f"{name}: row {i}: prompt must be a string or a list of {{role, content}} messages, "
                            f"got {type(prompt).__name__}")
    return texts


def tokenize_prompts(texts: Sequence[str], tokenizer, max_prompt_length: int, long_prompts: str = "truncate",
                     add_special_tokens: bool = False, name: str = "data.prompts") -> list[list[int]]:
    """Token ids of each prompt, at most `max_prompt_length` long.

    add_special_tokens=False (the default) adds nothing: text rendered by a chat template already carries the
    template's special tokens (a second BOS would be wrong). Pass True for raw-text prompts of a model that expects
    a BOS; `encode_prompts` does this choice per row. Longer prompts are cut from the LEFT (the end of a prompt,
    where the question and the assistant turn are, is kept) with one warning saying how many were cut, or, with
    long_prompts="error", raise a DataError naming the longest length and the limit.
    """
    _check_limits(max_prompt_length, long_prompts)
    ids = [list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]) for text in texts]
    return _limit_lengths(ids, max_prompt_length, long_prompts, name)


def _check_limits(max_prompt_length: int, long_prompts: str) -> None:
    if long_prompts not in ("truncate", "error"):
        raise DataError(f"data.long_prompts: {long_prompts!r} is not allowed; allowed values: truncate, error")
    if max_prompt_length < 1:
        raise DataError(f"data.max_prompt_length: {max_prompt_length} is out of range; allowed range: [1, inf]")


def _limit_lengths(ids: list[list[int]], max_len: int, long_prompts: str, name: str) -> list[list[int]]:
    too_long = [len(row) for row in ids if len(row) > max_len]
    if not too_long:
        return ids
    if long_prompts == "error":
        raise DataError(f"{name}: {len(too_long)} of {len(ids)} prompts are longer than data.max_prompt_length="
                        f"{max_len} tokens (longest: {max(too_long)}); raise data.max_prompt_length or set "
                        f"data.long_prompts=truncate")
    warnings.warn(f"{name}: {len(too_long)} of {len(ids)} prompts were longer than data.max_prompt_length={max_len} "
                  f"tokens (longest: {max(too_long)}) and were truncated from the left", stacklevel=3)
    return [row[-max_len:] if len(row) > max_len else row for row in ids]


def encode_prompts(dataset: Any, tokenizer, max_prompt_length: int, long_prompts: str = "truncate",
                   name: str = "data.prompts") -> list[list[int]]:
    """prompt_texts + tokenize_prompts in one step: conversations get no extra special tokens (their template has
    them), plain-text prompts get the tokenizer's usual ones (e.g. LLaMA's BOS)."""
    _check_limits(max_prompt_length, long_prompts)
    texts = prompt_texts(dataset, tokenizer, name)
    ids = [list(tokenizer(text, add_special_tokens=isinstance(raw, str))["input_ids"])
           for raw, text in zip(_prompt_column(dataset), texts)]
    return _limit_lengths(ids, max_prompt_length, long_prompts, name)


def left_pad(batch_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists to one length: (input_ids LongTensor [B, T], attention_mask LongTensor [B, T]),
    so that every response starts at column T, as batched generation needs."""
    width = max((len(row) for row in batch_ids), default=0)
    input_ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for i, row in enumerate(batch_ids):
        if len(row):
            input_ids[i, width - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


def completion_text(completion: Any) -> str:
    """An answer as text: a string as is; a conversation as the content of its assistant messages (joined)."""
    if isinstance(completion, str):
        return completion
    if is_conversation(completion):
        parts = [str(m["content"]) for m in completion if m["role"] == "assistant"]
        return "\n".join(parts if parts else [str(m["content"]) for m in completion])
    if isinstance(completion, dict) and "content" in completion:
        return str(completion["content"])
    raise DataError(f"expected a string or a list of {{role, content}} messages, got {type(completion).__name__}")


_SPECIAL_TOKEN = re.compile(r"\s*<\|?/?[\w.-]+\|?>\s*$")  # trailing </s>, <|im_end|>, <|eot_id|>
_EDGE = " \t\r\n\"'`*"
_TRAILING = _EDGE + ".,!?;:"


def normalize_answer(text: Any) -> str:
    """The answer for an exact-match check: stripped, lower-cased, without trailing punctuation, quotes and
    special-token strings such as </s> or <|im_end|>. "Yes." -> "yes", " NO!</s>" -> "no", "yes, it is" stays."""
    text = completion_text(text)
    previous = None
    while previous != text:
        previous = text
        text = _SPECIAL_TOKEN.sub("", text).rstrip(_TRAILING).lstrip(_EDGE)
    return text.lower()


# ----------------------------------------------------------------------------------------- the bundled clickbait test
CLICKBAIT_PROMPT = "Is this headline clickbait? Answer yes or no.\nHeadline: {headline}"
CLICKBAIT_SOURCE = "clickbait_headlines"  # {"headline", "label"} rows: the one hand-written source of the others
CLICKBAIT_FILES = ("clickbait_sft", "clickbait_preferences", "clickbait_prompts", "clickbait_heldout")
HELDOUT_EVERY = 5  # every 5th headline of each label is held out: 20 %, balanced

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
    by the SHA-1 of the headline, which mixes the labels. Preferences: even rows reject the wrong label, odd rows a
    rambling answer (RAMBLING_ANSWERS in turn)."""
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
    for i, (headline, label) in enumerate(train):
        prompt = clickbait_prompt(headline)
        sft.append({"prompt": prompt, "completion": assistant(label)})
        if i % 2 == 0:
            rejected = "no" if label == "yes" else "yes"
        else:
            rejected = RAMBLING_ANSWERS[(i // 2) % len(RAMBLING_ANSWERS)].format(answer=label,
                                                                                 Answer=label.capitalize())
        prefs.append({"prompt": prompt, "chosen": assistant(label), "rejected": assistant(rejected)})
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
