"""Planning before serving: memory math, `mlora budget`'s plan, trace replay and the model/GPU presets.

- `budget`: the memory math, the one source of truth for sizes (also used by the LoRA slot allocator).
- `budget_plan`: `mlora budget`'s plan (weights, adapter slots, KV cache) for a model on a device.
- `trace`: working-set replay of a request trace (how often an adapter must be loaded).
- `presets`: public config facts of popular base models and GPU memory sizes, as JSON.

None of these import torch or touch a device.
"""
