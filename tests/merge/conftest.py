"""Fixtures and oracles for the merge tests: tiny real bases, PEFT's own merge, CLI in-process."""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.tiny import build_tiny_gpt2, build_tiny_model

warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> a tiny seeded-random base: llama (untied), qwen2 (tied, qkv bias), gpt2 (Conv1D, tied)."""
    root = tmp_path_factory.mktemp("merge-bases")
    out = {arch: build_tiny_model(root / arch, arch, seed=3) for arch in ("llama", "qwen2")}
    out["gpt2"] = build_tiny_gpt2(root / "gpt2", seed=3)
    return out


def hash_dir(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (relative name -> digest): proves a directory untouched."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def load_base(base: Path, *, untie: bool = False):
    """transformers model of `base` in fp32; `untie` gives lm_head its own copy of the embedding first."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    if untie:
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    return model


def peft_model(base: Path, adapter: Path, *, untie: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base, untie=untie), str(adapter)).eval()


def peft_merged_state(base: Path, adapter: Path, *, untie: bool = False) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload() state dict (the oracle). With `untie`, the base is untied first:
    that is what mlora merge writes for a tied model whose embedding or lm_head is adapted."""
    merged = peft_model(base, adapter, untie=untie).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def logits(model, ids: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].float() for p in ids]


PROMPTS = [[1, 5, 9, 40, 77, 100, 3], [1, 200, 17, 99], list(range(3, 30))]


def read_output(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a merged model directory (all shards)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def run_cli(*args: str, capsys) -> tuple[int, str, str]:
    """`mlora merge ARGS` in-process through the real entry point: (exit code, stdout, stderr)."""
    from mlora_cli import main as cli

    capsys.readouterr()  # drop what earlier setup printed (transformers' loading bars)
    old, debug = sys.argv, os.environ.pop("MLORA_DEBUG", None)
    sys.argv = ["mlora", "merge", *args]
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = old
        if debug is not None:
            os.environ["MLORA_DEBUG"] = debug
    cap = capsys.readouterr()
    return code, " ".join(cap.out.split()), cap.err
