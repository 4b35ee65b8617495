"""Tiny real models and real PEFT adapters for tests: built from transformers configs with
seeded random weights and saved with `save_pretrained`, so every format on disk is the real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.byte_tokenizer import VOCAB_SIZE, save_byte_tokenizer

ARCHS = ("llama", "mistral", "qwen2", "qwen3")

_BASE: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE + 5,  # a little larger than the tokenizer, as real models often are
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(arch: str = "llama", **overrides: Any):
    """A transformers config object for a tiny model of `arch` (llama, mistral, qwen2, qwen3)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    kw = dict(_BASE)
    if arch == "llama":
        cls = LlamaConfig
        kw.update(tie_word_embeddings=False)
    elif arch == "mistral":
        cls = MistralConfig
        kw.update(sliding_window=None, tie_word_embeddings=False)
    elif arch == "qwen2":
        cls = Qwen2Config
        kw.update(tie_word_embeddings=True, use_sliding_window=False)
    elif arch == "qwen3":
        cls = Qwen3Config
        kw.update(tie_word_embeddings=True, head_dim=16, use_sliding_window=False)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {ARCHS}")
    kw.update(overrides)
    return cls(**kw)


def build_tiny_model(path: str | Path, arch: str = "llama", *, seed: int = 0, **overrides: Any) -> Path:
    """Create a tiny seeded-random causal LM of `arch` in `path` (config, safetensors, tokenizer)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    model = model.to(torch.float32).eval()
    with torch.no_grad():  # random init is small; widen it so logits are not all ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(path), safe_serialization=True)
    save_byte_tokenizer(path)
    return path


def build_peft_adapter(
    base_path: str | Path,
    out_path: str | Path,
    *,
    seed: int = 0,
    init_scale: float = 0.2,
    train_saved_modules: bool = False,
    **lora_kwargs: Any,
) -> Path:
    """Create a PEFT LoRA adapter for the model at `base_path` with PEFT's own code.

    `lora_kwargs` go to `peft.LoraConfig` (r, lora_alpha, target_modules, use_rslora,
    rank_pattern, alpha_pattern, layers_to_transform, use_dora, ...). LoRA B is zero at
    PEFT's init, so all LoRA weights are re-drawn from a seeded normal to make the adapter
    actually change the output. `train_saved_modules` also perturbs the trained copies of
    `modules_to_save` (otherwise they equal the base modules, as right after PEFT's init).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora_kwargs.setdefault("r", 8)
    lora_kwargs.setdefault("lora_alpha", 16)
    lora_kwargs.setdefault("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(**lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:  # DoRA: PEFT inits m = ||W||_row; perturb it
                p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * init_scale / max(p.shape[-1], 1) ** 0.5)
            elif train_saved_modules and "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(str(out_path))
    return Path(out_path)


def build_tiny_gpt2(path: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """A tiny seeded-random GPT-2 (Conv1D layers with [in, out] weights, tied wte/lm_head) in `path`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(path)
    kw: dict[str, Any] = dict(vocab_size=VOCAB_SIZE + 5, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    kw.update(overrides)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**kw)).to(torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif not p.any():  # zero-initialised biases: make them matter
                p.normal_(0.0, 0.02)
    model.save_pretrained(str(path), safe_serialization=True)
    save_byte_tokenizer(path)
    return path
