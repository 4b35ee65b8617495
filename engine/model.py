"""A compact Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) on Hugging Face weights.

All of a step's tokens are flattened to x: [T, hidden], so every linear layer is ONE matmul
for the whole batch (prefill and decode rows together, every adapter together). q/k/v and
gate/up are fused column-wise; each fused part keeps its HF module name so a LoRA context can
add per-token adapter deltas into its column slice (`kernels.lora_shrink_slices` /
`lora_expand_slices`: one call per fused projection).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kernels import lora_compose, lora_expand_slices, lora_shrink_slices
from kernels.tuning import PREPACK_BATCH_HINT, cpu_prepack, small_batch_path

from engine.attention import AttentionMetadata, paged_attention
from engine.errors import ConfigError
from engine.loader import iter_weights, model_arch
from engine.lora.slots import apply_dora
from engine.rope import apply_rope, rope_cache


@dataclass(frozen=True)
class ModelArgs:
    """The shape facts of a Llama-family model, read from its HF config."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool  # Llama's attention_bias also biases o_proj
    mlp_bias: bool  # Llama's mlp_bias: gate/up/down biases
    qk_norm: bool
    max_position_embeddings: int
    sliding_window: int | None

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "ModelArgs":
        arch = model_arch(cfg)
        if arch is None:
            raise ConfigError(f"unsupported model architecture {getattr(cfg, 'architectures', None)}")
        act = getattr(cfg, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"unsupported activation {act!r} (Llama-family models use silu)")
        heads = cfg.num_attention_heads
        sliding = getattr(cfg, "sliding_window", None)
        if arch in ("qwen2", "qwen3") and not getattr(cfg, "use_sliding_window", False):
            sliding = None
        return cls(
            arch=arch,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            rms_norm_eps=float(cfg.rms_norm_eps),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            o_bias=arch != "qwen2" and bool(getattr(cfg, "attention_bias", False)),
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            qk_norm=arch == "qwen3",
            max_position_embeddings=int(cfg.max_position_embeddings),
            sliding_window=int(sliding) if sliding else None,
        )


