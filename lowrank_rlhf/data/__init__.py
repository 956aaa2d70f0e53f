"""Datasets for every stage, in three modules:

    tables.py     loading and validating tables (json/jsonl/csv/parquet, save_to_disk dirs, hub ids, bundled:NAME)
    chat.py       THE one chat encoding: prompt text and ids, prompt + answer as a PPO rollout lays them out,
                  left padding, answer text and normalization
    clickbait.py  the bundled "clickbait test" of the quickstart

This file only re-exports their public names, so `from lowrank_rlhf import data; data.load_prompts(...)` works.
"""

from .chat import (
                   completion_text,
                   encode_example,
                   encode_example_parts,
                   encode_prompts,
                   is_conversation,
                   left_pad,
                   normalize_answer,
                   prompt_ids,
                   prompt_text,
                   prompt_texts,
                   split_messages,
                   tokenize_prompts,
)
from .clickbait import (
                   CLICKBAIT_FILES,
                   CLICKBAIT_PROMPT,
                   RAMBLING_ANSWERS,
                   build_clickbait_rows,
                   clickbait_prompt,
                   write_clickbait_files,
)
from .errors import DataError
from .tables import (
                   BUNDLED_DIR,
                   SFT_LAYOUTS,
                   SUPPORTED_EXTENSIONS,
                   bundled_names,
                   holdout_split,
                   load_preferences,
                   load_prompts,
                   load_sft,
                   load_table,
)

__all__ = [
    "BUNDLED_DIR", "CLICKBAIT_FILES", "CLICKBAIT_PROMPT", "DataError", "RAMBLING_ANSWERS", "SFT_LAYOUTS",
    "SUPPORTED_EXTENSIONS", "build_clickbait_rows", "bundled_names", "clickbait_prompt", "completion_text",
    "encode_example", "encode_example_parts", "encode_prompts", "holdout_split", "is_conversation", "left_pad",
    "load_preferences", "load_prompts", "load_sft", "load_table", "normalize_answer", "prompt_ids", "prompt_text",
    "prompt_texts", "split_messages", "tokenize_prompts", "write_clickbait_files",
]
