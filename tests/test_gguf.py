"""`export --format gguf`: the merged policy as one GGUF file that transformers (and so llama.cpp's format) reads
back with the same tokens, chat template and, within the weights' type, the same logits."""

import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowrank_rlhf.cli import main
from lowrank_rlhf.commands.export import merged_policy
from lowrank_rlhf.commands.gguf_export import write_gguf
from lowrank_rlhf.config import ConfigError, load_recipe
from lowrank_rlhf.pipeline import run_stages

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny-cpu.yaml")
TEXT = "user: Is this headline clickbait?</s>\nassistant: "

pytestmark = pytest.mark.usefixtures("offline_single_thread")  # conftest: offline, one thread


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("gguf") / "run"
    run_stages(load_recipe(TINY, ["sft.learning_rate=0.01"]), ["sft"], run)
    return run


@pytest.mark.parametrize("quant,tolerance", [("f16", 0.02), ("q8_0", 0.1)])
def test_the_gguf_reads_back_with_the_merged_policys_tokens_template_and_logits(sft_run, tmp_path, capsys, quant,
                                                                                 tolerance):
    out = tmp_path / "export"
    assert main(["export", str(sft_run), "--out", str(out), "--format", "gguf", "--quant", quant]) == 0
    assert "ollama create" in capsys.readouterr().out
    assert (out / "Modelfile").read_text().startswith("FROM ./model.gguf")
    merged, tokenizer = merged_policy(sft_run)
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    loaded_tok = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert torch.equal(loaded_tok(TEXT, return_tensors="pt")["input_ids"], ids)
    assert loaded_tok.chat_template == tokenizer.chat_template
    with torch.no_grad():
        want, got = merged.float()(ids).logits, loaded(ids).logits
    assert (want - got).abs().max() <= tolerance * want.abs().max()


def test_an_architecture_gguf_is_not_written_for_is_one_line(tmp_path):
    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="qwen3"))
    with pytest.raises(ConfigError, match="the base is a 'qwen3' model; only the llama architecture"):
        write_gguf(model, None, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_a_bad_quant_is_refused_before_anything_is_written(sft_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["export", str(sft_run), "--out", str(tmp_path / "e"), "--format", "gguf", "--quant", "q2"])
    assert err.value.code == 2 and "invalid choice: 'q2'" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