class LoraStacks(Protocol):
    """Per-layer, per-module slot stacks: get(layer, module) -> (A [S, R, in], B [S, out, R], scales [S]) or None."""

    def get(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None: ...


@dataclass
class LoraContext:
    """A step's LoRA inputs: which slot each token uses (-1 = base) and the stacks to read."""

    token_lora_slots: torch.Tensor  # [T] int
    meta: Any  # kernels.LoraBatchMeta built once per step
    stacks: LoraStacks
    composed: Any = None  # kernels.ComposedRows: rows composing several adapters (their token_lora_slots are -1)


def prepack_weight(weight: torch.Tensor) -> torch.Tensor:
    """W [out, in] reordered once into oneDNN's blocked layout (an mkldnn tensor of the same shape,
    dtype and byte size) for `packed_linear`; `.to_dense()` gives W back exactly."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PREPACK_BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) as a contiguous [T, out] on a `prepack_weight` W (oneDNN, any row count)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def plain_weight(weight: torch.Tensor) -> torch.Tensor:
    """W [out, in] in the plain layout: a packed weight is unpacked into a temporary copy."""
    return weight.to_dense() if weight.is_mkldnn else weight


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) as a contiguous [T, out]; on CPU the row count and the CPU pick the matmul
    (`kernels.tuning.small_batch_path`: decode-sized batches stream W from its own layout as W @ x.T),
    unless the weight was prepacked for oneDNN at load (`prepack_cpu_linears`): then oneDNN runs it."""
    if weight.is_mkldnn:
        return packed_linear(x, weight, bias)
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    path = small_batch_path(x.shape[0], x.dtype in (torch.bfloat16, torch.float16))
    if path == "mv":
        y = torch.mv(weight, x[0]).unsqueeze(0)  # [1, out]
    elif path == "wxt":
        y = torch.mm(weight, x.t()).t().contiguous()  # [T, out]
    else:
        return F.linear(x, weight, bias)
    return y.add_(bias) if bias is not None else y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class LoraLinear(nn.Module):
    """y = x @ W.T (+ b), then each part's LoRA delta added into its column slice."""

    def __init__(self, layer: int, in_features: int, parts: list[tuple[str, int]], bias: bool) -> None:
        super().__init__()
        out = sum(n for _, n in parts)
        self.layer, self.parts = layer, parts
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, lora: LoraContext | None) -> torch.Tensor:
        y = small_batch_linear(x, self.weight, self.bias)  # [T, out]
        if lora is None:
            return y
        # the parts (q/k/v, gate/up) an occupied slot targets: (column offset, width, name, (A, B, scales))
        parts, offset = [], 0
        for name, n in self.parts:
            stack = lora.stacks.get(self.layer, name)
            if stack is not None:
                parts.append((offset, n, name, stack))
            offset += n
        if not parts:
            return y
        ts, meta = lora.token_lora_slots, lora.meta
        lora_dtype = parts[0][3][0].dtype
        if lora_dtype != x.dtype:  # lora_dtype differs from the model's: the ops run in lora_dtype, added once
            x, out = x.to(lora_dtype), torch.zeros(y.shape, dtype=lora_dtype, device=y.device)
        else:
            out = y
        # stacks and meta are built consistent per step: skip the per-call argument checks
        if lora.composed is None or meta.num_lora_rows:  # an all-composed step has no single-slot rows
            slot_ranks = getattr(lora.stacks, "slot_ranks", None)  # slots past an adapter's rank are zero: skipped
            ranks = [slot_ranks(name) for _, _, name, _ in parts] if slot_ranks is not None else None
            hs = lora_shrink_slices(x, [(a, sc) for _, _, _, (a, _, sc) in parts], ts, meta=meta, check=False,
                                    slot_ranks=ranks)
            lora_expand_slices(hs, [(b, off) for off, _, _, (_, b, _) in parts], ts, out, meta=meta, check=False,
                               slot_ranks=ranks)
        if lora.composed is not None:  # sum_i w_i * s_i * B_i A_i x on the composed rows
            for off, _, _, (a, b, sc) in parts:
                lora_compose(x, a, b, sc, out, lora.composed, out_offset=off, check=False)
        if out is not y:
            y.add_(out)  # the LoRA delta in lora_dtype, rounded once to y's dtype
        dora = getattr(lora.stacks, "dora", None)  # slots built without DoRA support have none
        for off, n, name, _ in parts if dora is not None else ():
            g = dora(self.layer, name)
            if g is not None:  # DoRA: rescale this part's output per token (see engine.lora.slots)
                bias = self.bias[off : off + n] if self.bias is not None else None
                apply_dora(y[:, off : off + n], g, ts, bias)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, i: int, a: ModelArgs) -> None:
        super().__init__()
        self.a = a
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.qkv = LoraLinear(i, a.hidden_size, [("q_proj", q), ("k_proj", kv), ("v_proj", kv)], a.qkv_bias)
        self.o_proj = LoraLinear(i, q, [("o_proj", a.hidden_size)], a.o_bias)
        inter = a.intermediate_size
        self.gate_up = LoraLinear(i, a.hidden_size, [("gate_proj", inter), ("up_proj", inter)], a.mlp_bias)
        self.down_proj = LoraLinear(i, inter, [("down_proj", a.hidden_size)], a.mlp_bias)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
        self.scale = a.head_dim**-0.5

    def forward(self, x, cos, sin, meta, k_cache, v_cache, lora):  # type: ignore[no-untyped-def]
        a = self.a
        t = x.shape[0]
        h = self.input_layernorm(x)
        qkv = self.qkv(h, lora)  # [T, (H + 2 KVH) * D]
        q_len, kv_len = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        v = qkv[:, q_len + kv_len :].view(t, a.num_kv_heads, a.head_dim)
        if a.qk_norm:
            q = self.q_norm(qkv[:, :q_len].view(t, a.num_heads, a.head_dim))
            k = self.k_norm(qkv[:, q_len : q_len + kv_len].view(t, a.num_kv_heads, a.head_dim))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:  # q and k rotated in one call over their H + KVH heads (qkv's leading columns)
            qk = apply_rope(qkv[:, : q_len + kv_len].view(t, a.num_heads + a.num_kv_heads, a.head_dim), cos, sin)
            q, k = qk[:, : a.num_heads], qk[:, a.num_heads :]
        o = paged_attention(q, k, v.contiguous(), k_cache, v_cache, meta, self.scale)  # [T, H, D]
        x = x + self.o_proj(o.reshape(t, q_len), lora)
        h = self.post_attention_layernorm(x)
        gu = self.gate_up(h, lora)  # [T, 2I]
        gate, up = gu.chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up, lora)


