"""A tiny stand-in for the embedded model's PyPI package: a random Llama written as GGUF the way llama.cpp writes one.

The conversion under test (``smore.embedded``) is the real one; only the 98 MB package is replaced by a package folder
holding a GGUF of a 2-layer Llama with a byte-level BPE vocabulary, so the tests run in seconds and offline. The
writer follows llama.cpp's ``convert_hf_to_gguf.py`` for Llama: its key names, the q/k row permutation that
transformers undoes on reading, and float32 tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_vocabulary() -> list[str]:
    """GPT-2's 256 byte symbols, then the chat's special tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)] + SPECIAL


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation (rotary halves interleaved); transformers reverses it when reading."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(model, path: Path) -> None:
    import gguf

    config = model.config
    tokens = byte_vocabulary()
    assert len(tokens) == config.vocab_size
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-stand-in")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}  # transformers 5 / 4
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * len(SPECIAL))  # normal, then control tokens
    writer.add_token_scores([0.0] * len(tokens))  # no merges: transformers derives them from the scores (none)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for hf, ours in names.items():
            part = "self_attn." if hf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp."
            weight = state[f"{prefix}{part}{hf}.weight"]
            if hf == "q_proj":
                weight = _permute(weight, config.num_attention_heads)
            elif hf == "k_proj":
                weight = _permute(weight, config.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{ours}.weight", weight)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", state[f"{prefix}input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", state[f"{prefix}post_attention_layernorm.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_package(root: Path, module: str, gguf_file: str, seed: int = 0):
    """``root/module/`` with an ``__init__.py`` and the GGUF of a tiny random Llama; returns that model."""
    folder = root / module
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text('"""Stand-in for the package that ships the embedded model."""\n')
    model = tiny_llama(len(byte_vocabulary()), seed)
    write_gguf(model, folder / gguf_file)
    return model
