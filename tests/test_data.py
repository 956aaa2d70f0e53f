"""Data loading and validation, prompt text and token ids, padding, and the bundled clickbait data."""

import json
import re
import warnings

import datasets
import pytest
import torch

from lowrank_rlhf import data as D
from lowrank_rlhf.data import (
    CLICKBAIT_PROMPT,
    DataError,
    bundled_names,
    completion_text,
    encode_prompts,
    holdout_split,
    left_pad,
    load_preferences,
    load_prompts,
    load_sft,
    load_table,
    normalize_answer,
    prompt_texts,
    tokenize_prompts,
)
from lowrank_rlhf.models.loading import load_tokenizer

ROWS = [{"prompt": "Is the sky blue?", "completion": "yes"}, {"prompt": "Is fire cold?", "completion": "no"},
        {"prompt": "Is water wet?", "completion": "yes"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    return load_tokenizer(str(tiny_path))


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------------------------------------------ file formats
def write(path, fmt, rows=ROWS):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        ds = datasets.Dataset.from_list(rows)
        ds.to_csv(str(path), index=False) if fmt == "csv" else ds.to_parquet(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_load_each_file_format(tmp_path, fmt):
    path = write(tmp_path / f"sft.{fmt}", fmt)
    ds = load_table(str(path), ["prompt", "completion"], "data.sft")
    assert len(ds) == 3
    assert ds[1] == ROWS[1]


def test_load_saved_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert len(load_table(str(tmp_path / "ds"), ["prompt"], "data.sft")) == 3
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                               "test": datasets.Dataset.from_list(ROWS[2:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_table(str(tmp_path / "dd"), ["prompt"], "data.sft")["prompt"] == [ROWS[0]["prompt"], ROWS[1]["prompt"]]


def test_dataset_dict_without_train_split(tmp_path):
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError) as err:
        load_table(str(tmp_path / "dd"), ["prompt"], "data.sft")
    assert "data.sft:" in one_line(err) and "'train'" in str(err.value) and "test" in str(err.value)


def test_plain_directory_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError) as err:
        load_table(str(tmp_path), ["prompt"], "data.sft")
    assert "save_to_disk" in one_line(err)


def test_max_samples_keeps_first_rows(tmp_path):
    path = write(tmp_path / "p.jsonl", "jsonl")
    assert load_table(str(path), [], "data.sft", max_samples=2)["prompt"] == ["Is the sky blue?", "Is fire cold?"]
    assert len(load_table(str(path), [], "data.sft", max_samples=10)) == 3


def test_hub_id_goes_to_load_dataset(monkeypatch):
    calls = []

    def fake(source, split):
        calls.append((source, split))
        if source == "owner/missing":
            raise FileNotFoundError("Dataset 'owner/missing' doesn't exist on the Hub\nmore detail")
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake)  # tables.py calls datasets.load_dataset
    assert len(load_table("owner/dataset", ["prompt"], "data.prompts")) == 3
    assert calls == [("owner/dataset", "train")]
    with pytest.raises(DataError) as err:
        load_table("owner/missing", ["prompt"], "data.prompts")
    text = one_line(err)
    assert text.startswith("data.prompts: could not load 'owner/missing'") and "doesn't exist on the Hub" in text


# ------------------------------------------------------------------------------------------ mixing preference sources
def human_judgement(question: str, better: str, worse: str) -> dict:
    """A line as the feedback page writes it: TRL's conversational pair plus the record of who wrote what."""
    return {"prompt": [{"role": "user", "content": question}], "chosen": [{"role": "assistant", "content": better}],
            "rejected": [{"role": "assistant", "content": worse}], "kind": "human", "chosen_model": "policy",
            "rejected_model": "sft", "temperature": 0.7, "time": "2026-12-05T15:00:00Z"}


def test_human_judgements_mix_with_the_bundled_pairs_in_the_order_given(tmp_path):
    feedback = tmp_path / "preferences.jsonl"
    feedback.write_text("".join(json.dumps(human_judgement(f"Question {i}?", "yes", "no")) + "\n" for i in range(3)))
    bundled = load_preferences("bundled:clickbait_preferences")
    mixed = load_preferences(f"{feedback}, bundled:clickbait_preferences")
    assert len(mixed) == 3 + len(bundled)
    assert mixed.column_names == ["prompt", "chosen", "rejected", "kind"]  # the record columns are not training data
    assert [p[0]["content"] for p in mixed["prompt"][:3]] == [f"Question {i}?" for i in range(3)]
    assert mixed["kind"][:4] == ["human", "human", "human", bundled["kind"][0]]
    assert mixed[3] == bundled[0]
    assert len(load_preferences(f"{feedback},bundled:clickbait_preferences", max_samples=5)) == 5


@pytest.mark.parametrize("second, problem", [
    ([{"chosen": "yes", "rejected": "no", "prompt": "Is it?"}], "do not share one layout"),
    ([{"chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]}],
     "has no prompt column"),
])
def test_mixed_sources_that_disagree_are_refused_with_the_source_named(tmp_path, second, problem):
    first = tmp_path / "human.jsonl"
    first.write_text(json.dumps(human_judgement("Question?", "yes", "no")) + "\n")
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(row) + "\n" for row in second))
    with pytest.raises(DataError) as err:
        load_preferences(f"{first},{other}")
    assert one_line(err).startswith("data.preferences: ") and problem in one_line(err)
    assert str(other) in one_line(err) or "plain text" in one_line(err)
    with pytest.raises(DataError, match="an empty source"):
        load_preferences(f"{first},,{other}")


def test_sft_and_prompt_tables_mix_the_same_way(tmp_path):
    sft = load_sft("bundled:text2sql_sft,bundled:clickbait_sft")
    assert len(sft) == len(load_sft("bundled:text2sql_sft")) + 48 and sft.column_names == ["prompt", "completion"]
    prompts = load_prompts("bundled:text2sql_prompts,bundled:text2sql_shapes_validation")
    assert prompts.column_names == ["prompt", "gold_sql", "db_id"]  # "shape" is only the second's
    assert len(prompts) == len(load_prompts("bundled:text2sql_prompts")) + 120
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"text": "a whole document"}) + "\n")
    with pytest.raises(DataError) as err:
        load_sft(f"bundled:clickbait_sft,{plain}")
    assert "has no prompt column" in one_line(err) and str(plain) in one_line(err)


