"""The shipped demo files: loadable by transformers/PEFT, the documented prompt format, and
accurate on held-out strings (transformers + PEFT are the oracle runtime here; the engine's
own accuracy is checked in test_demo_engine.py)."""

from __future__ import annotations

import json

import pytest
import torch

from engine.byte_tokenizer import BOS_ID, BYTE_OFFSET, EOS_ID
from engine.demo import DEMO_ADAPTERS, DEMO_MODEL_DIR
from engine.demo.tasks import ADAPTER_TASKS, heldout_strings, is_heldout, target, training_string

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return heldout_strings(100)


@pytest.fixture(scope="module")
def peft_model():
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL_DIR), dtype=torch.float32).eval()
    names = list(DEMO_ADAPTERS)
    model = PeftModel.from_pretrained(base, str(DEMO_ADAPTERS[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(DEMO_ADAPTERS[name]), adapter_name=name)
    return model.eval()


def test_shipped_files_exist_and_are_small() -> None:
    want = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    total = sum((DEMO_MODEL_DIR / f).stat().st_size for f in want)
    for name, path in DEMO_ADAPTERS.items():
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            assert (path / f).is_file(), f"{name}: {f} missing"
            total += (path / f).stat().st_size
    assert total < 8 * 2**20, f"demo files are {total} bytes"


def test_config_is_a_llama_the_engine_can_load() -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(DEMO_MODEL_DIR))
    assert cfg.model_type == "llama" and cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.max_position_embeddings >= 64
    assert (cfg.bos_token_id, cfg.eos_token_id) == (BOS_ID, EOS_ID)


def test_adapters_have_different_ranks_and_name_the_demo_base() -> None:
    ranks = {}
    for name, path in DEMO_ADAPTERS.items():
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA"
        assert cfg["base_model_name_or_path"] == "mlora-demo"
        ranks[name] = cfg["r"]
    assert set(DEMO_ADAPTERS) == set(ADAPTER_TASKS)
    assert len(set(ranks.values())) == 3, ranks


def test_plain_prompt_is_wrapped_by_the_tokenizer_default() -> None:
    """A raw user string, encoded with default settings, is `<s> bytes </s>`: the format trained on."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL_DIR))
    ids = tok("hello world").input_ids
    assert ids == [BOS_ID] + [b + BYTE_OFFSET for b in b"hello world"] + [EOS_ID]
    assert tok.decode([b + BYTE_OFFSET for b in b"HELLO WORLD"]) == "HELLO WORLD"
    # A one-message chat renders to the same tokens.
    text = tok.apply_chat_template([{"role": "user", "content": "hello world"}], tokenize=False, add_generation_prompt=True)
    assert tok.encode(text, add_special_tokens=False) == ids


def test_heldout_strings_are_never_training_strings() -> None:
    import random

    held = heldout_strings(500)
    assert len(set(held)) == 500 and all(is_heldout(s) for s in held)
    assert all(3 <= len(s) <= 20 and set(s) <= set("abcdefghijklmnopqrstuvwxyz ") for s in held)
    rng = random.Random(0)
    assert not any(is_heldout(training_string(rng)) for _ in range(2000))
    assert heldout_strings(500) == held  # deterministic


@pytest.mark.parametrize("adapter", [None, *ADAPTER_TASKS])
def test_hf_peft_accuracy_on_heldout(peft_model, prompts: list[str], adapter: str | None) -> None:
    from engine.demo.train import hf_generate

    if adapter is None:
        with peft_model.disable_adapter():
            outs = hf_generate(peft_model, prompts)
    else:
        peft_model.set_adapter(adapter)
        outs = hf_generate(peft_model, prompts)
    acc = sum(o == target(adapter, p) for p, o in zip(prompts, outs)) / len(prompts)
    assert acc >= 0.95, f"{adapter or 'base'}: {acc:.2%}; e.g. {prompts[0]!r} -> {outs[0]!r}"


def test_training_rows_are_what_the_tokenizer_sends() -> None:
    """Training rows = tokenizer(prompt) + completion bytes + EOS; loss only on the completion."""
    import random

    from transformers import AutoTokenizer

    from engine.demo.train import make_batch

    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL_DIR))
    rng_a, rng_b = random.Random(7), random.Random(7)
    ids, labels = make_batch("reverse", rng_a, 8)
    for row, lab in zip(ids.tolist(), labels.tolist()):
        s = training_string(rng_b)
        prompt = tok(s).input_ids
        answer = tok.encode(target("reverse", s), add_special_tokens=False) + [EOS_ID]
        assert row[: len(prompt) + len(answer)] == prompt + answer
        assert lab[: len(prompt) + len(answer)] == [-100] * len(prompt) + answer
        assert all(x == -100 for x in lab[len(prompt) + len(answer):])
