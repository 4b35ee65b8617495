"""Train the built-in demo model and its three LoRA adapters on CPU.

Measured: 12.3 min on one thread of a shared, busy 2-core machine (base 7 min, adapters
5 min). A re-run with the defaults re-created every shipped file byte for byte (same torch
and CPU; elsewhere expect the same accuracy, not necessarily the same bytes).

    python -m engine.demo.train [--out DIR]

Writes DIR/model (a tiny Llama: config, safetensors, byte tokenizer) trained to copy its input,
then DIR/adapters/{upper,reverse,rot13}, LoRA adapters trained by PEFT on the frozen base and
saved with PEFT's save_pretrained. The default DIR is this package, i.e. it re-creates the
shipped files. Seeds are fixed; it prints held-out accuracy (transformers + PEFT, greedy) and
how long it took. Needs `peft` (a test dependency), which the engine itself does not.

Prompt format: the tokenizer's post-processor wraps every encoded prompt as `<s> text </s>`,
so the raw user string, encoded with default settings, is exactly what the model was trained
on; the trailing `</s>` tells the model where the input ends (without it "abcabc" would be
ambiguous between the prompt "abcabc" and the prompt "abc" plus the answer "abc"). The
completion is the transformed string followed by `</s>`. The chat template renders a
one-message chat to the same tokens. The base is trained to copy any printable ASCII (so its
uppercase outputs are trained too); evaluation uses lowercase letters and spaces only.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from engine.byte_tokenizer import BOS_ID, BYTE_OFFSET, EOS_ID, PAD_ID, VOCAB_SIZE, save_byte_tokenizer
from engine.demo.tasks import ADAPTER_TASKS, copy_training_string, heldout_strings, target, training_string

DEMO_NAME = "mlora-demo"
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Different ranks on purpose: the default server then exercises rank heterogeneity.
ADAPTER_SPECS: dict[str, dict] = {
    "upper": dict(r=4, lora_alpha=8, steps=400, lr=1e-2, batch=32),
    "rot13": dict(r=8, lora_alpha=16, steps=500, lr=1e-2, batch=32),
    "reverse": dict(r=16, lora_alpha=32, steps=1500, lr=5e-3, batch=32),
}
BASE_STEPS, BASE_LR, BASE_BATCH = 1500, 3e-3, 64
CHAT_TEMPLATE = "{{ bos_token }}{{ messages[-1]['content'] }}{{ eos_token }}"


def model_config():
    """The demo architecture: a 4-layer Llama with GQA, small enough to ship in the wheel."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def save_demo_tokenizer(directory: Path) -> None:
    """The byte tokenizer, with a post-processor that wraps every prompt as `<s> text </s>`."""
    from tokenizers import Tokenizer, processors

    save_byte_tokenizer(directory, chat_template=CHAT_TEMPLATE)
    path = directory / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)],
    )
    tok.save(str(path))
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # The generic class name also loads with transformers 4.x; the length is the model's.
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=model_config().max_position_embeddings)
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def encode(text: str) -> list[int]:
    """Byte ids of `text` (what the demo tokenizer gives with add_special_tokens=False)."""
    return [b + BYTE_OFFSET for b in text.encode("utf-8")]


def make_batch(task: str, rng: random.Random, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels; only the completion and its EOS carry loss."""
    rows, labels = [], []
    for _ in range(batch):
        s = copy_training_string(rng) if task == "copy" else training_string(rng)
        prompt = [BOS_ID] + encode(s) + [EOS_ID]
        answer = encode(target(task, s)) + [EOS_ID]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    ids = torch.full((batch, width), PAD_ID, dtype=torch.long)  # ids: [B, L]
    lab = torch.full((batch, width), -100, dtype=torch.long)  # lab: [B, L]
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(l)] = torch.tensor(l)
    return ids, lab


def train_loop(model, params, task: str, *, steps: int, lr: float, batch: int, seed: int, log_every: int = 100) -> None:
    """AdamW with linear warmup and cosine decay on freshly sampled batches of `task`."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    model.train()
    t0, running = time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        ids, lab = make_batch(task, rng, batch)
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if step % log_every == 0 or step == steps:
            n = log_every if step % log_every == 0 else step % log_every
            print(f"  [{task}] step {step}/{steps} loss {running / n:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
            running = 0.0
    model.eval()


@torch.no_grad()
def hf_generate(model, prompts: list[str], adapter_names: list[str] | None = None, max_new_tokens: int = 24) -> list[str]:
    """Greedy completions with transformers (PEFT `adapter_names` for mixed batches).

    Prompts are grouped by length so no padding is needed; the rows of a group still mix
    adapters when `adapter_names` does.
    """
    out: list[str] = [""] * len(prompts)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p.encode("utf-8")), []).append(i)
    for idx in groups.values():
        ids = torch.tensor([[BOS_ID] + encode(prompts[i]) + [EOS_ID] for i in idx])  # ids: [B, L]
        kw = {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in idx]}
        gen = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **kw,
        )
        for row, i in zip(gen[:, ids.shape[1]:].tolist(), idx):
            if EOS_ID in row:
                row = row[: row.index(EOS_ID)]
            out[i] = bytes(t - BYTE_OFFSET for t in row if t >= BYTE_OFFSET).decode("utf-8", "replace")
    return out


