"""How large a LoRA adapter's numbers may be: the one owner of "are these values safe to serve".

A slot computes `delta = scaling * B @ (A @ x)` in the serving dtype for every token of the
adapter's requests. Finite weights are not enough: `upper` with B x 1e30 (or lora_alpha 1e30)
is finite in fp32, yet its delta overflows and its NaN reaches everything the request touches.

The bound (`lora_gain`): for any input x, `|delta|_inf <= |scaling| * ||B||_inf * ||A||_inf * |x|_inf`,
where `||M||_inf` is the largest absolute row sum (the operator norm for the max-norm; exact, no
assumption on the data). The gain is the most the delta can multiply the largest activation by.
Trained adapters are far below `MAX_LORA_GAIN`: the demo adapters have 66-193, a PEFT adapter
starts at 0 (B = 0) and a kaiming-initialised A row sums to ~0.5 * sqrt(in) (32 at in = 4096), so
real fine-tunes sit around 10-1e3. A gain of 1e6 turns an activation of 100 into 1e8, whose square
(q . k, gate * up) is still finite in fp32/bf16 (< 3.4e38); beyond that the adapter is corrupt or
hostile, whatever its dtype. Scaling alone is bounded too (`MAX_LORA_SCALING`; PEFT's alpha/r is
~0.25-32) because a zero B (a freshly initialised adapter) has gain 0 whatever the scaling, and an
fp32 scale of inf would still turn 0 * inf into NaN.

Values are checked after the cast to the serving dtype (a float64 1e300 is inf in fp32/bf16/fp16).
`mlora validate` uses bfloat16 when no dtype is given: its range is the narrower of bf16/fp32.
"""

from __future__ import annotations

import math

import torch

MAX_LORA_GAIN = 1e6  # |scaling| * ||B||_inf * ||A||_inf: see the module docstring
MAX_LORA_SCALING = 1e4  # |alpha / r| (or alpha / sqrt(r)): see the module docstring


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in `t`. Fast screen first: any NaN/Inf makes the fp32 sum non-finite, so a finite
    sum proves the tensor finite; only a non-finite (or overflowing) sum pays the elementwise check."""
    return math.isfinite(float(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())  # float(): no 0-d isfinite op


def lora_gain(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> float:
    """|scaling| * ||B||_inf * ||A||_inf in float64 (inf if any factor is): the largest factor by which
    the delta `scaling * B @ A` can multiply an input's largest absolute value."""
    a = lora_a.detach().to(torch.float64).abs().sum(dim=1).max() if lora_a.numel() else torch.tensor(0.0)
    b = lora_b.detach().to(torch.float64).abs().sum(dim=1).max() if lora_b.numel() else torch.tensor(0.0)
    return abs(float(scaling)) * float(b) * float(a)


def module_value_issue(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dtype: torch.dtype) -> str | None:
    """Why one module's values are unsafe to serve in `dtype` (None: safe). See the module docstring."""
    if not math.isfinite(scaling) or abs(scaling) > MAX_LORA_SCALING:
        return (f"scaling (lora_alpha / r) is {scaling:.3g}, beyond the limit of {MAX_LORA_SCALING:.0e} "
                "(PEFT adapters use about 0.25-32): lora_alpha is corrupt or hostile")
    for role, t in (("lora_A", lora_a), ("lora_B", lora_b)):
        if not all_finite(t):
            return f"{role} holds NaN/Inf values"
        if t.dtype != dtype and not all_finite(t.to(dtype)):
            return f"{role} overflows to Inf when cast to the serving dtype {str(dtype).replace('torch.', '')}"
    gain = lora_gain(lora_a.to(dtype), lora_b.to(dtype), scaling)
    if not gain <= MAX_LORA_GAIN:
        return (f"the LoRA gain |scaling| * ||B||_inf * ||A||_inf is {gain:.3g}, beyond the limit of {MAX_LORA_GAIN:.0e} "
                "(trained adapters: about 10-1e3): its delta would blow up activations, so the weights or lora_alpha "
                "are corrupt or hostile")
    return None
