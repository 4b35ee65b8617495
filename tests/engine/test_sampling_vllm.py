"""vLLM's sampling parameters: penalties, min_p, min_tokens, logit_bias, prompt_logprobs.

The oracle is transformers' own logits processors on the same weights (`model.generate`, greedy,
fp32), and each request alone: a batch mixing penalised and plain requests gives each its solo output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.byte_tokenizer import EOS_ID
from engine.errors import ConfigError
from engine.sampler import sample
from tests.engine.conftest import PROMPTS

N = 12


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), enable_lora=False)


def _hf(model, prompt: list[int], max_new_tokens: int = N, processors=(), **kw) -> list[int]:
    from transformers import LogitsProcessorList

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
            logits_processor=LogitsProcessorList(processors), **{"eos_token_id": None, **kw},
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


class _PresenceFrequency:
    """OpenAI's documented formula: logit[t] -= count[t] * frequency + (count[t] > 0) * presence (output tokens)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def test_penalties_and_bias_equal_transformers_and_their_solo_runs(llm: LLM, hf_llama) -> None:
    plain = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
    cases = [
        (SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, repetition_penalty=1.8),
         lambda p: _hf(hf_llama, p, repetition_penalty=1.8)),
        (SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, repetition_penalty=0.5),
         lambda p: _hf(hf_llama, p, repetition_penalty=0.5)),
        (SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.7),
         lambda p: _hf(hf_llama, p, processors=[_PresenceFrequency(len(p), 1.5, 0.7)])),
        (SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, frequency_penalty=-2.0),
         lambda p: _hf(hf_llama, p, processors=[_PresenceFrequency(len(p), 0.0, -2.0)])),
        (SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, logit_bias={"77": 100, 78: 4.5}),
         lambda p: _hf(hf_llama, p, sequence_bias={(77,): 100.0, (78,): 4.5})),
    ]
    prompts, params, want = [], [], []
    for i, (sp, ref) in enumerate(cases):
        prompt = PROMPTS[i % len(PROMPTS)]
        expected = ref(prompt)
        assert expected != _hf(hf_llama, prompt) or i == 1, "the penalty should change this greedy output"
        solo = llm.generate([prompt], sp)[0].token_ids
        assert solo == expected, f"case {i}"
        prompts += [prompt, PROMPTS[(i + 1) % len(PROMPTS)]]
        params += [sp, plain]
        want += [expected, _hf(hf_llama, PROMPTS[(i + 1) % len(PROMPTS)])]
    batch = llm.generate(prompts, params)
    assert [o.token_ids for o in batch] == want


def test_plain_rows_are_bit_identical_next_to_penalised_rows(llm: LLM) -> None:
    plain = [SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, logprobs=3),
             SamplingParams(max_tokens=N, temperature=0.9, seed=7, ignore_eos=True, logprobs=2)]
    pen = SamplingParams(max_tokens=N, temperature=0.7, seed=3, ignore_eos=True, repetition_penalty=1.3,
                         presence_penalty=0.5, min_p=0.1, logit_bias={5: -3.0})
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3]]
    mixed = llm.generate(prompts, [plain[0], pen, plain[1], pen])
    # the same batch shapes without any penalty: the plain rows' tokens and logprobs are bit-identical
    unpenalised = llm.generate(prompts, [plain[0], plain[0], plain[1], plain[0]])
    def lps(o):
        return [(lp.token_id, lp.logprob, lp.top) for lp in o.logprobs]
    for j in (0, 2):
        assert mixed[j].token_ids == unpenalised[j].token_ids and lps(mixed[j]) == lps(unpenalised[j])
    # and each request's tokens equal its solo run (penalised and seeded ones too)
    for prompt, p, o in zip(prompts, [plain[0], pen, plain[1], pen], mixed):
        assert llm.generate([prompt], p)[0].token_ids == o.token_ids