# ------------------------------------------------------------------------------------------------------------ errors
def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as err:
        load_table(str(path), ["prompt"], "data.sft")
    assert one_line(err) == f"data.sft: file not found: {path}"


def test_missing_relative_path_is_not_a_hub_id():
    with pytest.raises(DataError, match=r"^data.sft: file not found: \./data/train$"):
        load_table("./data/train", ["prompt"], "data.sft")


def test_missing_column_lists_columns_found(tmp_path):
    path = write(tmp_path / "p.jsonl", "jsonl", [{"a": 1, "b": 2}])
    with pytest.raises(DataError) as err:
        load_table(str(path), ["chosen", "rejected"], "data.preferences")
    text = one_line(err)
    assert text.startswith("data.preferences: missing column 'chosen'") and text.endswith("columns found: a, b")


@pytest.mark.parametrize("fmt,content", [("jsonl", ""), ("jsonl", "\n\n"), ("json", "[]"), ("csv", "prompt\n")])
def test_empty_file(tmp_path, fmt, content):
    path = tmp_path / f"empty.{fmt}"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_table(str(path), ["prompt"], "data.prompts")
    assert one_line(err) == f"data.prompts: {path} has no rows"


def test_empty_parquet_and_saved_dataset(tmp_path):
    empty = datasets.Dataset.from_dict({"prompt": []})
    empty.to_parquet(str(tmp_path / "e.parquet"))
    empty.save_to_disk(str(tmp_path / "e"))
    for path in (tmp_path / "e.parquet", tmp_path / "e"):
        with pytest.raises(DataError) as err:
            load_table(str(path), ["prompt"], "data.prompts")
        assert one_line(err) == f"data.prompts: {path} has no rows"


