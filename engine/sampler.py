"""Next-token selection for a batch of rows, each with its own sampling parameters.

Greedy rows take the argmax. Sampled rows apply temperature, top-k and top-p, then draw with the
request's own torch.Generator, so a seeded request gives the same tokens alone or in any batch.
Logprobs (when asked) are those of the model's raw distribution (log_softmax of the logits).
A row whose logits are not all finite (NaN/Inf, e.g. activations blown up by an adapter) gets no
token (None): it is checked before any sampling math, so one bad row never fails the batch.
"""

from __future__ import annotations

import torch

from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams

# Temperatures below this act as this (vLLM treats < 1e-5 as greedy): keeps logits / T finite.
TEMPERATURE_FLOOR = 1e-5
_GREEDY = SamplingParams(temperature=0.0)  # stands in for a non-finite row's params (no draw, no logprobs)


def sample(
    logits: torch.Tensor,  # [N, V] fp32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[list[int | None], list[TokenLogprob | None]]:
    """Token ids [N] (None for a row with non-finite logits) and, for rows with params.logprobs set, a TokenLogprob."""
    n = logits.shape[0]
    finite = torch.isfinite(logits).all(dim=-1)  # [N]
    bad: set[int] = set()
    if not bool(finite.all()):
        bad = set(torch.nonzero(~finite).flatten().tolist())
        logits = torch.where(finite[:, None], logits, 0.0)  # harmless stand-in; these rows get None
        params = [p if i not in bad else _GREEDY for i, p in enumerate(params)]
    # [N] greedy default: max(dim).indices is argmax (first index of the maximum), ~3x faster on CPU
    # (128 x 32000 fp32, 1 thread: 3.0 ms against 10.2 ms)
    tokens = logits.max(dim=-1).indices
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        sub = logits.index_select(0, rows)  # [M, V]
        temps = torch.tensor([params[i].temperature for i in sampled_rows], dtype=sub.dtype, device=sub.device)
        temps = temps.clamp_min(TEMPERATURE_FLOOR)  # logits / 1e-45 would be inf, and softmax(inf) NaN
        sub = sub / temps[:, None]
        sub = _top_k(sub, [params[i].top_k for i in sampled_rows])
        sub = _top_p(sub, [params[i].top_p for i in sampled_rows])
        probs = torch.softmax(sub, dim=-1)
        for j, i in enumerate(sampled_rows):
            tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i]).squeeze(0)
    token_list: list[int | None] = tokens.tolist()
    for i in bad:
        token_list[i] = None
    logprobs: list[TokenLogprob | None] = [None] * n
    want = [i for i, p in enumerate(params) if p.logprobs is not None and i not in bad]
    if want:
        rows = torch.tensor(want, device=logits.device)
        lp = torch.log_softmax(logits.index_select(0, rows), dim=-1)  # [M, V]
        k = max(params[i].logprobs or 0 for i in want)
        top_v, top_i = (lp.topk(k, dim=-1) if k > 0 else (None, None))
        for j, i in enumerate(want):
            tok = token_list[i]
            top: dict[int, float] = {}
            if top_v is not None and params[i].logprobs:
                kk = params[i].logprobs
                top = dict(zip(top_i[j, :kk].tolist(), top_v[j, :kk].tolist()))
            logprobs[i] = TokenLogprob(token_id=tok, logprob=float(lp[j, tok]), top=top)
    return token_list, logprobs


def _top_k(logits: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Keep each row's k largest logits (k = -1: all)."""
    if all(k == -1 for k in ks):
        return logits
    vocab = logits.shape[-1]
    k = torch.tensor([vocab if kk == -1 else min(kk, vocab) for kk in ks], device=logits.device)
    sorted_vals = logits.sort(dim=-1, descending=True).values
    kth = sorted_vals.gather(1, (k - 1)[:, None])  # [M, 1] the k-th largest value
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(logits: torch.Tensor, ps: list[float]) -> torch.Tensor:
    """Keep each row's smallest set of top tokens whose probability mass reaches p (always >= 1 token)."""
    if all(p >= 1.0 for p in ps):
        return logits
    p = torch.tensor(ps, dtype=logits.dtype, device=logits.device)
    sorted_vals, sorted_idx = logits.sort(dim=-1, descending=True)
    cum = sorted_vals.softmax(dim=-1).cumsum(dim=-1)
    remove = (cum - sorted_vals.softmax(dim=-1)) >= p[:, None]  # mass before this token already >= p
    remove[:, 0] = False
    mask = torch.zeros_like(remove).scatter(1, sorted_idx, remove)
    return logits.masked_fill(mask, float("-inf"))