def accuracy(task: str | None, prompts: list[str], completions: list[str]) -> float:
    """Exact-match rate of `completions` against `task` applied to `prompts`."""
    return sum(c == target(task, p) for p, c in zip(prompts, completions)) / len(prompts)


def train_base(model_dir: Path, *, seed: int = 0, steps: int = BASE_STEPS) -> None:
    """Train the copy model from scratch (all parameters) and save it with its tokenizer."""
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config()).float()
    print(f"base: {sum(p.numel() for p in model.parameters()):,} parameters")
    train_loop(model, list(model.parameters()), "copy", steps=steps, lr=BASE_LR, batch=BASE_BATCH, seed=seed)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False, max_new_tokens=24
    )
    model.save_pretrained(str(model_dir), safe_serialization=True)
    save_demo_tokenizer(model_dir)


def train_adapter(model_dir: Path, adapter_dir: Path, task: str, *, seed: int = 0) -> None:
    """Train one LoRA adapter for `task` on the frozen base and save it with PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    spec = ADAPTER_SPECS[task]
    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                     target_modules=LORA_MODULES, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"adapter {task}: r={spec['r']}, {sum(p.numel() for p in params):,} trainable parameters")
    train_loop(model, params, task, steps=spec["steps"], lr=spec["lr"], batch=spec["batch"], seed=seed + 1)
    model.peft_config["default"].base_model_name_or_path = DEMO_NAME
    model.save_pretrained(str(adapter_dir), save_embedding_layers=False)  # no embedding changes: skip the hub lookup
    (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model card template
    stable_adapter_config(adapter_dir)


def stable_adapter_config(adapter_dir: Path) -> None:
    """Sort target_modules (PEFT writes a set's order, which changes per process) so re-runs
    give byte-identical files."""
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def evaluate_dir(out: Path, n: int = 500, *, seed: int = 1234) -> dict[str, float]:
    """Held-out exact match of the base and every adapter, one by one and in one mixed batch."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    prompts = heldout_strings(n, seed=seed)
    base = LlamaForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32).eval()
    res = {"base": accuracy(None, prompts, hf_generate(base, prompts))}
    present = [nm for nm in ADAPTER_TASKS if (out / "adapters" / nm / "adapter_config.json").is_file()]
    if not present:
        return res
    model = PeftModel.from_pretrained(base, str(out / "adapters" / present[0]), adapter_name=present[0])
    for name in present[1:]:
        model.load_adapter(str(out / "adapters" / name), adapter_name=name)
    for name in present:
        model.set_adapter(name)
        res[name] = accuracy(name, prompts, hf_generate(model, prompts))
    # One mixed batch: every prompt under every adapter and the base ("__base__" in PEFT).
    names = [None, *present]
    mixed_prompts = [p for p in prompts[:100] for _ in names]
    mixed_names = [nm for _ in prompts[:100] for nm in names]
    comps = hf_generate(model, mixed_prompts, adapter_names=[nm or "__base__" for nm in mixed_names])
    res["mixed"] = sum(c == target(nm, p) for p, nm, c in zip(mixed_prompts, mixed_names, comps)) / len(comps)
    return res


def evaluate_engine(out: Path, n: int = 500, *, seed: int = 1234) -> dict[str, float]:
    """The same held-out exact match through mlora's own engine: all four in one mixed batch."""
    from engine import LLM, SamplingParams

    prompts = heldout_strings(n, seed=seed)
    loras = tuple((nm, str(out / "adapters" / nm)) for nm in ADAPTER_TASKS if (out / "adapters" / nm).is_dir())
    llm = LLM(str(out / "model"), enable_lora=bool(loras), loras=loras)
    names = [None, *(nm for nm, _ in loras)]
    outs = llm.generate([p for p in prompts for _ in names], SamplingParams(temperature=0, max_tokens=24),
                        adapters=[nm for _ in prompts for nm in names])
    return {nm or "base": accuracy(nm, prompts, [o.text for o in outs[i :: len(names)]]) for i, nm in enumerate(names)}


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m engine.demo.train`."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                    help="directory for model/ and adapters/ (default: the shipped files in this package)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["base", *ADAPTER_TASKS], action="append",
                    help="train only these parts (repeatable; adapters need an existing base)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 (default) reproduces the shipped files and was 3.5x faster "
                         "per step than 2 on a busy shared 2-core machine")
    ap.add_argument("--engine", action="store_true", help="also evaluate through mlora's engine")
    ap.add_argument("--eval-only", action="store_true", help="skip training, just evaluate DIR")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out: Path = args.out
    parts = args.only or ["base", *ADAPTER_TASKS]
    if not args.eval_only:
        if "base" in parts:
            (out / "model").mkdir(parents=True, exist_ok=True)
            train_base(out / "model", seed=args.seed)
        for name in ADAPTER_TASKS:
            if name in parts:
                train_adapter(out / "model", out / "adapters" / name, name, seed=args.seed)
    train_s = time.perf_counter() - t0
    res = evaluate_dir(out)
    print("transformers+PEFT:", json.dumps({k: round(v, 4) for k, v in res.items()}))
    if args.engine:
        print("mlora engine (mixed batch):", json.dumps({k: round(v, 4) for k, v in evaluate_engine(out).items()}))
    print(f"training took {train_s:.0f}s; evaluation {time.perf_counter() - t0 - train_s:.0f}s; files in {out}")


if __name__ == "__main__":
    main()
