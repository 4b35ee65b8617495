"""The built-in demo: a tiny Llama that copies its input, and LoRA adapters that transform it.

`LLM()` and `mlora serve` with no model load DEMO_MODEL_DIR and register DEMO_ADAPTERS by name.
Prompt: a string of lowercase letters and spaces, sent as is (the tokenizer wraps it as
`<s> text </s>`). Completion: the string copied (base), UPPERCASED (`upper`), reversed
(`reverse`) or ROT13'd (`rot13`), then EOS. Re-create the files with `python -m engine.demo.train`.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEMO_MODEL_DIR: Path = DEMO_DIR / "model"
DEMO_MODEL_NAME = "mlora-demo"
DEMO_ADAPTERS: dict[str, Path] = {name: DEMO_DIR / "adapters" / name for name in ("upper", "reverse", "rot13")}

__all__ = ["DEMO_ADAPTERS", "DEMO_MODEL_DIR", "DEMO_MODEL_NAME"]
