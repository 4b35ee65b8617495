"""Built-in bench models and adapters, made deterministically on first use (no downloads).

A preset is a transformers `LlamaConfig` plus a seed. Its seeded random weights are saved
once with `save_pretrained` under the bench cache (`$MLORA_BENCH_CACHE`, else
`$XDG_CACHE_HOME/mlora/bench`, else `~/.cache/mlora/bench`) in `<preset>-<hash>/`, where the
hash covers the config, seed and builder version, so a changed preset never reuses stale
files. Adapters are PEFT-format LoRA adapters of a given rank on all seven Llama linears,
written with PEFT's own `save_pretrained` when peft is installed, else directly in the same
format (same `adapter_config.json` fields, same safetensors keys and shapes).
Every directory is written to a temporary sibling and renamed, so an interrupted build never
leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

BUILDER_VERSION = 1
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# hidden/intermediate/layers/heads/vocab of each preset; `small` is ~110M parameters, `llama-1b` ~1.24B.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=264, tie_word_embeddings=False,
    ),
    "small": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=True,
    ),
    # Llama-3.2-1B's shape (1.24B parameters, GQA 32/8, tied 128k vocab) with seeded random weights:
    # the 1B-class GPU benchmark. ~5 GB of fp32 files on first use.
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
    ),
}
_COMMON = dict(
    max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    rope_theta=10000.0,
)
PRESET_SEED = 1234


def preset_names() -> list[str]:
    return sorted(PRESETS)


def cache_root() -> Path:
    """Where bench models and adapters are kept between runs."""
    env = os.environ.get("MLORA_BENCH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mlora" / "bench"


def preset_config_dict(name: str) -> dict[str, Any]:
    """The LlamaConfig keyword arguments of preset `name` (ConfigError for an unknown one)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown bench preset {name!r}; choose from {', '.join(preset_names())}")
    return {**_COMMON, **PRESETS[name]}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _atomic_build(final: Path, build: Any) -> Path:
    """Run `build(tmp_dir)` and rename the result to `final` (a concurrent winner is kept)."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: keep theirs
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def quiet_transformers() -> None:
    """No per-file progress bars or deprecation chatter from transformers during a bench run."""
    import warnings

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def build_preset_model(name: str) -> Path:
    """The directory of preset model `name`, building it on first use."""
    cfg = preset_config_dict(name)
    key = _digest({"cfg": cfg, "seed": PRESET_SEED, "v": BUILDER_VERSION})
    return _atomic_build(cache_root() / f"{name}-{key}", lambda d: _write_model(d, cfg, PRESET_SEED))


def _write_model(path: Path, cfg: dict[str, Any], seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    quiet_transformers()
    from engine.byte_tokenizer import save_byte_tokenizer

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # seeded, scaled so activations neither vanish nor explode
        for _, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    model.save_pretrained(str(path), safe_serialization=True)
    save_byte_tokenizer(path)


def _model_hf_config(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {model_dir / 'config.json'}: {e}") from e


def build_adapters(model_dir: str | Path, *, rank: int, count: int, seed: int = 0) -> list[Path]:
    """`count` seeded PEFT LoRA adapters of `rank` for the model in `model_dir` (cached).

    Adapter i is drawn from seed `seed + i`, so adapter i is the same whatever `count` is.
    """
    if rank < 1:
        raise ConfigError(f"--rank must be >= 1, got {rank}")
    model_dir = Path(model_dir)
    hf = _model_hf_config(model_dir)
    key = _digest({"model": str(model_dir.resolve()), "cfg": hf, "rank": rank, "v": BUILDER_VERSION})
    root = cache_root() / "adapters" / f"{model_dir.name}-r{rank}-{key}"
    paths = [root / f"lora-{i:03d}" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.is_dir()]
    if missing:
        writer = _peft_writer(model_dir, rank) if _peft_available() else _direct_writer(hf, model_dir, rank)
        for i in missing:
            _atomic_build(paths[i], lambda d, i=i: writer(d, seed + i))
    return paths


def _peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def _lora_config_kwargs(rank: int) -> dict[str, Any]:
    return dict(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")


def _draw(shape: tuple[int, ...], gen: Any) -> Any:
    import torch

    # Non-zero A and B (PEFT inits B to zero), scaled so the delta is a visible perturbation.
    return torch.randn(shape, generator=gen) * (0.5 / shape[-1] ** 0.5)


def _peft_writer(model_dir: Path, rank: int) -> Any:
    """A function (out_dir, seed) that saves a PEFT adapter with PEFT's own code."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(**_lora_config_kwargs(rank)))
    lora_params = sorted((n, p) for n, p in peft_model.named_parameters() if "lora_" in n)

    def write(out_dir: Path, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in lora_params:
                p.copy_(_draw(tuple(p.shape), gen))
        peft_model.save_pretrained(str(out_dir))

    return write


def _direct_writer(hf: dict[str, Any], model_dir: Path, rank: int) -> Any:
    """Without peft: write the same files PEFT writes (config fields, tensor keys, shapes)."""
    import torch
    from safetensors.torch import save_file

    hidden, inter = hf["hidden_size"], hf["intermediate_size"]
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hidden // heads
    shapes = {  # module -> (in_features, out_features)
        "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }
    group = {m: ("self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp") for m in LORA_TARGETS}
    names = []
    for layer in range(hf["num_hidden_layers"]):
        for m in LORA_TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.{group[m]}.{m}"
            names.append((f"{prefix}.lora_A.weight", (rank, shapes[m][0])))
            names.append((f"{prefix}.lora_B.weight", (shapes[m][1], rank)))
    config = {
        **_lora_config_kwargs(rank), "peft_type": "LORA", "base_model_name_or_path": str(model_dir),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None,
    }

    def write(out_dir: Path, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        # Draw in PEFT's named_parameters order (sorted names) so both writers agree.
        tensors = {n: _draw(s, gen).contiguous() for n, s in sorted(names)}
        save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    return write
