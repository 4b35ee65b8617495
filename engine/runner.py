"""The single tensor boundary: turns a scheduled step (Python lists) into tensors, runs the model,
samples, and returns plain token ids.

Per step it builds, once: the flat token id / position / kv_slot tensors and the rows whose logits
are needed (the last token of each sampling sequence), all four filled into one buffer allocated at
the largest step and copied once (pinned and non-blocking on CUDA); the attention metadata (one
decode gather index + mask reused by every layer, filled the same way into `AttentionMetaBuffers`);
and the LoRA context (token_lora_slots + the kernels' LoraBatchMeta, in `LoraMetaBuffers`). Token
layout of a step: [multi-token chunks (prefills)..., single-token rows (decodes)...], each group
ordered by lora_slot.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import ComposedRows, LoraBatchMeta, LoraMetaBuffers
from kernels.dtypes import TORCH_DTYPES
from kernels.tuning import cpu_auto_dtype

from engine.attention import AttentionMetaBuffers, AttentionMetadata, PrefillSpan
from engine.planning.budget import ModelDims, kv_bytes_per_token, total_slot_bytes
from engine.config import EngineConfig
from engine.errors import ConfigError
from engine.model import LlamaModel, LoraContext, LoraStacks, ModelArgs, plain_weight
from engine.outputs import Logprob, TokenLogprob
from engine.sampler import sample
from engine.scheduler import ScheduledSeq, SchedulerOutput
from engine.sequence import Sequence

if TYPE_CHECKING:
    from engine.lora.engine import LoraStep

CPU_KV_CAP_BYTES = 2 << 30  # default KV pool cap on CPU when no size is given
PROMPT_LOGPROBS_ROWS = 512  # prompt positions scored at once: [512, V] fp32 logits (~300 MB at V = 152k)
# SDPA backends on CUDA: not cuDNN, torch's first pick for masked attention on Hopper, which builds an
# execution plan per new shape: ~10 ms of CPU per layer call when the decode key length grows by one
# every step (H200, llama-1b batch 64: 130 ms/step, 95% of it there; see benchmarks/profile_decode.py).
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_backends(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The attention backends the model may use on `device` (a context for the forward)."""
    return sdpa_kernel(_CUDA_SDPA_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available", hint="use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, hf_config: Any, device: torch.device) -> torch.dtype:
    """'auto' = on CPU the faster dtype for this CPU (`kernels.tuning.cpu_auto_dtype`), the checkpoint's dtype on CUDA."""
    if dtype != "auto":
        return TORCH_DTYPES[dtype]
    if device.type == "cpu":
        return cpu_auto_dtype()
    raw = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "bfloat16")
    return TORCH_DTYPES.get(raw.replace("torch.", ""), torch.bfloat16)


def _slot_reserve(config: EngineConfig, dims: ModelDims, dtype: torch.dtype) -> int:
    """Bytes of the LoRA slot stacks, allocated after the KV pool (0 without LoRA)."""
    if not config.enable_lora:
        return 0
    lora_dtype = str(dtype) if config.lora_dtype == "auto" else config.lora_dtype
    return total_slot_bytes(dims, max_loras=config.max_loras, max_rank=config.max_lora_rank, dtype=lora_dtype)


@dataclass
class KVPlan:
    num_blocks: int
    max_model_len: int


