"""`--verify`: the merged model must give the logits of base + adapter(s), within a tolerance.

Two references, chosen per merge:
  mlora-engine       Llama-family base (what the engine serves) and one adapter at weight 1 that
                     the slot engine can serve: the merged model and base+adapter both run in
                     mlora's own engine (float32), so the check covers what `mlora serve` will do.
  transformers+peft  everything else (GPT-2 and other architectures, DoRA / modules_to_save /
                     embedding LoRA, several weighted adapters): the reference is PEFT's unmerged
                     model in float32 with every adapter active and each scaling multiplied by
                     its weight, the merged model is loaded by transformers.
Weighted merges of DoRA or modules_to_save adapters have no unmerged reference (they are not
linear in the weight), so `--verify` refuses them up front.
"""

from __future__ import annotations

import gc
from collections import Counter
from pathlib import Path

import torch

from engine.errors import ConfigError, MloraError
from engine.merge.config import DEFAULT_TOLERANCE, VerifyResult
from engine.merge.plan import MergePlan

NUM_PROMPTS = 3
_NAME = "merge-verify"


def check_verifiable(plan: MergePlan) -> None:
    """ConfigError (before any work) if no reference model exists for this merge."""
    weighted = len(plan.adapters) > 1 or plan.adapters[0].weight != 1.0
    nonlinear = {"modules_to_save" if c.kind == "replace" else "DoRA" for sh in plan.shards for t in sh.tensors for c in t.contributions
                 if c.is_dora or c.kind == "replace"}  # fmt: skip
    if weighted and nonlinear:
        raise ConfigError(
            f"--verify cannot check a weighted merge of adapters with {' or '.join(sorted(nonlinear))}: their effect is not linear in the weight, so no unmerged reference exists",
            hint="merge without --verify, or verify each adapter alone at weight 1",
        )


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 16, 3)][:NUM_PROMPTS]


def _out_dtype(plan: MergePlan, dtype: str) -> str:
    if dtype != "auto":
        return dtype
    counts = Counter(t.dtype for sh in plan.shards for t in sh.tensors if t.dtype in DEFAULT_TOLERANCE)
    return counts.most_common(1)[0][0] if counts else "float32"


def verify_merge(plan: MergePlan, merged_dir: Path, tolerance: float | None, dtype: str) -> VerifyResult:
    """Compare the merged model in `merged_dir` with base+adapters on a few prompts."""
    tol = DEFAULT_TOLERANCE[_out_dtype(plan, dtype)] if tolerance is None else float(tolerance)
    vocab = int(plan.base_config.get("vocab_size") or 0)
    if vocab <= 0:
        raise ConfigError("--verify: the base config has no vocab_size")
    prompts = _prompts(vocab)
    ref, merged, method = None, None, "mlora-engine"
    if _engine_can_serve(plan):
        try:
            ref = _engine_logits(plan.base_dir, prompts, plan.adapters[0].path)
        except MloraError:
            ref = None  # the slot engine cannot serve this adapter: fall back to PEFT
        if ref is not None:
            merged = _engine_logits(merged_dir, prompts, None)
    if ref is None:
        method = "transformers+peft"
        ref = _peft_logits(plan, prompts)
        merged = _hf_logits(merged_dir, prompts)
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, merged))
    return VerifyResult(method=method, max_abs_diff=diff, tolerance=tol, prompts=len(prompts), passed=diff <= tol)


def _engine_can_serve(plan: MergePlan) -> bool:
    from engine.loader import SUPPORTED_ARCHS

    archs = plan.base_config.get("architectures") or []
    return len(plan.adapters) == 1 and plan.adapters[0].weight == 1.0 and any(a in SUPPORTED_ARCHS for a in archs)


def _engine_logits(model_dir: Path, prompts: list[list[int]], adapter: Path | None) -> list[torch.Tensor]:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    loras = ((_NAME, str(adapter)),) if adapter is not None else ()
    rank = 16
    if adapter is not None:
        from engine.adapters import load_adapter

        rank = max(16, load_adapter(adapter).max_rank)
    llm = LLM(str(model_dir), dtype="float32", device="cpu", enable_lora=adapter is not None, max_loras=1,
              max_lora_rank=rank, loras=loras, num_kv_blocks=16)  # fmt: skip
    try:
        slot, stacks = -1, None
        if adapter is not None:  # one request makes the adapter resident in a slot
            llm.generate([prompts[0]], SamplingParams(max_tokens=1, temperature=0.0), adapters=_NAME)
            slot, stacks = llm.engine.lora.cache.slot_of(_NAME), llm.engine.lora.slots
            if slot is None:
                raise ConfigError("--verify: the adapter did not load into an engine slot")
        with torch.no_grad():
            return [llm.engine.runner.score(p, slot, stacks).float().cpu() for p in prompts]
    finally:
        del llm
        gc.collect()


def _peft_logits(plan: MergePlan, prompts: list[list[int]]) -> list[torch.Tensor]:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(plan.base_dir), dtype=torch.float32)
    names = [f"a{i}" for i in range(len(plan.adapters))]
    model = PeftModel.from_pretrained(base, str(plan.adapters[0].path), adapter_name=names[0])
    for name, a in zip(names[1:], plan.adapters[1:]):
        model.load_adapter(str(a.path), adapter_name=name)
    if len(names) > 1:
        model.base_model.set_adapter(names)
    for module in model.modules():  # W + sum_i w_i * delta_i: scale each adapter's LoRA branch by w_i
        if isinstance(module, LoraLayer):
            for name, a in zip(names, plan.adapters):
                if name in module.scaling:
                    module.scaling[name] *= a.weight
    try:
        return _run(model.eval(), prompts)
    finally:
        del model, base
        gc.collect()


def _hf_logits(model_dir: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    try:
        return _run(model, prompts)
    finally:
        del model
        gc.collect()


def _run(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].float() for p in prompts]