class LlamaModel(nn.Module):
    """Embeddings, decoder layers, final norm and LM head; forward over a flat batch of tokens."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Parameter(torch.empty(args.vocab_size, args.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(i, args) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Parameter(torch.empty(args.vocab_size, args.hidden_size), requires_grad=False)
        self.cos = self.sin = torch.empty(0)  # [max_len, D] fp32, set by init_rope

    def init_rope(self, hf_config: Any, max_model_len: int) -> None:
        """Precompute the cos/sin tables for positions [0, max_model_len)."""
        self.cos, self.sin = rope_cache(hf_config, self.args.head_dim, max_model_len, self.embed_tokens.device)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,  # [layers, 2, slots, KVH, D]
        lora: LoraContext | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm: [T, hidden]."""
        x = F.embedding(input_ids, self.embed_tokens)
        # [T, D] in the activation dtype once per step, not once per layer (as transformers casts them)
        cos, sin = self.cos[positions].to(x.dtype), self.sin[positions].to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, meta, kv_cache[i, 0], kv_cache[i, 1], lora)
        return self.norm(x)

    def fused_slices(self) -> dict[str, tuple[str, int, int]]:
        """HF module name -> (fused linear attribute, row offset, rows): the one place q/k/v and gate/up
        offsets are computed (weight loading and LoRA slot layout both read it)."""
        args = self.args
        q, kv, inter = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim, args.intermediate_size
        return {"q_proj": ("qkv", 0, q), "k_proj": ("qkv", q, kv), "v_proj": ("qkv", q + kv, kv),
                "o_proj": ("o_proj", 0, args.hidden_size), "gate_proj": ("gate_up", 0, inter),
                "up_proj": ("gate_up", inter, inter), "down_proj": ("down_proj", 0, args.hidden_size)}  # fmt: skip

    def module_slice(self, module: str) -> tuple[str, int]:
        """(fused linear attribute, column offset) of an HF module name."""
        attr, offset, _ = self.fused_slices()[module]
        return attr, offset

    @torch.no_grad()
    def prepack_cpu_linears(self) -> int:
        """After the weights loaded: reorder each base linear's W (and an untied lm_head) once into
        oneDNN's blocked layout, replacing the plain tensor (no second copy is kept), so each step's
        matmuls run on packed weights (`small_batch_linear`). Which weights: `kernels.tuning.cpu_prepack`
        (CPU, torch with mkldnn on x86, fp32/bf16, big enough; `MLORA_CPU_PREPACK=0` turns it off). The
        embedding table (and a lm_head tied to it) stays plain: the embedding lookup reads it. Whoever
        needs a plain base W (DoRA's norm at adapter load) reads `plain_weight(W)`, a temporary copy.
        Returns how many weights were packed."""
        if self.embed_tokens.device.type != "cpu":
            return 0
        owners: list[tuple[nn.Module, str]] = [(getattr(layer, n), "weight") for layer in self.layers
                                               for n in ("qkv", "o_proj", "gate_up", "down_proj")]
        if self.lm_head is not None:
            owners.append((self, "lm_head"))
        packed = 0
        for owner, attr in owners:
            w = getattr(owner, attr)
            if not w.is_mkldnn and cpu_prepack(w.dtype, w.numel()):
                setattr(owner, attr, nn.Parameter(prepack_weight(w), requires_grad=False))
                packed += 1
        return packed

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> fp32 logits [N, vocab]."""
        w = self.embed_tokens if self.lm_head is None else self.lm_head
        return small_batch_linear(hidden, w).float()

    @torch.no_grad()
    def load_weights(self, path: Path) -> None:
        """Copy HF-named safetensors weights into the fused layout; error on anything missing."""
        slices = self.fused_slices()
        expected = {n: p.shape[0] for n, p in self.named_parameters()}
        loaded: dict[str, int] = {}  # parameter -> rows filled (fused params fill in parts)
        for name, w in iter_weights(path):
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "embed_tokens.weight":
                dst, target = self.embed_tokens, "embed_tokens"
            elif name == "lm_head.weight":
                if self.lm_head is None:
                    continue  # tied: some checkpoints store the copy anyway
                dst, target = self.lm_head, "lm_head"
            elif name == "norm.weight":
                dst, target = self.norm.weight, "norm.weight"
            elif name.startswith("layers."):
                _, idx, *rest = name.split(".")
                if int(idx) >= self.args.num_layers:
                    raise ConfigError(f"weight {name} is for a layer the config does not have")
                layer = self.layers[int(idx)]
                module, kind = rest[-2], rest[-1]
                if module in slices:
                    fused, off, n = slices[module]
                    param = getattr(getattr(layer, fused), kind)
                    if param is None:
                        raise ConfigError(f"unexpected weight {name} (config says no bias)")
                    dst, target = param[off : off + n], f"layers.{idx}.{fused}.{kind}"
                elif module in ("input_layernorm", "post_attention_layernorm", "q_norm", "k_norm") and hasattr(layer, module):
                    dst, target = getattr(layer, module).weight, f"layers.{idx}.{module}.weight"
                else:
                    raise ConfigError(f"unexpected weight {name} for a {self.args.arch} model")
            else:
                raise ConfigError(f"unexpected weight {name} for a {self.args.arch} model")
            if tuple(dst.shape) != tuple(w.shape):
                raise ConfigError(f"weight {name} has shape {tuple(w.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(w)
            loaded[target] = loaded.get(target, 0) + dst.shape[0]
        missing = sorted(n for n, rows in expected.items() if loaded.get(n, 0) != rows)
        if missing:
            raise ConfigError(f"model weights missing from {path}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
