"""Tiny random-weight models of every supported family, for tests that must run fast on a CPU.

Each model uses the embedded SmolLM2 tokenizer (vocab 49152), so prompts are built exactly as
for a real model. Weights are random (seeded): the tests check the machinery, not the text.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

VOCAB_SIZE = 49152
HIDDEN = 64
LAYERS = 2
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
MLP = 128
POSITIONS = 512

# Per-family config kwargs (on top of vocab size and special token ids, set for all).
# Names differ between families (n_embd / d_model / hidden_size ...), hence one entry each.
_LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": HIDDEN, "intermediate_size": MLP, "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS, "num_key_value_heads": 2, "max_position_embeddings": POSITIONS,
}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(_LLAMA_LIKE),
    "gptj": {"n_embd": HIDDEN, "n_inner": MLP, "n_layer": LAYERS, "n_head": HEADS,
             "n_positions": POSITIONS, "rotary_dim": HEAD_DIM // 2},
    "gpt_neox": {"hidden_size": HIDDEN, "intermediate_size": MLP, "num_hidden_layers": LAYERS,
                 "num_attention_heads": HEADS, "max_position_embeddings": POSITIONS},
    "opt": {"hidden_size": HIDDEN, "word_embed_proj_dim": HIDDEN, "ffn_dim": MLP,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "max_position_embeddings": POSITIONS},
    "falcon": {"hidden_size": HIDDEN, "ffn_hidden_size": MLP, "num_hidden_layers": LAYERS,
               "num_attention_heads": HEADS, "max_position_embeddings": POSITIONS},
    "bloom": {"hidden_size": HIDDEN, "n_layer": LAYERS, "n_head": HEADS},  # ALiBi: no positions
    "codegen": {"n_embd": HIDDEN, "n_inner": MLP, "n_layer": LAYERS, "n_head": HEADS,
                "n_positions": POSITIONS, "n_ctx": POSITIONS, "rotary_dim": HEAD_DIM // 2},
    "gpt_bigcode": {"n_embd": HIDDEN, "n_inner": MLP, "n_layer": LAYERS, "n_head": HEADS,
                    "n_positions": POSITIONS},
    "t5": {"d_model": HIDDEN, "d_ff": MLP, "d_kv": HEAD_DIM, "num_layers": LAYERS,
           "num_decoder_layers": LAYERS, "num_heads": HEADS},
    "mistral": dict(_LLAMA_LIKE),
    "mixtral": {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2},
    "mpt": {"d_model": HIDDEN, "n_heads": HEADS, "n_layers": LAYERS, "expansion_ratio": 2,
            "max_seq_len": POSITIONS},
    "stablelm": dict(_LLAMA_LIKE),
    "qwen2": dict(_LLAMA_LIKE),
    "qwen3": {**_LLAMA_LIKE, "head_dim": HEAD_DIM},
    "phi": {"hidden_size": HIDDEN, "intermediate_size": MLP, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "max_position_embeddings": POSITIONS},
    "phi3": dict(_LLAMA_LIKE),
    "jamba": {**_LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2,
              # layer 0 mamba + dense MLP, layer 1 attention + experts
              "attn_layer_period": 2, "attn_layer_offset": 1,
              "expert_layer_period": 2, "expert_layer_offset": 1,
              "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 8,
              "use_mamba_kernels": False},
    "deepseek_v2": {**_LLAMA_LIKE, "moe_intermediate_size": 32, "n_routed_experts": 4,
                    "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
                    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": HEAD_DIM, "n_group": 1,
                    "topk_group": 1, "num_key_value_heads": HEADS},
    "deepseek_v3": {**_LLAMA_LIKE, "moe_intermediate_size": 32, "n_routed_experts": 4,
                    "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
                    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": HEAD_DIM, "n_group": 1,
                    "topk_group": 1, "num_key_value_heads": HEADS},
    "gemma": {**_LLAMA_LIKE, "head_dim": HEAD_DIM},
}

FAMILY_TYPES: list[str] = list(TINY_CONFIGS)
SEQ2SEQ_TYPES = ("t5",)


@lru_cache(maxsize=4)
def _tokenizer(tokenizer_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def make_tiny_model(model_type: str, folder: Path, tokenizer_dir: Path,
                    **config_overrides: Any) -> Path:
    """Save a tiny random model of `model_type` (and the tokenizer of `tokenizer_dir`) into
    `folder`, as safetensors; returns `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(str(tokenizer_dir))  # loaded once for all the families
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": pad,
        **TINY_CONFIGS[model_type],
        **config_overrides,
    }
    seq2seq = model_type in SEQ2SEQ_TYPES
    if seq2seq:
        kwargs.setdefault("decoder_start_token_id", pad)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    auto_class = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = auto_class.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