def test_unsupported_extension_names_allowed_ones(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError) as err:
        load_table(str(path), ["prompt"], "data.sft")
    text = one_line(err)
    assert text.startswith("data.sft: unsupported file type '.txt'")
    assert all(ext in text for ext in (".json", ".jsonl", ".csv", ".parquet", "bundled:NAME"))


def test_unknown_bundled_name_lists_bundled():
    with pytest.raises(DataError) as err:
        load_table("bundled:clickbate", ["prompt"], "data.prompts")
    text = one_line(err)
    assert "unknown bundled dataset 'bundled:clickbate'" in text
    assert all(f"bundled:{n}" in text for n in ("clickbait_sft", "clickbait_prompts", "clickbait_heldout"))


def test_unreadable_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "x"}\n{not json\n')
    with pytest.raises(DataError) as err:
        load_table(str(path), ["prompt"], "data.sft")
    assert one_line(err).startswith(f"data.sft: could not read {path} as jsonl")


def test_sft_layouts(tmp_path):
    assert len(load_sft(str(write(tmp_path / "a.jsonl", "jsonl")))) == 3
    msgs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    assert len(load_sft(str(write(tmp_path / "m.jsonl", "jsonl", msgs)))) == 1
    with pytest.raises(DataError) as err:
        load_sft(str(write(tmp_path / "b.jsonl", "jsonl", [{"question": "q", "answer": "a"}])))
    text = one_line(err)
    assert "messages | prompt + completion | text" in text and "columns found: question, answer" in text


# -------------------------------------------------------------------------------------------------- bundled datasets
def test_bundled_files_have_the_right_columns_and_sizes():
    assert set(D.CLICKBAIT_FILES) <= set(bundled_names())
    sft = load_sft("bundled:clickbait_sft")
    prefs = load_preferences("bundled:clickbait_preferences")
    prompts = load_prompts("bundled:clickbait_prompts")
    val = load_prompts("bundled:clickbait_validation", name="data.eval_prompts")
    held = load_prompts("bundled:clickbait_heldout", name="data.eval_prompts")
    assert sft.column_names == ["prompt", "completion"]
    assert prefs.column_names == ["prompt", "chosen", "rejected", "kind"]
    assert prompts.column_names == val.column_names == held.column_names == ["prompt", "label"]
    # RLHF's asymmetry: few demonstrations, comparisons on five times as many headlines, more RL prompts still
    assert (len(sft), len(prefs), len(prompts), len(val), len(held)) == (48, 360, 500, 80, 320)
    row = sft[0]
    assert row["prompt"][0]["role"] == "user" and row["completion"][0] == {"role": "assistant",
                                                                             "content": row["completion"][0]["content"]}
    assert row["completion"][0]["content"] in ("yes", "no")


def headline(prompt) -> str:
    content = prompt[0]["content"]
    prefix = CLICKBAIT_PROMPT.split("{headline}")[0]
    assert content.startswith(prefix)
    return content[len(prefix):]


def heads(table: str) -> dict[str, str]:
    rows = load_prompts(f"bundled:{table}")
    return {headline(p): label for p, label in zip(rows["prompt"], rows["label"])}


def test_splits_are_disjoint_balanced_and_nested():
    train, val, held = heads("clickbait_prompts"), heads("clickbait_validation"), heads("clickbait_heldout")
    assert (len(train), len(val), len(held)) == (500, 80, 320)
    assert not {h.lower() for h in train} & {h.lower() for h in held}
    assert not {h.lower() for h in val} & ({h.lower() for h in held} | {h.lower() for h in train})
    for split in (train, val, held):
        assert list(split.values()).count("yes") == list(split.values()).count("no")  # balanced exactly
    # demonstrations and comparisons are training headlines, with their answers
    sft = load_sft("bundled:clickbait_sft")
    assert {headline(p): c[0]["content"] for p, c in zip(sft["prompt"], sft["completion"])}.items() <= train.items()
    prefs = load_preferences("bundled:clickbait_preferences")
    compared = {headline(p) for p in prefs["prompt"]}
    assert len(compared) == 240 and compared <= set(train) and {headline(p) for p in sft["prompt"]} <= compared


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def test_no_headline_is_a_near_copy_of_another():
    """Hand-written headlines in five splits: a near copy across splits would leak an answer into the held-out set.
    Word-set Jaccard similarity of every pair stays below 0.5, and no two share their first five words."""
    source = [json.loads(line)["headline"] for line in (D.BUNDLED_DIR / "clickbait_headlines.jsonl").open()]
    sets = [words(h) for h in source]
    worst = max(len(a & b) / len(a | b) for i, a in enumerate(sets) for b in sets[i + 1:])
    assert worst < 0.5
    openings = [" ".join(h.lower().split()[:5]) for h in source]
    assert len(set(openings)) == len(openings)


def test_preferences_reject_wrong_labels_and_rambling():
    """Every compared headline has a label pair (so a headline-blind ranking scores 50 % on them), balanced by
    label; format pairs (rambling) come in addition, also balanced."""
    prefs = load_preferences("bundled:clickbait_preferences")
    counts = {}
    for chosen, rejected, kind in zip(prefs["chosen"], prefs["rejected"], prefs["kind"]):
        good, bad = chosen[0]["content"], rejected[0]["content"]
        assert good in ("yes", "no") and bad != good
        assert kind == ("label" if bad in ("yes", "no") else "format")
        if kind == "format":
            assert len(bad.split()) > 3
        counts[kind, good] = counts.get((kind, good), 0) + 1
    assert counts == {("label", "yes"): 120, ("label", "no"): 120, ("format", "yes"): 60, ("format", "no"): 60}
    assert len({r[0]["content"] for r in prefs["rejected"]}) > 10  # varied rambling


def test_bundled_files_match_their_generator(tmp_path):
    counts = D.write_clickbait_files(tmp_path)
    assert counts == {"clickbait_sft": 48, "clickbait_preferences": 360, "clickbait_prompts": 500,
                      "clickbait_validation": 80, "clickbait_heldout": 320}
    for stem in counts:
        assert (tmp_path / f"{stem}.jsonl").read_text() == (D.BUNDLED_DIR / f"{stem}.jsonl").read_text(), stem


# ---------------------------------------------------------------------------------------------- prompts and tokens
def test_prompt_texts_renders_chat_and_passes_strings(tokenizer):
    prompts = [[{"role": "user", "content": "Is it?"}], "plain prompt"]
    texts = prompt_texts({"prompt": prompts}, tokenizer)
    assert texts == ["user: Is it?</s>\nassistant: ", "plain prompt"]
    assert prompt_texts(prompts, tokenizer) == texts
    with pytest.raises(DataError) as err:
        prompt_texts({"prompt": [42]}, tokenizer)
    assert "row 0" in one_line(err)


def test_prompt_texts_of_bundled_prompts(tokenizer):
    texts = prompt_texts(load_prompts("bundled:clickbait_heldout"), tokenizer)
    assert len(texts) == 320
    assert texts[0].startswith("user: Is this headline clickbait?") and texts[0].endswith("assistant: ")


def test_tokenize_adds_no_special_tokens(tokenizer):
    text = "user: hi</s>\nassistant: "
    (ids,) = tokenize_prompts([text], tokenizer, max_prompt_length=100)
    assert tokenizer.decode(ids) == text and ids.count(tokenizer.eos_token_id) == 1


def test_left_truncation_keeps_the_end_with_one_warning(tokenizer):
    texts = ["a" * 30 + "THE END", "short"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tokenize_prompts(texts, tokenizer, max_prompt_length=10)
    assert len(caught) == 1
    assert "1 of 2 prompts" in str(caught[0].message) and "truncated from the left" in str(caught[0].message)
    assert len(ids[0]) == 10 and tokenizer.decode(ids[0]) == "aaaTHE END"
    assert tokenizer.decode(ids[1]) == "short"


def test_long_prompts_error(tokenizer):
    with pytest.raises(DataError) as err:
        tokenize_prompts(["x" * 37, "y" * 12, "z"], tokenizer, max_prompt_length=10, long_prompts="error")
    text = one_line(err)
    assert "2 of 3 prompts" in text and "longest: 37" in text and "max_prompt_length=10" in text
    with pytest.raises(DataError, match="allowed values: truncate, error"):
        tokenize_prompts(["x"], tokenizer, max_prompt_length=10, long_prompts="drop")


def test_encode_prompts_special_tokens_per_row(tokenizer):
    ids = encode_prompts({"prompt": [[{"role": "user", "content": "hi"}], "raw"]}, tokenizer, 100)
    assert tokenizer.decode(ids[0]) == "user: hi</s>\nassistant: "
    assert tokenizer.decode(ids[1], skip_special_tokens=True) == "raw"


def test_left_pad_shapes_and_mask():
    input_ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert input_ids.dtype == mask.dtype == torch.long
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    empty_ids, empty_mask = left_pad([], pad_id=0)
    assert empty_ids.shape == empty_mask.shape == (0, 0)


# --------------------------------------------------------------------------------------------------------- answers
@pytest.mark.parametrize("text,expected", [
    ("yes", "yes"), (" Yes.", "yes"), ("NO!</s>", "no"), ('"no"', "no"), ("yes<|im_end|>\n", "yes"),
    ("Yes, it is.", "yes, it is"), ("no\n\n", "no"), ("", ""),
    ([{"role": "assistant", "content": "No."}], "no"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_completion_text():
    assert completion_text("a") == "a"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    assert completion_text([{"role": "user", "content": "q"}]) == "q"  # no assistant turn: all contents
    assert completion_text({"role": "assistant", "content": "a"}) == "a"
    with pytest.raises(DataError, match="got int"):
        completion_text(42)


def test_split_messages_before_the_last_assistant_turn():
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert D.split_messages(turns) == (turns[:3], turns[3:])
    with pytest.raises(DataError, match="no assistant message"):
        D.split_messages(turns[:1])


def test_holdout_split():
    ds = datasets.Dataset.from_dict({"x": list(range(20))})
    train, held = holdout_split(ds, 0.1)
    assert len(train) == 18 and len(held) == 2 and not set(train["x"]) & set(held["x"])
    assert holdout_split(ds, 0.0) == (ds, None)


def test_holdout_split_keeps_every_pair_of_a_prompt_on_one_side():
    prompts = [f"headline {i // 3}" for i in range(30)]  # 10 prompts, 3 pairs each
    rejected = [str(i) for i in range(30)]
    ds = datasets.Dataset.from_dict({"prompt": prompts, "chosen": ["yes"] * 30, "rejected": rejected})
    train, held = holdout_split(ds, 0.2)
    assert len(set(held["prompt"])) == 2 and len(held) == 6 and len(train) == 24
    assert not set(train["prompt"]) & set(held["prompt"])


def test_left_truncation_keeps_the_bos_token_and_says_what_the_cut_loses(tokenizer):
    (row,) = tokenize_prompts([tokenizer.bos_token + "a" * 30 + "THE END"], tokenizer, max_prompt_length=10)
    assert len(row) == 10 and row[0] == tokenizer.bos_token_id  # the model never saw text without its BOS
    assert tokenizer.decode(row[1:]) == "aaTHE END"
    with pytest.warns(UserWarning, match="system prompt or chat-template header, is lost"):
        tokenize_prompts(["b" * 30], tokenizer, max_prompt_length=10)
