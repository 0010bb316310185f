"""Tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch

_COMMON = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=128, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)

FAMILY_CONFIGS = {
    "llama": {},
    "mistral": {"sliding_window": 8},
    "qwen2": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
    "qwen3": {"head_dim": 8},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": 8},
    "gemma3_text": {"head_dim": 8, "sliding_window": 8, "sliding_window_pattern": 2},
    "phi3": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "shared_expert_intermediate_size": 32, "decoder_sparse_step": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "head_dim": 8, "mlp_only_layers": [0]},
    "starcoder2": {},
    "phi": {},
    "gpt_neox": {},
}

REQUIRED_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3",
                     "mixtral", "qwen2_moe"]


def tiny_config(model_type: str, num_layers: int = 4):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, num_hidden_layers=num_layers, **_COMMON,
                                **FAMILY_CONFIGS[model_type])


def tiny_model(model_type: str, num_layers: int = 4, seed: int = 0):
    """A random model whose every weight is non-trivial (HF zero-inits biases; we don't want a
    zero bias hiding a writer we forgot)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_layers))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()
