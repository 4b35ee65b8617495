"""Peak memory of `mlora merge` on a >= 1 GB sharded base stays far below the model size.

The base is written tensor by tensor with safetensors (never a whole model in memory): a Llama
config with hidden 2048 in fp32, 5 layers, one shard per layer. The merge runs in a subprocess
(the real CLI), whose own ru_maxrss comes back in the --json summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.byte_tokenizer import save_byte_tokenizer

HIDDEN, INTER, LAYERS, VOCAB, RANK = 2048, 5632, 5, 8192, 8


def _layer(i: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."
    shapes = {
        "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (HIDDEN, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTER),
    }  # fmt: skip
    out = {f"{p}{k}.weight": torch.empty(s).uniform_(-0.05, 0.05, generator=g) for k, s in shapes.items()}
    out[f"{p}input_layernorm.weight"] = torch.ones(HIDDEN)
    out[f"{p}post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    return out


def build_big_base(path: Path) -> int:
    """Write a sharded fp32 Llama checkpoint (config, index, tokenizer); returns its weight bytes."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    n = LAYERS + 1
    weight_map, total = {}, 0
    for s in range(n):
        tensors = _layer(s, g) if s < LAYERS else {
            "model.embed_tokens.weight": torch.empty(VOCAB, HIDDEN).uniform_(-0.05, 0.05, generator=g),
            "lm_head.weight": torch.empty(VOCAB, HIDDEN).uniform_(-0.05, 0.05, generator=g),
            "model.norm.weight": torch.ones(HIDDEN),
        }  # fmt: skip
        name = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors  # one shard in memory at a time
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=HIDDEN, intermediate_size=INTER,
                  num_hidden_layers=LAYERS, num_attention_heads=16, num_key_value_heads=16, vocab_size=VOCAB,
                  max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False, dtype="float32")  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    save_byte_tokenizer(path)
    return total


def build_adapter(path: Path, base: Path) -> None:
    """A LoRA adapter (q_proj, v_proj of every layer) in PEFT's on-disk format."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    t = {}
    for i in range(LAYERS):
        for m in ("q_proj", "v_proj"):
            k = f"base_model.model.model.layers.{i}.self_attn.{m}"
            t[f"{k}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=g) * 0.01
            t[f"{k}.lora_B.weight"] = torch.randn(HIDDEN, RANK, generator=g) * 0.01
    save_file(t, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = dict(peft_type="LORA", r=RANK, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
               base_model_name_or_path=str(base), bias="none")  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_peak_rss_of_a_1gb_merge_is_far_below_the_model_size(tmp_path: Path) -> None:
    base, adapter, out, summary = tmp_path / "big", tmp_path / "adapter", tmp_path / "merged", tmp_path / "s.json"
    model_bytes = build_big_base(base)
    assert model_bytes >= 10**9
    build_adapter(adapter, base)
    env = {k: v for k, v in os.environ.items() if k != "MLORA_DEBUG"}
    res = subprocess.run(
        [sys.executable, "-m", "mlora_cli.main", "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
         "--json", str(summary)], capture_output=True, text=True, env={**env, "COLUMNS": "200"}, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    s = json.loads(summary.read_text())
    print(f"\nmerge of {model_bytes / 2**30:.2f} GiB: peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB, {s['seconds']:.1f} s")
    assert s["shards"] == LAYERS + 1 and s["tensors_merged"] == 2 * LAYERS
    assert s["peak_rss_bytes"] < 0.5 * model_bytes
    # spot-check one merged tensor against the formula and one untouched tensor byte for byte
    k = "model.layers.3.self_attn.v_proj.weight"
    with safe_open(str(out / "model-00004-of-00006.safetensors"), "pt") as f, \
         safe_open(str(base / "model-00004-of-00006.safetensors"), "pt") as b, \
         safe_open(str(adapter / "adapter_model.safetensors"), "pt") as a:  # fmt: skip
        p = "base_model.model.model.layers.3.self_attn.v_proj"
        want = b.get_tensor(k) + (a.get_tensor(p + ".lora_B.weight") @ a.get_tensor(p + ".lora_A.weight")) * (16 / RANK)
        torch.testing.assert_close(f.get_tensor(k), want, rtol=0, atol=1e-6)
        assert torch.equal(f.get_tensor("model.layers.3.mlp.up_proj.weight"), b.get_tensor("model.layers.3.mlp.up_proj.weight"))


def test_peak_rss_bytes_sees_a_large_allocation() -> None:
    """In a fresh process (the high-water mark only ever grows): touching 256 MiB raises it by about that."""
    code = (
        "import torch\nfrom engine.merge import peak_rss_bytes\n"
        "a = peak_rss_bytes()\nb = torch.ones(64 * 2**20)\nprint(a, peak_rss_bytes())"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    before, after = map(int, res.stdout.split())
    assert 250 * 2**20 <= after - before <= 300 * 2**20
