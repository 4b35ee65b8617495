"""vLLM's sampling parameters through the real server, driven with the `openai` client.

Oracles: transformers' log_softmax on the same weights (echo + logprobs, prompt_logprobs), the
offline engine with the same SamplingParams (penalties), and single-choice requests (n with seed).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.server.config import ServerConfig
from tests.server.real_server import KEY, ServerThread

MAX_LEN = 128
PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 50, 60], list(range(3, 40))]


@pytest.fixture(scope="module")
def server(tiny_base: Path) -> Iterator[ServerThread]:
    cfg = EngineConfig(model=str(tiny_base), dtype="float32", device="cpu", max_model_len=MAX_LEN, seed=0,
                       max_num_batched_tokens=16)  # long prompts prefill in chunks
    srv = ServerThread(ServerConfig(engine=cfg, port=0, api_key=KEY)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def hf(tiny_base: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()


def _ref_logprobs(hf: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)  # [T, V]


def test_n_with_seed_gives_different_reproducible_choices(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(prompt="hello", n=4, seed=42, temperature=1.0, max_tokens=12)
    model = client.models.list().data[0].id
    first = client.completions.create(model=model, **kw)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 4, texts
    assert [c.text for c in sorted(client.completions.create(model=model, **kw).choices, key=lambda c: c.index)] == texts
    # as vLLM: choice j is the request with seed + j, whatever else runs beside it
    for j in (0, 3):
        solo = client.completions.create(model=model, prompt="hello", seed=42 + j, temperature=1.0, max_tokens=12)
        assert solo.choices[0].text == texts[j]
    msgs = [{"role": "user", "content": "hi there"}]
    chat = client.chat.completions.create(model=model, messages=msgs, n=3, seed=7, temperature=1.0, max_tokens=10)
    again = client.chat.completions.create(model=model, messages=msgs, n=3, seed=7, temperature=1.0, max_tokens=10)
    contents = [c.message.content for c in sorted(chat.choices, key=lambda c: c.index)]
    assert len(set(contents)) == 3
    assert [c.message.content for c in sorted(again.choices, key=lambda c: c.index)] == contents


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_are_the_prompt_tokens_logprobs(client: openai.OpenAI, server: ServerThread, hf: Any,
                                                     max_tokens: int) -> None:
    """What lm-evaluation-harness' `local-completions` sends for loglikelihood: a batch of token lists."""
    model = client.models.list().data[0].id
    r = client.completions.create(model=model, prompt=PROMPTS, echo=True, logprobs=1, max_tokens=max_tokens,
                                  temperature=0, seed=1234)
    assert len(r.choices) == len(PROMPTS)
    for ch in r.choices:
        ids = PROMPTS[ch.index]
        lp = ch.logprobs
        ref = _ref_logprobs(hf, ids)
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for pos in range(1, len(ids)):
            assert abs(lp.token_logprobs[pos] - float(ref[pos - 1, ids[pos]])) < 1e-4
            top = lp.top_logprobs[pos]
            assert lp.tokens[pos] in top and abs(max(top.values()) - float(ref[pos - 1].max())) < 1e-4
        # text_offset: each token starts where the previous token's string ended
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        assert ch.text.startswith(server.engine.tokenizer.decode(ids))
        assert max_tokens or ch.text == server.engine.tokenizer.decode(ids)  # max_tokens 0: the prompt alone
        if max_tokens:
            gen = lp.token_logprobs[-1]
            assert abs(gen - float(ref[-1].max())) < 1e-4  # greedy: the generated token is the argmax
    assert r.usage.completion_tokens == max_tokens * len(PROMPTS)


def test_prompt_logprobs_field(client: openai.OpenAI, hf: Any) -> None:
    model = client.models.list().data[0].id
    ids = PROMPTS[2]  # longer than max_num_batched_tokens: scored across prefill chunks
    r = client.completions.create(model=model, prompt=ids, max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 2})
    pl = r.choices[0].model_extra["prompt_logprobs"]
    ref = _ref_logprobs(hf, ids)
    assert pl[0] is None and len(pl) == len(ids)
    for pos in range(1, len(ids)):
        entry = pl[pos][str(ids[pos])]
        assert abs(entry["logprob"] - float(ref[pos - 1, ids[pos]])) < 1e-4
        assert entry["rank"] == int((ref[pos - 1] >= ref[pos - 1, ids[pos]]).sum())
        assert 2 <= len(pl[pos]) <= 3


def test_penalties_through_the_server_equal_offline(client: openai.OpenAI, server: ServerThread) -> None:
    from engine import LLM

    model = client.models.list().data[0].id
    offline = LLM(model=server.config.engine.model, dtype="float32", device="cpu", max_model_len=MAX_LEN)
    extra = {"repetition_penalty": 1.4, "min_p": 0.05, "min_tokens": 3, "bad_words": ["e", "ab"]}
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=10, temperature=0.8, seed=5,
                                  presence_penalty=0.5, frequency_penalty=0.3, logit_bias={"77": 3, "2": -100},
                                  extra_body=extra)
    sp = SamplingParams(max_tokens=10, temperature=0.8, seed=5, presence_penalty=0.5, frequency_penalty=0.3,
                        logit_bias={77: 3, 2: -100}, repetition_penalty=1.4, min_p=0.05, min_tokens=3,
                        bad_words=["e", "ab"])
    assert r.choices[0].text == offline.generate([PROMPTS[0]], sp)[0].text
    plain = offline.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0.8, seed=5))[0].text
    assert r.choices[0].text != plain


def test_vllm_errors(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_LEN)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_LEN)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=model, prompt=PROMPTS[0], logit_bias={"999999": 1})
    with pytest.raises(openai.BadRequestError, match="repetition_penalty"):
        client.completions.create(model=model, prompt=PROMPTS[0], extra_body={"repetition_penalty": 0})
    with pytest.raises(openai.BadRequestError, match="allowed_token_ids"):
        client.completions.create(model=model, prompt=PROMPTS[0], extra_body={"allowed_token_ids": [999999]})
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=1.0, seed=2,
                                  extra_body={"allowed_token_ids": [70, 80]})  # bytes 67, 77: "C", "M"
    assert r.choices[0].text and set(r.choices[0].text) <= {"C", "M"}
    # the longest request that fits is served
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_LEN - len(PROMPTS[0]), temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_streamed_echo_logprobs(client: openai.OpenAI, server: ServerThread, hf: Any, max_tokens: int) -> None:
    model = client.models.list().data[0].id
    ids = PROMPTS[0]
    whole = client.completions.create(model=model, prompt=ids, echo=True, logprobs=1, max_tokens=max_tokens, temperature=0)
    chunks = list(client.completions.create(model=model, prompt=ids, echo=True, logprobs=1, max_tokens=max_tokens,
                                            temperature=0, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    tokens: list[str] = []
    lps: list[float | None] = []
    offsets: list[int] = []
    for c in chunks:
        if c.choices and c.choices[0].logprobs:
            tokens += c.choices[0].logprobs.tokens
            lps += c.choices[0].logprobs.token_logprobs
            offsets += c.choices[0].logprobs.text_offset
    assert tokens == whole.choices[0].logprobs.tokens and lps == whole.choices[0].logprobs.token_logprobs
    assert lps[0] is None and len(lps) == len(ids) + max_tokens
    assert offsets == whole.choices[0].logprobs.text_offset
