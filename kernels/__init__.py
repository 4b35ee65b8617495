"""LoRA shrink/expand ops: Triton kernels for CUDA, a pure-torch reference, a fast CPU path.

    from kernels import lora_shrink, lora_expand, LoraBatchMeta
    meta = LoraBatchMeta.from_token_lora_slots(token_lora_slots)          # once per engine step
    h = lora_shrink(x, lora_a, token_lora_slots, scales, meta=meta)  # h: [T, R]
    lora_expand(h, lora_b, token_lora_slots, out, meta=meta, out_offset=0)   # out[:, off:off+N] += ...

The engine imports only this package's public names, never triton itself: `import kernels`
works without triton, which is imported on the first Triton launch.
"""

from kernels.meta import ComposedRows, KernelError, LoraBatchMeta, LoraMetaBuffers
from kernels.ops import BACKENDS, lora_compose, lora_expand, lora_expand_slices, lora_shrink, lora_shrink_slices

__all__ = ["BACKENDS", "ComposedRows", "KernelError", "LoraBatchMeta", "LoraMetaBuffers", "lora_compose", "lora_expand",
           "lora_expand_slices", "lora_shrink", "lora_shrink_slices"]