def test_min_tokens_holds_eos_and_stop_ids_back_as_transformers(llm: LLM, hf_llama) -> None:
    from transformers import MinNewTokensLengthLogitsProcessor

    prompt = PROMPTS[0]
    # EOS made near-certain by a bias: without min_tokens the first token is EOS
    sp = SamplingParams(max_tokens=N, temperature=0.0, logit_bias={EOS_ID: 100}, min_tokens=4)
    out = llm.generate([prompt], sp)[0]
    ref = _hf(hf_llama, prompt, eos_token_id=EOS_ID, sequence_bias={(EOS_ID,): 100.0},
              processors=[MinNewTokensLengthLogitsProcessor(len(prompt), 4, EOS_ID)])
    assert out.token_ids == ref and len(ref) == 5 and ref[-1] == EOS_ID and out.finish_reason == "stop"
    assert llm.generate([prompt], SamplingParams(max_tokens=N, temperature=0.0, logit_bias={EOS_ID: 100}))[0].token_ids == [EOS_ID]
    # stop_token_ids are held back too
    free = llm.generate([prompt], SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True))[0].token_ids
    out = llm.generate([prompt], SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, stop_token_ids=[free[0]],
                                                min_tokens=3))[0]
    assert free[0] not in out.token_ids[:3] and len(out.token_ids) >= 3


def test_min_p_keeps_the_tokens_transformers_keeps() -> None:
    from transformers import MinPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 3
    for min_p in (0.05, 0.3):
        kept = torch.isfinite(MinPLogitsWarper(min_p)(None, logits.clone()))
        params = [SamplingParams(temperature=1.0, min_p=min_p)] * 3
        seen = torch.zeros_like(kept)
        for s in range(300):
            toks, _ = sample(logits, params, [torch.Generator().manual_seed(s * 3 + r) for r in range(3)])
            seen[torch.arange(3), torch.tensor(toks)] = True
        assert not (seen & ~kept).any()  # never a token transformers drops
        assert (seen == kept).all() or min_p == 0.05  # (0.05 keeps rare tokens a few draws may miss)


def test_min_p_one_is_greedy(llm: LLM) -> None:
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True))
    minp = llm.generate(PROMPTS, SamplingParams(max_tokens=N, temperature=1.5, min_p=1.0, seed=3, ignore_eos=True))
    assert [o.token_ids for o in greedy] == [o.token_ids for o in minp]


@pytest.mark.parametrize("chunk", [None, 8, "rows"])
def test_prompt_logprobs_equal_transformers(llama_dir: Path, hf_llama, chunk: int | str | None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if chunk == "rows":  # long prompts are scored a few positions at a time
        monkeypatch.setattr("engine.runner.PROMPT_LOGPROBS_ROWS", 3)
    kw = {"max_num_batched_tokens": chunk} if isinstance(chunk, int) else {}
    llm = LLM(str(llama_dir), enable_lora=False, **kw)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3))
    for prompt, out in zip(PROMPTS, outs):
        with torch.no_grad():
            ref = torch.log_softmax(hf_llama(torch.tensor([prompt])).logits[0].float(), dim=-1)  # [T, V]
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for pos in range(1, len(prompt)):
            entry, tok = out.prompt_logprobs[pos], prompt[pos]
            row = ref[pos - 1]
            assert abs(entry[tok].logprob - float(row[tok])) < 1e-4
            assert entry[tok].rank == int((row >= row[tok]).sum())
            top_v, top_i = row.topk(3)
            for r, (v, i) in enumerate(zip(top_v.tolist(), top_i.tolist())):
                assert abs(entry[i].logprob - v) < 1e-4 and (i == tok or entry[i].rank == r + 1)
            assert len(entry) in (3, 4)


def test_new_params_are_validated() -> None:
    for bad in ({"min_p": 1.5}, {"presence_penalty": 3}, {"frequency_penalty": -2.5}, {"repetition_penalty": 0},
                {"min_tokens": -1}, {"min_tokens": 20, "max_tokens": 10}, {"logit_bias": {"x": 1}},
                {"logit_bias": {1: "x"}}, {"prompt_logprobs": 21}):
        with pytest.raises(ConfigError):
            SamplingParams(**bad)


