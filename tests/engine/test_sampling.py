"""Sampling: seeds, top-k/top-p, stop strings and ids, EOS, logprobs, detokenization."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.byte_tokenizer import EOS_ID
from engine.sampler import greedy_tokens, sample
from tests.engine.conftest import PROMPTS


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), enable_lora=False)


def test_seeded_sampling_is_reproducible_alone_and_in_batch(llm: LLM) -> None:
    p = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], p)[0].token_ids
    others = [SamplingParams(max_tokens=20, temperature=1.0, seed=i, ignore_eos=True) for i in range(3)]
    batch = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]], [others[0], p, others[1], others[2]])
    assert batch[1].token_ids == alone
    assert llm.generate([PROMPTS[0]], SamplingParams(max_tokens=20, temperature=0.9, seed=99, ignore_eos=True))[0].token_ids != alone


def test_top_k_1_is_greedy(llm: LLM) -> None:
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    topk1 = llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=1.3, top_k=1, seed=5, ignore_eos=True))
    assert [o.token_ids for o in greedy] == [o.token_ids for o in topk1]


def test_top_p_and_top_k_only_sample_allowed_tokens() -> None:
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]] * 2)
    params = [SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=1.0, top_k=2)]
    seen: list[set[int]] = [set(), set()]
    for s in range(200):
        toks, _ = sample(logits, params, [torch.Generator().manual_seed(s), torch.Generator().manual_seed(s)])
        seen[0].add(toks[0])
        seen[1].add(toks[1])
    assert seen[0] == {0}  # p(0) = 0.71 >= 0.5 alone
    assert seen[1] == {0, 1}


def test_stop_token_ids_and_eos(llm: LLM) -> None:
    free = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    stop_at = free.token_ids[4]
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_at]))[0]
    first = free.token_ids.index(stop_at)
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert out.text == llm.tokenizer.decode(free.token_ids[:first], skip_special_tokens=True)
    # EOS ends a request unless ignore_eos: force it with a prompt whose greedy continuation we know
    eng = llm.engine
    eng.eos_token_ids = frozenset({EOS_ID, free.token_ids[2]})
    try:
        out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0.0))[0]
        assert out.finish_reason == "stop" and out.stop_reason is None
        assert out.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[2]) + 1]
    finally:
        eng.eos_token_ids = frozenset({EOS_ID})


def test_stop_strings(llm: LLM) -> None:
    prompt = "the quick brown fox"
    free = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0]
    text = free.text
    printable = [i for i in range(3, len(text) - 2) if text[i : i + 2].isprintable() and "\ufffd" not in text[i : i + 2]]
    assert printable, f"no printable stop candidate in {text!r}"
    i = printable[0]
    stop = text[i : i + 2]
    cut = text.index(stop)
    out = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0.0, stop=[stop, "never-there"]))[0]
    assert out.text == text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    inc = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0.0, stop=[stop], include_stop_str_in_output=True))[0]
    assert inc.text == text[: cut + len(stop)]


def test_logprobs_match_transformers(llm: LLM, hf_llama) -> None:
    out = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, ignore_eos=True))[0]
    assert out.logprobs is not None and len(out.logprobs) == 5
    seq = PROMPTS[2] + out.token_ids
    with torch.no_grad():
        lp = torch.log_softmax(hf_llama(torch.tensor([seq])).logits[0].float(), dim=-1)
    for k, item in enumerate(out.logprobs):
        row = lp[len(PROMPTS[2]) - 1 + k]
        assert item.token_id == out.token_ids[k]
        assert abs(item.logprob - float(row[item.token_id])) < 1e-4
        top = row.topk(3)
        assert list(item.top) == top.indices.tolist()
        assert max(abs(a - b) for a, b in zip(item.top.values(), top.values.tolist())) < 1e-4


def test_text_prompt_and_multibyte_detokenization(llm: LLM) -> None:
    out = llm.generate(["héllo wörld"], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    assert out.prompt_token_ids == llm.tokenizer("héllo wörld").input_ids
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("vocab", [100, 511, 512, 32000, 32001, 50257])
def test_greedy_token_is_torch_argmax_including_ties(vocab: int) -> None:
    """Greedy picks what torch.argmax (vLLM's greedy) picks: the first of tied maxima, wherever they sit
    (across blocks, inside one, in a tail narrower than a block, at the last id), with masked -inf rows."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(12, vocab, generator=g)
    top = logits.max() + 1.0
    logits[0, [3, vocab - 1]] = top  # tie: first block and last id
    logits[1, [vocab - 1]] = top  # the max at the last id (a tail block's repeats)
    logits[2, [vocab // 2, vocab // 2 + 1]] = top  # tie inside one block
    logits[3, [vocab - 2, 5]] = top
    logits[4] = 0.0  # all tied: id 0
    logits[5, : vocab // 3] = float("-inf")  # masked prefix, like allowed_token_ids / bad_words
    logits[6, :] = float("-inf")
    logits[6, vocab - 3] = 1.0
    logits[7] = torch.round(logits[7])  # many ties at the max of small integers
    want = torch.argmax(logits, dim=-1)
    assert torch.equal(greedy_tokens(logits), want)
    assert torch.equal(greedy_tokens(logits[::2]), want[::2])  # non-contiguous rows
