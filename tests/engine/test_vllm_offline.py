"""vLLM's offline multi-LoRA Python API on mlora: the examples run with only the import line changed,
and their greedy outputs equal transformers+PEFT (fp32) on the same tiny Llama and PEFT adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.errors import AdapterError, ConfigError
from tests.tiny import build_peft_adapter, build_tiny_model

SQL_PROMPTS = [
    "[user] Write a SQL query to answer the question based on the table schema.\n\n context: CREATE TABLE table_name_74 (icao VARCHAR, airport VARCHAR)\n\n question: Name the ICAO for lilongwe international airport [/user] [assistant]",  # noqa: E501
    "[user] Write a SQL query to answer the question based on the table schema.\n\n context: CREATE TABLE table_name_11 (nationality VARCHAR, elector VARCHAR)\n\n question: When Anchero Pantaleone was the elector what is under nationality? [/user] [assistant]",  # noqa: E501
]
EOS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama with room for the examples' 256 new tokens, and two PEFT adapters of rank 8."""
    root = tmp_path_factory.mktemp("vllm_offline")
    base = build_tiny_model(root / "llama", "llama", max_position_embeddings=1024)
    return {
        "base": base,
        "sql": build_peft_adapter(base, root / "sql", seed=11, r=8, lora_alpha=16),
        "sql2": build_peft_adapter(base, root / "sql2", seed=12, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    }


def _peft_greedy(base: Path, adapter: Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers(+PEFT) greedy continuation, up to and including the first EOS (as vLLM reports it)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=EOS, pad_token_id=0)  # fmt: skip
    ids = out[0, len(prompt_ids) :].tolist()
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


def _peft_prompt_logprobs(base: Path, adapter: Path | None, prompt_ids: list[int]) -> torch.Tensor:
    """transformers(+PEFT) log-probability of each prompt token after the first [T - 1]."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0, :-1].float(), dim=-1)
    return lp.gather(1, torch.tensor(prompt_ids[1:])[:, None])[:, 0]


def test_vllm_lora_docs_example_matches_peft(setup: dict[str, Path]) -> None:
    model_path, sql_lora_path = str(setup["base"]), str(setup["sql"])
    # ---- vLLM docs/features/lora.md, offline section; only the import line changed ----
    from engine import LLM, LoRARequest, SamplingParams  # was: from vllm import ...; from vllm.lora.request import ...

    llm = LLM(model=model_path, enable_lora=True)
    sampling_params = SamplingParams(temperature=0, max_tokens=256, stop=["[/assistant]"])
    prompts = SQL_PROMPTS
    outputs = llm.generate(prompts, sampling_params, lora_request=LoRARequest("sql_adapter", 1, sql_lora_path))
    # ---- end of the example ----
    assert [o.prompt for o in outputs] == prompts
    for out in outputs:
        assert out.finished and out.request_id
        gen = out.outputs[0]
        assert gen.token_ids == _peft_greedy(setup["base"], setup["sql"], out.prompt_token_ids, 256)
        assert gen.finish_reason in ("stop", "length") and gen.index == 0
        assert gen.text == out.text and "[/assistant]" not in gen.text
        assert out.lora_request == LoRARequest("sql_adapter", 1, sql_lora_path)
    assert llm.list_adapters() == ["sql_adapter"]


def test_vllm_multilora_example_matches_peft(setup: dict[str, Path]) -> None:
    """vLLM's examples/offline_inference/multilora_inference.py requests (2 base, 2 adapters) with its
    engine settings (max_loras=1: the second adapter waits for the first), through LLM.generate."""
    from engine import LLM, LoRARequest, SamplingParams

    llm = LLM(setup["base"], enable_lora=True, max_loras=1, max_lora_rank=8, max_cpu_loras=2, max_num_seqs=256)
    greedy = SamplingParams(temperature=0.0, logprobs=1, max_tokens=128, stop_token_ids=[32003])
    test_prompts = [
        ("A robot may not injure a human being", SamplingParams(temperature=0.0, logprobs=1, max_tokens=128), None),
        ({"prompt": "To be or not to be,"}, SamplingParams(temperature=0.0, max_tokens=128), None),
        (SQL_PROMPTS[0], greedy, LoRARequest("sql-lora", 1, str(setup["sql"]))),
        ({"prompt_token_ids": [1, 80, 81, 82, 83]}, greedy, LoRARequest("sql-lora2", 2, str(setup["sql2"]))),
    ]
    outputs = llm.generate([p for p, _, _ in test_prompts], [s for _, s, _ in test_prompts],
                           lora_request=[r for _, _, r in test_prompts])  # fmt: skip
    adapters = [None, None, setup["sql"], setup["sql2"]]
    for out, adapter, (prompt, params, req) in zip(outputs, adapters, test_prompts):
        gen = out.outputs[0]
        assert gen.token_ids == _peft_greedy(setup["base"], adapter, out.prompt_token_ids, 128), (prompt, adapter)
        assert out.lora_request is req and gen.lora_request is req
        if params.logprobs:  # vLLM's logprobs shape: per token {token_id: Logprob}, the chosen one included
            assert len(gen.logprobs) == len(gen.token_ids)
            assert all(t in lp for t, lp in zip(gen.token_ids, gen.logprobs))
            assert gen.cumulative_logprob == pytest.approx(sum(lp[t].logprob for t, lp in zip(gen.token_ids, gen.logprobs)))
        else:
            assert gen.logprobs is None and gen.cumulative_logprob is None
    assert outputs[0].prompt == "A robot may not injure a human being"
    assert outputs[1].prompt == "To be or not to be,"
    assert outputs[3].prompt is None and outputs[3].prompt_token_ids == [1, 80, 81, 82, 83]
    # mlora's own API still works on the same engine, under the names the LoRARequests registered
    again = llm.generate([SQL_PROMPTS[0]], greedy, adapters=["sql-lora"])[0]
    assert again.token_ids == outputs[2].token_ids and again.adapter == "sql-lora" and again.lora_request is None


def test_lora_request_conflicts_and_validation(setup: dict[str, Path], tmp_path: Path) -> None:
    from engine import LLM, LoRARequest, SamplingParams

    llm = LLM(str(setup["base"]), max_loras=2)
    p = SamplingParams(temperature=0, max_tokens=2)
    llm.generate("abc", p, lora_request=LoRARequest("a", 1, str(setup["sql"])))
    with pytest.raises(ConfigError, match="'a' is already registered from .*sql, not .*sql2"):
        llm.generate("abc", p, lora_request=LoRARequest("a", 3, str(setup["sql2"])))
    with pytest.raises(ConfigError, match="lora_int_id 1 is already used by adapter 'a', not 'b'"):
        llm.generate("abc", p, lora_request=LoRARequest("b", 1, str(setup["sql2"])))
    with pytest.raises(ConfigError, match="requested with lora_int_id 1, now 2"):
        llm.generate("abc", p, lora_request=LoRARequest("a", 2, str(setup["sql"])))
    with pytest.raises(AdapterError):  # validated like any adapter; nothing registered
        llm.generate("abc", p, lora_request=LoRARequest("missing", 4, str(tmp_path / "nope")))
    assert llm.list_adapters() == ["a"]
    with pytest.raises(ConfigError, match="lora_int_id must be an integer > 0"):
        LoRARequest("x", 0, "/some/path")
    with pytest.raises(ConfigError, match="lora_path .* is empty"):
        LoRARequest("x", 1)
    with pytest.raises(ConfigError, match="adapters= or lora_request=, not both"):
        llm.generate("abc", p, adapters="a", lora_request=LoRARequest("a", 1, str(setup["sql"])))
    with pytest.raises(ConfigError, match="got 2 prompts but 1 lora requests"):
        llm.generate(["a", "b"], p, lora_request=[None])
    with pytest.raises(ConfigError, match="got 1 prompts but 2 priorities"):
        llm.generate("abc", p, priority=[1, 2])
    with pytest.raises(ConfigError, match="prompt keys not supported by mlora: multi_modal_data"):
        llm.generate({"prompt": "abc", "multi_modal_data": {}}, p)
    # a LoRARequest without LoRA enabled: a clear error, as in vLLM
    base_only = LLM(str(setup["base"]), enable_lora=False)
    with pytest.raises(ConfigError, match="LoRA is disabled"):
        base_only.generate("abc", p, lora_request=LoRARequest("a", 1, str(setup["sql"])))


def test_vllm_priority_under_the_priority_policy(setup: dict[str, Path]) -> None:
    """vLLM's `priority=` (LLM.generate, LLMEngine.add_request) with scheduling_policy="priority": lower
    values are admitted first; the outputs are those without priorities (fair/fcfs merely ignore it)."""
    from engine import LLM, EngineArgs, LLMEngine, LoRARequest, SamplingParams

    p = SamplingParams(temperature=0, max_tokens=3)
    prompts, prios = ["abc", "de", "fgh", "ij"], [5, 0, 3, 0]
    sql = LoRARequest("sql", 1, str(setup["sql"]))
    reqs = [sql, None, sql, None]
    llm = LLM(str(setup["base"]), enable_lora=True, max_loras=1, max_num_seqs=1, scheduling_policy="priority")
    outs = llm.generate(prompts, p, lora_request=reqs, priority=prios)
    assert sorted(range(4), key=lambda i: outs[i].metrics.first_scheduled_time) == [1, 3, 2, 0]  # type: ignore[union-attr]
    plain = LLM(str(setup["base"]), enable_lora=True, max_loras=1).generate(prompts, p, lora_request=reqs)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]

    engine = LLMEngine.from_engine_args(EngineArgs(model=str(setup["base"]), enable_lora=True, max_loras=1,
                                                   max_num_seqs=1, scheduling_policy="priority"))
    for i, (prompt, prio, req) in enumerate(zip(prompts, prios, reqs)):
        engine.add_request(str(i), prompt, p, lora_request=req, priority=prio)
    first: list[str] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id not in first:
                first.append(out.request_id)
    assert first == ["1", "3", "2", "0"]


def test_vllm_engine_options(setup: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    from engine import LLM

    with caplog.at_level("WARNING"):  # vLLM's meaning on CUDA; on CPU it has none, and says so
        llm = LLM(str(setup["base"]), enforce_eager=True, tensor_parallel_size=1, gpu_memory_utilization=0.5,
                  seed=None, max_cpu_loras=None, enable_prefix_caching=True, tokenizer=str(setup["base"]),
                  device="cpu")  # fmt: skip
    assert "gpu_memory_utilization applies to CUDA only" in caplog.text and llm.config.gpu_memory_utilization == 0.5
    with pytest.warns(UserWarning, match="ignores swap_space=4"):
        LLM(str(setup["base"]), swap_space=4, device="cpu")
    assert llm.config.seed == 0 and llm.config.max_cpu_loras == 2 * llm.config.max_loras
    for bad, match in [
        (dict(tensor_parallel_size=2), r"tensor_parallel_size=2 is not supported by mlora \(only 1\)"),
        (dict(quantization="awq"), "quantization='awq' is not supported"),
        (dict(tokenizer="other/tok"), "mlora always uses the model's own tokenizer"),
        (dict(max_num_seq=3), "unknown engine option.*: max_num_seq"),
    ]:
        with pytest.raises(ConfigError, match=match):
            LLM(str(setup["base"]), **bad)


# vLLM's examples/offline_inference/multilora_inference.py (LLMEngine flavour). Changed: the import line,
# the model and adapter paths (a tiny Llama and PEFT adapters instead of Llama-2-7b and a Hub download),
# and the collected outputs.
from engine import EngineArgs, LLMEngine, LoRARequest, RequestOutput, SamplingParams  # noqa: E402


def create_test_prompts(lora_path: str) -> list[tuple[str, SamplingParams, LoRARequest | None]]:
    return [
        ("A robot may not injure a human being",
         SamplingParams(temperature=0.0, logprobs=1, prompt_logprobs=1, max_tokens=128), None),
        ("To be or not to be,", SamplingParams(temperature=0.8, top_k=5, presence_penalty=0.2, max_tokens=128), None),
        (SQL_PROMPTS[0], SamplingParams(temperature=0.0, logprobs=1, prompt_logprobs=1, max_tokens=128,
                                        stop_token_ids=[32003]),
         LoRARequest("sql-lora", 1, lora_path)),
        (SQL_PROMPTS[0], SamplingParams(temperature=0.0, logprobs=1, prompt_logprobs=1, max_tokens=128,
                                        stop_token_ids=[32003]),
         LoRARequest("sql-lora2", 2, lora_path)),
    ]  # fmt: skip


def process_requests(engine: LLMEngine, test_prompts: list[tuple[str, SamplingParams, LoRARequest | None]]):
    request_id = 0
    finished = []
    while test_prompts or engine.has_unfinished_requests():
        if test_prompts:
            prompt, sampling_params, lora_request = test_prompts.pop(0)
            engine.add_request(str(request_id), prompt, sampling_params, lora_request=lora_request)
            request_id += 1
        request_outputs: list[RequestOutput] = engine.step()
        for request_output in request_outputs:
            if request_output.finished:
                print(request_output)
                finished.append(request_output)
    return finished


def initialize_engine(model: str) -> LLMEngine:
    engine_args = EngineArgs(model=model, enable_lora=True, max_loras=1, max_lora_rank=8, max_cpu_loras=2, max_num_seqs=256)
    return LLMEngine.from_engine_args(engine_args)


def test_vllm_multilora_inference_example_with_llm_engine(setup: dict[str, Path]) -> None:
    engine = initialize_engine(str(setup["base"]))
    lora_path = str(setup["sql"])
    finished = process_requests(engine, create_test_prompts(lora_path))
    by_id = {o.request_id: o for o in finished}
    assert sorted(by_id) == ["0", "1", "2", "3"]
    for rid, adapter in (("0", None), ("2", setup["sql"]), ("3", setup["sql"])):  # the greedy ones
        out = by_id[rid]
        assert out.outputs[0].token_ids == _peft_greedy(setup["base"], adapter, out.prompt_token_ids, 128), rid
    assert by_id["2"].outputs[0].token_ids == by_id["3"].outputs[0].token_ids  # two names, one adapter
    for rid, adapter in (("0", None), ("2", setup["sql"])):  # prompt_logprobs=1: the prompt token's, as PEFT's
        out = by_id[rid]
        ref = _peft_prompt_logprobs(setup["base"], adapter, out.prompt_token_ids)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
        got = [e[t].logprob for e, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])]
        assert torch.allclose(torch.tensor(got), ref, atol=1e-4), rid
    assert by_id["2"].lora_request == LoRARequest("sql-lora", 1, lora_path) and by_id["0"].lora_request is None
    assert 1 <= len(by_id["1"].outputs[0].token_ids) <= 128 and by_id["1"].outputs[0].finish_reason in ("stop", "length")
    assert engine.llm.list_adapters() == ["sql-lora", "sql-lora2"]