def test_logit_bias_is_clamped_as_vllm_and_ids_outside_the_vocabulary_are_refused(llm: LLM) -> None:
    assert SamplingParams(logit_bias={"3": 250, 4: -1e9}).logit_bias == {3: 100.0, 4: -100.0}
    with pytest.raises(ConfigError, match="logit_bias"):
        llm.generate([PROMPTS[0]], SamplingParams(logit_bias={10**6: 1.0}))


def test_penalties_and_prompt_logprobs_survive_preemption(llama_dir: Path) -> None:
    prompts = [list(range(3 + i, 20 + 2 * i)) for i in range(6)]
    params = [SamplingParams(max_tokens=30, temperature=0.8, seed=i, ignore_eos=True, repetition_penalty=1.2,
                             frequency_penalty=0.4, prompt_logprobs=2) for i in range(6)]
    small = LLM(str(llama_dir), enable_lora=False, num_kv_blocks=10, block_size=8, max_model_len=80)
    outs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    big = LLM(str(llama_dir), enable_lora=False)
    for prompt, sp, o in zip(prompts, params, outs):
        solo = big.generate([prompt], sp)[0]
        assert o.token_ids == solo.token_ids
        assert len(o.prompt_logprobs) == len(prompt)  # scored once, not again when recomputed
        for e, ref in zip(o.prompt_logprobs[1:], solo.prompt_logprobs[1:]):
            assert e.keys() == ref.keys() and all(abs(e[t].logprob - ref[t].logprob) < 1e-5 for t in e)


def test_bad_words_equal_transformers_no_bad_words(llm: LLM, hf_llama) -> None:
    from engine.byte_tokenizer import BYTE_OFFSET

    printable = lambda t: 33 <= t - BYTE_OFFSET <= 126  # noqa: E731 - a byte that is one visible character
    checked = 0
    for prompt in PROMPTS:
        free = _hf(hf_llama, prompt, 20)
        pairs = [(a, b) for a, b in zip(free, free[1:]) if printable(a) and printable(b) and a != prompt[-1]]
        singles = [t for t in free if printable(t)]
        for word in ([list(pairs[0])] if pairs else []) + ([[singles[0]]] if singles else []):
            text = "".join(chr(t - BYTE_OFFSET) for t in word)
            out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, bad_words=[text]))[0]
            assert out.token_ids == _hf(hf_llama, prompt, 20, bad_words_ids=[word]), (prompt, text)
            assert out.token_ids != free
            checked += 1
    assert checked >= 3


def test_min_tokens_holds_stop_strings_back(llm: LLM) -> None:
    from engine.byte_tokenizer import BYTE_OFFSET

    z = {ord("z") + BYTE_OFFSET: 100}  # every token is "z"
    early = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=30, temperature=0.0, logit_bias=z, stop=["z"]))[0]
    assert early.finish_reason == "stop" and early.text == "" and len(early.token_ids) == 1
    held = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=30, temperature=0.0, logit_bias=z, stop=["z"],
                                                     min_tokens=5))[0]
    assert held.finish_reason == "stop" and held.text == "zzzzz" and len(held.token_ids) == 6


def test_allowed_token_ids_equal_transformers_prefix_constraint(llm: LLM, hf_llama) -> None:
    from transformers import PrefixConstrainedLogitsProcessor

    allowed = [70, 80, 90, 100, 110]
    for prompt in PROMPTS[:2]:
        out = llm.generate([prompt], SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, allowed_token_ids=allowed))[0]
        ref = _hf(hf_llama, prompt, processors=[PrefixConstrainedLogitsProcessor(lambda b, ids: allowed, 1)])
        assert out.token_ids == ref and set(ref) <= set(allowed)
    sampled = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=N, temperature=1.5, seed=1, ignore_eos=True,
                                                        allowed_token_ids=allowed))[0]
    assert set(sampled.token_ids) <= set(allowed)
    with pytest.raises(ConfigError, match="allowed_token_ids"):
        llm.generate([PROMPTS[0]], SamplingParams(allowed_token_ids=[10**6]))