def plan_kv(config: EngineConfig, dims: ModelDims, args: ModelArgs, dtype: torch.dtype, device: torch.device) -> KVPlan:
    """How many KV blocks to allocate and the resulting max_model_len (see EngineConfig)."""
    per_token = kv_bytes_per_token(dims, str(dtype))
    per_block = per_token * config.block_size
    if config.gpu_memory_utilization is not None and device.type != "cuda":
        logging.getLogger("mlora.engine").warning(
            "gpu_memory_utilization applies to CUDA only: ignored on %s (size the KV cache with "
            "kv_cache_memory_bytes / --kv-cache-memory-bytes or num_kv_blocks / --num-kv-blocks)", device.type)
    limit = args.max_position_embeddings
    if args.sliding_window:
        limit = min(limit, args.sliding_window)  # attention is exact only inside the window
    if config.max_model_len is not None and config.max_model_len > limit:
        raise ConfigError(f"max_model_len {config.max_model_len} exceeds the model's limit of {limit} tokens")
    want_len = config.max_model_len or limit
    if config.num_kv_blocks is not None:
        blocks = config.num_kv_blocks
    elif config.kv_cache_memory_bytes is not None:
        blocks = config.kv_cache_memory_bytes // per_block
    elif config.gpu_memory_utilization is not None and device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reserve = _slot_reserve(config, dims, dtype)
        # the weights are loaded by now: they are in total - free, with whatever else holds the GPU
        cap = int(total * config.gpu_memory_utilization) - (total - free) - reserve
        if cap < per_block:
            raise ConfigError(
                f"gpu_memory_utilization {config.gpu_memory_utilization} leaves no room for the KV cache "
                f"({(total - free) / 2**30:.1f} GiB of {total / 2**30:.1f} GiB already in use)",
                hint="raise --gpu-memory-utilization, or lower --max-loras / --max-lora-rank")
        blocks = cap // per_block
    else:
        want = math.ceil(config.max_num_seqs * want_len / config.block_size)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            cap = int((free - _slot_reserve(config, dims, dtype)) * 0.85)
        else:
            cap = CPU_KV_CAP_BYTES
        blocks = max(1, min(want, cap // per_block))
    if blocks < 1:
        raise ConfigError(f"the KV cache budget holds no block ({per_block} bytes per block of {config.block_size} tokens)")
    capacity = blocks * config.block_size
    if capacity < want_len:
        if config.max_model_len is not None:
            raise ConfigError(
                f"KV cache holds {capacity} tokens, less than max_model_len {config.max_model_len}",
                hint="raise num_kv_blocks / kv_cache_memory_bytes or lower max_model_len",
            )
        want_len = capacity
    return KVPlan(num_blocks=blocks, max_model_len=want_len)


@dataclass
class _StepLayout:
    """One step as flat lists, in the runner's row order (see `ModelRunner._layout`)."""

    ids: list[int] = field(default_factory=list)  # [T] token ids
    positions: list[int] = field(default_factory=list)  # [T]
    kv_slots: list[int] = field(default_factory=list)  # [T] KV-cache position each token's K/V is written to
    token_lora_slots: list[int] = field(default_factory=list)  # [T] adapter row per token (-1 = base), LoRA steps only
    composed_rows: list[tuple[int, tuple[tuple[int, float], ...]]] = field(default_factory=list)  # (row, pairs)
    prefills: list[PrefillSpan] = field(default_factory=list)
    prefill_seqs: list[Sequence] = field(default_factory=list)  # the sequence of each prefill span
    decode_seqs: list[Sequence] = field(default_factory=list)  # one row each, after the prefills
    sample_rows: list[int] = field(default_factory=list)  # row of each sampling item's last token
    sample_items: list[int] = field(default_factory=list)  # its index in `out.scheduled`
    prompt_lp: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, first row, rows) to score


class ModelRunner:
    """Owns the model weights, the KV pool and the per-request samplers' generators."""

    def __init__(self, config: EngineConfig, hf_config: Any, model_path: Path) -> None:
        self.config = config
        if config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, hf_config, self.device)
        self.lora_meta = LoraMetaBuffers(self.device, config.max_num_batched_tokens)  # step LoRA layout, reused
        self.args = ModelArgs.from_hf_config(hf_config)
        self.dims = ModelDims.from_hf_config(hf_config)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)  # allocate the weights in their final dtype and place
        try:
            with torch.device(self.device):
                model = LlamaModel(self.args)
        finally:
            torch.set_default_dtype(previous)
        model.load_weights(model_path)
        model.prepack_cpu_linears()  # CPU: base linears + lm_head in oneDNN's packed layout (kernels.tuning)
        self.model = model.eval()
        plan = plan_kv(config, self.dims, self.args, self.dtype, self.device)
        self.num_blocks, self.max_model_len = plan.num_blocks, plan.max_model_len
        self.block_size = config.block_size
        self.model.init_rope(hf_config, self.max_model_len)
        args = self.args
        # kv_cache: [layers, K/V, num_blocks * block_size + 1, kv_heads, head_dim]. The last kv_slot
        # (`zero_kv_slot`) belongs to no block, is never written and stays zero: every padded or
        # not-yet-written position of a gather reads it, so no arithmetic ever touches K/V another
        # request (or an earlier owner of a reused block) left behind (0 * NaN would be NaN even
        # under a mask).
        self.zero_kv_slot = self.num_blocks * self.block_size
        self.kv_cache = torch.zeros(
            args.num_layers, 2, self.zero_kv_slot + 1, args.num_kv_heads, args.head_dim, dtype=self.dtype, device=self.device
        )
        self._alloc_step_buffers(4 * config.max_num_batched_tokens)  # ids, positions, kv_slots, sample rows
        self.attn_meta = AttentionMetaBuffers(self.device, block_size=self.block_size, zero_kv_slot=self.zero_kv_slot,
                                              max_seqs=config.max_num_seqs, max_model_len=self.max_model_len,
                                              kv_slot_shape=(args.num_kv_heads, args.head_dim), kv_dtype=self.dtype)
        self._seed_source = torch.Generator().manual_seed(config.seed)

    def base_weight(self, layer: int, module: str) -> torch.Tensor:
        """The base linear W [out, in] of (layer, HF module name): a view into the fused weight."""
        lin_name, offset = self.model.module_slice(module)
        lin = getattr(self.model.layers[layer], lin_name)
        n = dict(lin.parts)[module]
        return plain_weight(lin.weight)[offset : offset + n]  # a packed W: unpacked into a temporary copy

    # -- per-request state ---------------------------------------------------------------------
    def generator(self, seq: Sequence) -> torch.Generator:
        """`seq`'s sampling generator, seeded at its first sampled token (kept across preemptions)."""
        if seq.generator is None:
            seed = seq.params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source))
            seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        return seq.generator

    def release(self, seq: Sequence) -> None:
        """Forget a finished/aborted sequence's generator."""
        seq.generator = None

    @torch.inference_mode()
    def scrub(self, block_table: list[int]) -> None:
        """Zero the K/V of these blocks (a request that failed may have left NaN/Inf there)."""
        if block_table:
            bs = self.block_size
            blocks = torch.tensor(block_table, dtype=torch.long, device=self.device)
            kv_slots = (blocks[:, None] * bs + torch.arange(bs, device=self.device)).reshape(-1)
            self.kv_cache.index_fill_(2, kv_slots, 0)

    # -- one step --------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(
        self, out: SchedulerOutput, lora: LoraStep | None = None
    ) -> tuple[list[int | None], list[TokenLogprob | None]]:
        """Forward the scheduled tokens; `lora` holds each scheduled item's lora_slot (-1 = base) and
        composed items' (lora_slot, weight) pairs; None = no adapter in this step (decided by the LoRA
        engine, not here).

        Returns (token or None, logprob or None) per scheduled item, in `out.scheduled` order; a
        sampling item gets None when its logits were non-finite (the engine ends that request).
        """
        items = out.scheduled
        step = self._layout(items, lora)
        input_ids, positions, kv_slots, sample_rows = self._upload(step)
        meta = self._attention_meta(step, kv_slots)
        ctx = self._lora_context(step, lora, meta) if lora is not None else None
        with sdpa_backends(self.device):
            hidden = self.model(input_ids, positions, meta, self.kv_cache, ctx)  # [T, hidden]
        for seq, row, count in step.prompt_lp:  # in slices: [rows, V] fp32 logits stay small for long prompts
            for r in range(row, row + count, PROMPT_LOGPROBS_ROWS):
                self._prompt_logprobs(seq, hidden[r : min(r + PROMPT_LOGPROBS_ROWS, row + count)])
        tokens: list[int | None] = [None] * len(items)
        logprobs: list[TokenLogprob | None] = [None] * len(items)
        if step.sample_items:
            logits = self.model.logits(hidden.index_select(0, sample_rows))  # [N, V] fp32
            seqs = [items[i].seq for i in step.sample_items]
            gens = [None if s.params.greedy else self.generator(s) for s in seqs]
            toks, lps = sample(logits, [s.params for s in seqs], gens, seqs)
            for i, tok, lp in zip(step.sample_items, toks, lps):
                tokens[i], logprobs[i] = tok, lp
        return tokens, logprobs

    def _layout(self, items: list[ScheduledSeq], lora: LoraStep | None) -> _StepLayout:
        """The step as flat Python lists, rows re-ordered from the scheduler's order: prefill chunks
        first, then decodes, because attention takes the step as [prefill spans..., decode rows...]
        (one padded gather for every decode row from `decode_start`); inside each group rows of one
        lora_slot are contiguous, so the LoRA ops run one matmul per adapter on zero-copy row slices.
        Results go back in the scheduler's order (`sample_items` maps rows to items)."""
        key = (lambda i: lora.lora_slots[i]) if lora is not None else (lambda i: 0)
        order = sorted((i for i, it in enumerate(items) if it.num_tokens > 1), key=key)
        order += sorted((i for i, it in enumerate(items) if it.num_tokens == 1), key=key)
        step, bs = _StepLayout(), self.block_size
        for i in order:
            it = items[i]
            seq, n, start = it.seq, it.num_tokens, it.seq.num_computed_tokens
            t0 = len(step.ids)
            step.ids.extend(seq.token_ids[start : start + n])
            step.positions.extend(range(start, start + n))
            bt = seq.block_table
            step.kv_slots.extend(bt[p // bs] * bs + p % bs for p in range(start, start + n))
            if lora is not None:
                step.token_lora_slots.extend([lora.lora_slots[i]] * n)
                if lora.compose and i in lora.compose:
                    step.composed_rows.extend((t, lora.compose[i]) for t in range(t0, t0 + n))
            if n > 1:
                step.prefills.append(PrefillSpan(start=t0, end=t0 + n, ctx_start=start))
                step.prefill_seqs.append(seq)
            else:
                step.decode_seqs.append(seq)
            if it.sample:
                step.sample_rows.append(len(step.ids) - 1)
                step.sample_items.append(i)
            if seq.prompt_logprobs is not None:
                # positions p in this chunk whose next token is a prompt token not yet scored
                # (after a preemption the prompt is recomputed but scored only once)
                first = max(start, len(seq.prompt_logprobs) - 1)
                last = min(start + n, seq.num_prompt_tokens - 1)
                if last > first:
                    step.prompt_lp.append((seq, t0 + first - start, last - first))
        return step

    def _alloc_step_buffers(self, size: int) -> None:
        """The int64 step inputs, allocated once at the largest step: a host buffer (pinned on CUDA) filled
        from the lists, and on CUDA a device buffer it is copied to with one non-blocking copy."""
        cuda = self.device.type == "cuda"
        self._host = torch.empty(size, dtype=torch.long, pin_memory=cuda)
        self._host_np = self._host.numpy()  # fills from a Python list ~3x faster than torch.tensor(list)
        self._dev = torch.empty(size, dtype=torch.long, device=self.device) if cuda else self._host
        self._copied: torch.cuda.Event | None = None  # the last copy out of `_host` (reused only once it is done)

    def _upload(self, step: _StepLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids [T], positions [T], kv_slots [T] and sample rows [N] on the device: views of one buffer."""
        t, n = len(step.ids), len(step.sample_rows)
        size = 3 * t + n
        if size > self._host.numel():  # larger than max_num_batched_tokens (score() paths, tests): grow once
            self._alloc_step_buffers(size)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy may still read the pinned buffer
        self._host_np[:size] = step.ids + step.positions + step.kv_slots + step.sample_rows
        flat = self._dev[:size]
        if self._dev is not self._host:
            flat.copy_(self._host[:size], non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        return flat[:t], flat[t : 2 * t], flat[2 * t : 3 * t], flat[3 * t :]

    def _attention_meta(self, step: _StepLayout, kv_slots: torch.Tensor) -> AttentionMetadata:
        """Prefill spans (fresh prompts padded into one batch) and one padded gather for all decode rows,
        filled into the buffers allocated once (`engine.attention.AttentionMetaBuffers`)."""
        return self.attn_meta.build(
            kv_slots, step.prefills, [s.block_table for s in step.prefill_seqs],
            [s.block_table for s in step.decode_seqs], [s.num_computed_tokens + 1 for s in step.decode_seqs])

    def _lora_context(self, step: _StepLayout, lora: LoraStep, meta: AttentionMetadata) -> LoraContext:
        """Once per step; prefill chunks and decode rows get separate CPU layouts (kernels.meta "split")."""
        split = meta.decode_start if step.prefills and step.decode_seqs else None
        lmeta = self.lora_meta.build(step.token_lora_slots, split=split)
        # composed rows: one virtual row per component (kernels.ComposedRows); None keeps single-adapter steps as they were
        comp = ComposedRows.from_pairs(step.composed_rows, device=self.device) if step.composed_rows else None
        return LoraContext(token_lora_slots=lmeta.token_lora_slots, meta=lmeta, stacks=lora.stacks, composed=comp)  # [T] int32

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """Append to seq.prompt_logprobs the entries of the next len(hidden) prompt tokens (vLLM's format)."""
        assert seq.prompt_logprobs is not None
        start = len(seq.prompt_logprobs)  # index of the first prompt token these rows predict
        lp = torch.log_softmax(self.model.logits(hidden), dim=-1)  # [R, V] fp32
        target = torch.tensor(seq.prompt_token_ids[start : start + lp.shape[0]], dtype=torch.long, device=lp.device)
        tgt = lp.gather(1, target[:, None])  # [R, 1]
        rank = (lp >= tgt).sum(dim=-1)  # vLLM's rank: 1 = the most likely token
        k = seq.params.prompt_logprobs or 0
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], target[:, None][:, :0])
        for t, v, r, tv, ti in zip(target.tolist(), tgt[:, 0].tolist(), rank.tolist(), top_v.tolist(), top_i.tolist()):
            entry = {t: Logprob(v, rank=r)}
            for j, (tid, val) in enumerate(zip(ti, tv)):
                entry.setdefault(tid, Logprob(val, rank=j + 1))
            seq.prompt_logprobs.append(entry)

    @torch.inference_mode()
    def score(self, token_ids: list[int], lora_slot: int = -1, stacks: LoraStacks | None = None) -> torch.Tensor:
        """fp32 logits [T, V] of every position of one prompt (a scratch KV, not the pool).

        For tests and scoring; `lora_slot` >= 0 applies that adapter row to every token.
        """
        t, args, dev = len(token_ids), self.args, self.device
        scratch = torch.zeros(args.num_layers, 2, t, args.num_kv_heads, args.head_dim, dtype=self.dtype, device=dev)
        kv_slots = torch.arange(t, device=dev)  # a scratch KV of exactly this prompt
        meta = AttentionMetadata(slot_mapping=kv_slots, prefills=[PrefillSpan(0, t, 0)], decode_start=t)
        lora = None
        if stacks is not None and lora_slot >= 0:
            ts = torch.full((t,), lora_slot, dtype=torch.int32, device=dev)
            lora = LoraContext(token_lora_slots=ts, meta=LoraBatchMeta.from_token_lora_slots(ts), stacks=stacks)
        ids = torch.tensor(token_ids, dtype=torch.long, device=dev)
        with sdpa_backends(dev):
            hidden = self.model(ids, torch.arange(t, device=dev), meta, scratch, lora)
        return self.model.logits(hidden)
