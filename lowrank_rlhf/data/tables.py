"""Loading and validating the tables every stage reads, as Hugging Face `datasets.Dataset`s in TRL's column
conventions:

- SFT (`data.sft`): `messages`, or `prompt` + `completion`, or `text`;
- preference pairs (`data.preferences`): `chosen` + `rejected`, `prompt` optional;
- PPO prompts (`data.prompts`, `data.eval_prompts`): `prompt`, plus any extra columns (e.g. `label`), which reach
  the Python reward functions as keyword arguments.

A source is a local file, a directory written by `save_to_disk`, `bundled:NAME` or a hub id. Every problem is a
`DataError` whose one-line message starts with the recipe key (e.g. `data.sft: ...`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets

from .errors import DataError

BUNDLED_DIR = Path(__file__).parent
BUNDLED_PREFIX = "bundled:"
# file extension -> datasets builder; .jsonl is JSON Lines, .json is JSON Lines or one JSON list of records.
SUPPORTED_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# The accepted SFT column layouts, in TRL's names (conversational or plain text).
SFT_LAYOUTS: tuple[tuple[str, ...], ...] = (("messages",), ("prompt", "completion"), ("text",))


def write_jsonl_tables(tables: dict[str, list[dict]], out_dir: str | Path) -> dict[str, int]:
    """Write each table as out_dir/<name>.jsonl (one JSON object per line, UTF-8); returns rows per table. The
    bundled tables' generators (clickbait, text2sql, text2sql_shapes) all write through here."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stem, table in tables.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in table)
        (out_dir / f"{stem}.jsonl").write_text(text, encoding="utf-8")
    return {stem: len(table) for stem, table in tables.items()}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _root_cause(err: BaseException) -> BaseException:
    """`datasets` wraps the parser's error (pandas' "Expected 2 fields in line 3") in a DatasetGenerationError
    that says only that generation failed; the innermost cause says what and where."""
    seen = {id(err)}
    while (inner := err.__cause__ or err.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        err = inner
    return err


def _bad_json_line(path: Path) -> str | None:
    """Where a .json/.jsonl file stops being JSON: "line N is not valid JSON (...)", or None if it parses."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):  # one JSON document (a list of records)
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return f"line {err.lineno} is not valid JSON ({err.msg}, column {err.colno})"
        return None
    for number, line in enumerate(text.splitlines(), start=1):  # JSON Lines: one record per line
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number} is not valid JSON ({err.msg}, column {err.colno})"
        if not isinstance(record, dict):
            return f"line {number} is not a JSON object of columns (it is a {type(record).__name__})"
    return None


def _line_of_row(path: Path | None, row: int) -> str:
    """" (line N)" for line-based files (JSON Lines, CSV without multi-line cells), where an editor finds the row."""
    if path is None or path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        return ""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if path.suffix.lower() == ".csv":
        return f" (line {row + 2})"  # after the header
    if lines and lines[0].lstrip().startswith("["):
        return ""
    numbers = [i for i, line in enumerate(lines, start=1) if line.strip()]
    return f" (line {numbers[row]})" if row < len(numbers) else ""


def check_rows(ds: datasets.Dataset, columns: Sequence[str], name: str, label: str, path: Path | None = None
               ) -> None:
    """Every row has a value in `columns`: a row that lacks one (a JSON line without the key, an empty CSV cell)
    is reported with its row number (ds[row]) and line, not left for a stage to trip over."""
    for column in columns:
        values = ds.data.column(column)
        if values.null_count:
            row = next(i for i, v in enumerate(values.is_null().to_pylist()) if v)
            raise DataError(f"{name}: {label} row {row}{_line_of_row(path, row)} has no {column!r}; every row needs "
                            f"one (columns: {', '.join(ds.column_names)})")


def _is_empty_prompt(prompt) -> bool:
    if isinstance(prompt, str):
        return not prompt.strip()
    if isinstance(prompt, list):  # messages: empty, or nothing but empty contents
        return not any(str(m.get("content") or "").strip() if isinstance(m, dict) else m for m in prompt)
    return False


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
        where = _bad_json_line(path) if ext in (".json", ".jsonl") else None
        if where:
            raise DataError(f"{name}: could not read {path} as {ext[1:]}: {where}; fix or remove that line") from err
        raise DataError(f"{name}: could not read {path} as {ext[1:]} ({_first_line(_root_cause(err))})") from err


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
    label, file = source, None
    if source.startswith(BUNDLED_PREFIX):
        file = _bundled_path(source, name)
        ds = _load_file(file, name)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            ds = _load_dir(path, name)
        elif path.is_file():
            file = path
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
    check_rows(ds, required, name, label, file)
    return ds


def _local_file(source: str) -> Path | None:
    """The file behind a source, for line numbers in messages; None for a directory or a hub id."""
    source = str(source).strip()
    if source.startswith(BUNDLED_PREFIX):
        return _bundled_path(source, "data")
    path = Path(source).expanduser()
    return path if path.is_file() else None


SOURCE_SEPARATOR = ","


# columns that hold text or conversations: mixed sources must agree on which of the two each one is
TEXT_COLUMNS = ("prompt", "completion", "messages", "chosen", "rejected")


def mix_sources(source: str, load_one: Callable[[str, int], datasets.Dataset], name: str, max_samples: int = 0
                ) -> datasets.Dataset:
    """One table from several sources separated by commas (e.g. the feedback page's judgements beside the bundled
    pairs), each loaded and checked by `load_one(source, max_samples)`, concatenated in the order given;
    max_samples applies to the mixture. They keep the columns all of them share (record columns that only one
    source has, such as a human judgement's `chosen_model`, are left out), all have a prompt or none, and agree on
    each text column's layout: all conversational or all plain text."""
    sources = [part.strip() for part in str(source).split(SOURCE_SEPARATOR)]
    if len(sources) == 1:
        return load_one(source, max_samples)
    if not all(sources):
        raise DataError(f"{name}: an empty source in {source!r}; separate sources with one comma each")
    tables = [load_one(part, 0) for part in sources]
    has_prompt = ["prompt" in table.column_names for table in tables]
    if any(has_prompt) and not all(has_prompt):
        raise DataError(f"{name}: {sources[has_prompt.index(False)]} has no prompt column but "
                        f"{sources[has_prompt.index(True)]} has one; give every mixed source a prompt or none")
    shared = [col for col in tables[0].column_names if all(col in table.column_names for table in tables)]
    for column in (col for col in TEXT_COLUMNS if col in shared):
        layouts = [_layout(table, column) for table in tables]
        if len(set(layouts)) > 1:
            kinds = ", ".join(f"{part}: {layout}" for part, layout in zip(sources, layouts))
            raise DataError(f"{name}: the mixed sources do not share one layout of {column} ({kinds}); make them "
                            f"all conversational or all plain text")
    try:  # datasets' own concatenation: it checks that the shared columns have one type
        mixed = datasets.concatenate_datasets([table.select_columns(shared) for table in tables])
    except ValueError as err:
        raise DataError(f"{name}: the mixed sources disagree on column types ({_first_line(err)})") from err
    return mixed.select(range(max_samples)) if 0 < max_samples < len(mixed) else mixed


def _layout(table: datasets.Dataset, column: str) -> str:
    """"conversational" when `column` holds lists of messages, else "plain text"."""
    return "conversational" if isinstance(table[0][column], list) else "plain text"


def load_sft(source: str, max_samples: int = 0, name: str = "data.sft") -> datasets.Dataset:
    """SFT data in one of TRL's layouts: messages | prompt + completion | text; several sources separated by
    commas are mixed (`mix_sources`), and must share a layout."""
    def load_one(part: str, limit: int) -> datasets.Dataset:
        ds = load_table(part, [], name, limit)
        layout = next((layout for layout in SFT_LAYOUTS if all(col in ds.column_names for col in layout)), None)
        if layout is None:
            layouts = " | ".join(" + ".join(layout) for layout in SFT_LAYOUTS)
            raise DataError(f"{name}: missing columns in {part}; expected one of: {layouts}; columns found: "
                            f"{', '.join(ds.column_names)}")
        check_rows(ds, layout, name, part, _local_file(part))
        return ds

    mixed = mix_sources(source, load_one, name, max_samples)
    if not any(all(col in mixed.column_names for col in layout) for layout in SFT_LAYOUTS):
        raise DataError(f"{name}: the mixed sources of {source!r} share no SFT layout; columns they share: "
                        f"{', '.join(mixed.column_names) or 'none'}")
    return mixed


def load_preferences(source: str, max_samples: int = 0, name: str = "data.preferences") -> datasets.Dataset:
    """Preference pairs: chosen + rejected (prompt optional, as in TRL's RewardTrainer); several sources
    separated by commas are mixed (`mix_sources`), e.g. `RUN/feedback/preferences.jsonl,bundled:NAME`."""
    def load_one(part: str, limit: int) -> datasets.Dataset:
        return load_table(part, ["chosen", "rejected"], name, limit)

    return mix_sources(source, load_one, name, max_samples)


def load_prompts(source: str, max_samples: int = 0, name: str = "data.prompts") -> datasets.Dataset:
    """PPO prompts: a prompt column (text or messages); other columns are passed to reward functions. An empty
    prompt is refused with its row: the policy would answer nothing in particular, and the reward would follow.
    Several sources separated by commas are mixed (`mix_sources`)."""
    def load_one(part: str, limit: int) -> datasets.Dataset:
        ds = load_table(part, ["prompt"], name, limit)
        empty = next((i for i, prompt in enumerate(ds["prompt"]) if _is_empty_prompt(prompt)), None)
        if empty is not None:
            raise DataError(f"{name}: {part} row {empty}{_line_of_row(_local_file(part), empty)} has an empty "
                            f"prompt; give it text or remove the row")
        return ds

    return mix_sources(source, load_one, name, max_samples)


def holdout_split(ds: datasets.Dataset, fraction: float, seed: int = 0
                  ) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Split off `fraction` of the prompts (at least one, leaving at least one), with every row of each, for
    evaluation; 0 = no split. By prompt, not by row: split by pair, a held-out pair shared its prompt and chosen
    answer with a training pair (13 of 33 of the clickbait label pairs did) and the held-out accuracy flattered the
    reward model. A table without a `prompt` column splits by row."""
    keys = ([json.dumps(p, sort_keys=True) for p in ds["prompt"]] if "prompt" in ds.column_names
            else list(range(len(ds))))
    prompts = list(dict.fromkeys(keys))
    if fraction <= 0 or len(prompts) < 2:
        return ds, None
    n_eval = min(max(1, round(len(prompts) * fraction)), len(prompts) - 1)
    # datasets' own shuffle-and-split, over the distinct prompts
    chosen = datasets.Dataset.from_dict({"i": list(range(len(prompts)))}).train_test_split(
        test_size=n_eval, seed=seed, shuffle=True)["test"]["i"]
    held = {prompts[i] for i in chosen}
    return (ds.select([i for i, k in enumerate(keys) if k not in held]),
            ds.select([i for i, k in enumerate(keys) if k in held]))
