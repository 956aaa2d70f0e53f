"""`export RUN --format gguf`: the merged policy as one GGUF file for llama.cpp and Ollama.

Written with the `gguf` package (llama.cpp's own Python writer, which the project already uses to read SmolLM2):
its tensor-name map, its vocabularies (GPT-2 byte-level BPE, or LLaMA's byte-fallback BPE from tokenizer.json), its
special-token and chat-template record, and its Q8_0 quantizer. What llama.cpp's converter does beyond those and
is not in the package, done here: LLaMA's q/k projection rows reordered for llama.cpp's rotary layout (`permute`,
which transformers' GGUF loader undoes), and the model's hyperparameters as GGUF keys.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError

QUANTS = ("f16", "q8_0")


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for a q or k projection: each head's rotary halves interleaved."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _vocab(tokenizer_dir: Path):
    import gguf

    try:
        return gguf.LlamaHfVocab(tokenizer_dir)  # LLaMA-2 style: BPE with byte fallback
    except (FileNotFoundError, TypeError, ValueError):
        try:
            return gguf.BpeVocab(tokenizer_dir)  # GPT-2 byte-level BPE (SmolLM2, Llama-3, Qwen)
        except FileNotFoundError:
            raise ConfigError("export --format gguf: the tokenizer is neither a GPT-2 byte-level BPE nor a LLaMA "
                              "byte-fallback BPE (tokenizer.json); export the merged model instead (--merge)") from None


def write_gguf(model, tokenizer, out_file: Path, quant: str = "f16") -> Path:
    """The merged causal LM `model` and its tokenizer as one GGUF file (f16, or q8_0 for the 2-D weights)."""
    import gguf

    if quant not in QUANTS:
        raise ConfigError(f"--quant: {quant!r} is not allowed; allowed values: {', '.join(QUANTS)}")
    cfg = model.config
    if cfg.model_type != "llama":
        raise ConfigError(f"export --format gguf: the base is a {cfg.model_type!r} model; only the llama architecture "
                          f"is written (export --merge gives a transformers model for the others)")
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(str(getattr(cfg, "name_or_path", "") or "lowrank_rlhf policy"))
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        vocab = _vocab(Path(tmp))
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_token_list([t if isinstance(t, bytes) else str(t).encode() for t in tokens])
        writer.add_token_scores(list(scores))
        writer.add_token_types([int(t) for t in types])
        gguf.SpecialVocab(Path(tmp), load_merges=vocab.tokenizer_model == "gpt2",
                          n_vocab=len(tokens)).add_to_gguf(writer)  # bos/eos/pad ids, merges, chat template

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    state = model.state_dict()
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # llama.cpp reads the tied output from the embedding
    for name, tensor in state.items():
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ConfigError(f"export --format gguf: no GGUF name for tensor {name}")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if name.endswith("q_proj.weight"):
            data = permute(data, n_head)
        elif name.endswith("k_proj.weight"):
            data = permute(data, n_kv)
        if data.ndim == 1:  # norms stay float32, as llama.cpp writes them
            writer.add_tensor(target, data)
        elif quant == "q8_0" and data.shape[-1] % 32 == 0:
            writer.add_tensor(target, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(target, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def ollama_modelfile(gguf_name: str) -> str:
    return f"FROM ./{gguf_name}\n# the chat template and stop tokens are read from the GGUF file\n"
