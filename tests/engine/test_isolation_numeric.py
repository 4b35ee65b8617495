"""Numerical isolation on the real engine (built-in demo model, fp32 on CPU): a request whose
numbers blow up ends alone with a clear error, and no state it leaves behind (KV blocks, padding,
slots, sampler) changes any other tenant's output; a failing step ends only its requests.

Poisoned adapters are refused at registration (tests/adapters/test_poisoned_values.py); to test
what happens *beyond* validation, these tests switch the value check off on purpose and register
`upper` with lora_B x 1e30, whose activations overflow inside the model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine.adapters.loader as adapter_loader
from engine import LLM, SamplingParams
from engine.errors import AdapterError, EngineDeadError
from engine.loader import demo_adapters

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
# other tenants: base model and the three demo adapters, prompts of different lengths
TENANTS = [("hello world", None), ("the cat sat on the mat", "upper"), ("abc", "reverse"),
           ("isolation matters a lot here", "rot13"), ("x", None)]


def _poisoned_copy(dst: Path, factor: float = 1e30) -> Path:
    """`upper` with every lora_B multiplied by `factor` (fp32 file)."""
    shutil.copytree(dict(demo_adapters())["upper"], dst)
    p = dst / "adapter_model.safetensors"
    sd = load_file(str(p))
    for k in sd:
        if "lora_B" in k:
            sd[k] = sd[k] * factor
    save_file(sd, str(p), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def llm() -> LLM:
    # a small pool with small blocks: freed blocks (and the NaN a failed request left in them) come
    # back within a few requests, so stale K/V would be read if anything could read it
    return LLM(enable_lora=True, max_loras=4, max_num_seqs=16, num_kv_blocks=40, block_size=4, seed=0)


@pytest.fixture(scope="module")
def solo(llm: LLM) -> dict[tuple[str, str | None], list[int]]:
    """Each tenant's greedy tokens, run alone (before anything hostile was loaded)."""
    return {(p, a): llm.generate([p], GREEDY, adapters=[a])[0].token_ids for p, a in TENANTS}


@pytest.fixture
def evil(llm: LLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Register the x1e30 `upper` as "evil" with the value check switched off (beyond validation)."""
    path = _poisoned_copy(tmp_path / "evil")
    with pytest.raises(AdapterError, match="LoRA gain"):  # what validation says without the bypass
        llm.add_adapter("evil", str(path))
    monkeypatch.setattr(adapter_loader, "module_value_issue", lambda *a, **k: None)
    llm.add_adapter("evil", str(path))
    yield "evil"
    llm.remove_adapter("evil")


def _assert_failed_alone(out) -> None:
    assert out.finished and out.finish_reason == "abort"
    assert out.error and "non-finite" in out.error and "'evil'" in out.error
    assert out.stop_reason == out.error
    assert out.error_param is None  # the model's fault (HTTP 500), not the request's


@pytest.mark.parametrize("scrub", [True, False], ids=["scrubbed", "no-scrub"])
def test_poisoned_request_ends_alone_and_others_equal_their_solo_runs(llm, solo, evil, monkeypatch, scrub):
    """The poisoned request first alone, then in the same batch as every other tenant, then the
    others again: their greedy tokens equal their solo runs each time. With the scrub of the failed
    request's KV switched off, the always-zero padding kv_slot alone must keep its NaN unread."""
    if not scrub:
        monkeypatch.setattr(llm.engine.runner, "scrub", lambda block_table: None)
    first = llm.generate(["poison the cache please"], GREEDY, adapters=[evil])[0]
    _assert_failed_alone(first)
    prompts = ["poison the cache please"] + [p for p, _ in TENANTS] + ["more poison"]
    adapters = [evil] + [a for _, a in TENANTS] + [evil]
    outs = llm.generate(prompts, GREEDY, adapters=adapters)
    _assert_failed_alone(outs[0])
    _assert_failed_alone(outs[-1])
    for (p, a), o in zip(TENANTS, outs[1:-1]):
        assert o.error is None and o.finish_reason == "length"
        assert o.token_ids == solo[(p, a)], (p, a)
    after = llm.generate([p for p, _ in TENANTS], GREEDY, adapters=[a for _, a in TENANTS])
    assert [o.token_ids for o in after] == [solo[t] for t in TENANTS]
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_sampled_requests_of_every_tenant_still_succeed(llm, evil):
    """Seeded sampled requests next to poisoned ones: no crash in the sampler, and each equals its
    own seeded run without the poisoned neighbours."""
    params = [SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, top_k=50, seed=100 + i, ignore_eos=True)
              for i in range(len(TENANTS))]
    alone = [llm.generate([p], [sp], adapters=[a])[0].token_ids for (p, a), sp in zip(TENANTS, params)]
    prompts = ["poison"] + [p for p, _ in TENANTS]
    evil_params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, logprobs=2)
    outs = llm.generate(prompts, [evil_params] + params, adapters=[evil] + [a for _, a in TENANTS])
    _assert_failed_alone(outs[0])
    assert [o.token_ids for o in outs[1:]] == alone
    assert all(o.finish_reason == "length" for o in outs[1:])


def test_a_reused_block_with_stale_nan_is_never_read(llm, solo):
    """Freed blocks keep whatever their last owner wrote; a decode batch must read none of it.
    Fill every KV slot with NaN (as a failed request would leave it), then run mixed-length batches.
    A failed request's blocks are dropped from the prefix cache (test_prefix_cache_engine.py), so the
    prefix cache is emptied first: here every block stands for one a failed request left behind."""
    llm.engine.block_manager.reset_prefix_cache()
    llm.engine.runner.kv_cache[:, :, : llm.engine.runner.zero_kv_slot].fill_(float("nan"))
    outs = llm.generate([p for p, _ in TENANTS], GREEDY, adapters=[a for _, a in TENANTS])
    assert [o.token_ids for o in outs] == [solo[t] for t in TENANTS]
    assert bool((llm.engine.runner.kv_cache[:, :, llm.engine.runner.zero_kv_slot] == 0).all())


def test_reset_and_reused_lora_slots_hold_nothing_of_the_previous_adapter(llm):
    """A slot reset, or refilled with a lower-rank adapter, is zero outside what the new one covers."""
    from engine.lora import LoraSlots

    slots = LoraSlots(llm.engine.runner.dims, max_loras=2, max_rank=16)
    paths = dict(demo_adapters())
    slots.set_slot(1, slots.load("r", str(paths["reverse"])))  # rank 16
    slots.set_slot(1, slots.load("u", str(paths["upper"])))  # rank 4
    for m in slots.modules:
        assert not slots.A[m][:, 1, 4:].any() and not slots.B[m][:, 1, :, 4:].any()
    slots.reset_slot(1)
    for m in slots.modules:
        assert not slots.A[m][:, 1].any() and not slots.B[m][:, 1].any()
    assert not slots.scales[:, :, 1].any()


def test_a_failing_step_ends_only_its_requests_and_the_engine_keeps_serving(llm, solo, monkeypatch, caplog):
    """Inject one exception into the runner: the requests of that step end with the error (logged by
    request id); requests outside that step, and everything after, equal their solo runs."""
    runner = llm.engine.runner
    real_run = runner.run
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected device hiccup")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(runner, "run", flaky)
    monkeypatch.setattr(llm.engine.scheduler, "max_num_seqs", 2)  # steps hold 2 requests
    caplog.set_level("ERROR", logger="mlora.engine")
    outs = llm.generate([p for p, _ in TENANTS], GREEDY, adapters=[a for _, a in TENANTS])
    failed = [o for o in outs if o.error is not None]
    assert len(failed) == 2 and all(o.finish_reason == "abort" and "injected device hiccup" in o.error for o in failed)
    for (p, a), o in zip(TENANTS, outs):
        if o.error is None:
            assert o.token_ids == solo[(p, a)]
    assert all(o.request_id in caplog.text for o in failed)
    after = llm.generate([p for p, _ in TENANTS], GREEDY, adapters=[a for _, a in TENANTS])
    assert [o.token_ids for o in after] == [solo[t] for t in TENANTS]
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_steps_that_always_fail_raise_engine_dead(llm, monkeypatch):
    """A device that fails every step is not a bad request: after MAX_CONSECUTIVE_STEP_FAILURES the
    step raises EngineDeadError (the server then exits non-zero); each failed step's requests end."""
    from engine.core import MAX_CONSECUTIVE_STEP_FAILURES

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(llm.engine.runner, "run", broken)
    core = llm.engine
    for i in range(MAX_CONSECUTIVE_STEP_FAILURES):
        core.add_request(f"dead-{i}", "hello", GREEDY)
    ended = []
    with pytest.raises(EngineDeadError, match="device lost"):
        for _ in range(MAX_CONSECUTIVE_STEP_FAILURES + 1):
            core.scheduler.max_num_seqs = 1
            ended += core.step()
    assert [o.request_id for o in ended] == [f"dead-{i}" for i in range(MAX_CONSECUTIVE_STEP_FAILURES - 1)]
    core.scheduler.max_num_seqs = 16
    for i in range(MAX_CONSECUTIVE_STEP_FAILURES):
        core.abort(f"dead-{i}")
    core._failed_steps = 0  # this module's engine stays usable for the tests after this one


def test_sampler_gives_no_token_for_non_finite_rows_and_leaves_others_alone():
    from engine.sampler import sample

    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=1, logprobs=3),
              SamplingParams(temperature=0.8, seed=2), SamplingParams(temperature=0.0, logprobs=1)]
    gens = lambda: [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), None]  # noqa: E731
    clean_toks, clean_lps = sample(logits, params, gens())
    for bad_row, bad in ((1, float("nan")), (2, float("inf")), (3, float("-inf"))):
        poisoned = logits.clone()
        poisoned[bad_row, 7] = bad
        toks, lps = sample(poisoned, params, gens())
        assert toks[bad_row] is None and lps[bad_row] is None
        assert [t for i, t in enumerate(toks) if i != bad_row] == [t for i, t in enumerate(clean_toks) if i != bad_row]


def test_a_vanishing_temperature_never_draws_from_nan():
    from engine.sampler import sample

    logits = torch.randn(1, 50) * 10
    toks, _ = sample(logits, [SamplingParams(temperature=1e-45, seed=0)], [torch.Generator().manual_seed(0)])
    assert toks == [int(logits.argmax())]


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_sampling_params_refuse_non_finite_values(field, value):
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{field} must be a finite number"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(top_p=True), "top_p must be a number"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(logprobs=1.5), "logprobs must be an integer"),
])
def test_sampling_params_refuse_wrong_types(kwargs, fragment):
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match=fragment):
        SamplingParams(**kwargs)


def test_a_slot_never_takes_non_finite_weights_even_past_validation(llm, tmp_path):
    """set_slot with an unchecked adapter whose B overflows the slot dtype: refused, slot unchanged
    (rows of other tenants share the slot stacks' matmuls on some kernel paths, where 0 * inf = NaN)."""
    from engine.adapters import load_adapter
    from engine.lora import LoraSlots

    slots = LoraSlots(llm.engine.runner.dims, max_loras=2, max_rank=16, dtype=torch.bfloat16)
    path = _poisoned_copy(tmp_path / "inf", factor=1e300)  # fp32 file: B is already inf
    adapter = load_adapter(path)
    with pytest.raises(AdapterError, match=r"overflow the slot dtype \(bfloat16\)"):
        slots.set_slot(0, adapter)
    assert all(not slots.A[m][:, 0].any() and not slots.B[m][:, 0].any() for m in slots.modules)
    assert not slots.scales[:, :, 0].any()
    assert all(slots.get(l, m) is None for l in range(slots.dims.layers) for m in slots.modules)  # the model skips it


def test_preempted_and_recomputed_requests_next_to_a_poisoned_one_equal_their_solo_runs(tmp_path, monkeypatch):
    """A pool so small that requests are preempted and recomputed while poisoned requests come and
    go: recomputed sequences rewrite every position they read, so they still equal their solo runs."""
    llm = LLM(enable_lora=True, max_loras=4, max_num_seqs=8, num_kv_blocks=14, block_size=4, seed=0)
    tenants = [("hello world", None), ("the cat sat", "upper"), ("abc", "reverse"), ("rot me", "rot13")]
    solo = [llm.generate([p], GREEDY, adapters=[a])[0].token_ids for p, a in tenants]
    monkeypatch.setattr(adapter_loader, "module_value_issue", lambda *a, **k: None)
    llm.add_adapter("evil", str(_poisoned_copy(tmp_path / "evil")))
    prompts = ["poison"] + [p for p, _ in tenants] * 2 + ["poison again"]
    adapters = ["evil"] + [a for _, a in tenants] * 2 + ["evil"]
    outs = llm.generate(prompts, GREEDY, adapters=adapters)
    assert llm.engine.scheduler.num_preemptions > 0
    assert outs[0].error and outs[-1].error
    assert [o.token_ids for o in outs[1:-1]] == solo * 2
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_penalised_rows_keep_the_non_finite_rule():
    """A penalised row whose logits are non-finite gets no token; one the constraints leave without a
    finite logit (allowed_token_ids all bad words / all EOS under min_tokens), or one a tiny
    repetition_penalty pushes to +inf, gets no token either; the batch's other rows are untouched."""
    from types import SimpleNamespace

    from engine.sampler import sample

    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    logits[3, 5] = 30.0
    seq = lambda out=(), bad=(): SimpleNamespace(  # noqa: E731
        token_ids=[5, *out], output_token_ids=list(out), num_output_tokens=len(out), eos_token_ids=[2],
        bad_words_token_ids=[list(w) for w in bad], constraints_exhausted=False)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=1, presence_penalty=1.0, logprobs=2),
              SamplingParams(temperature=0.8, seed=2, allowed_token_ids=[2], min_tokens=3, max_tokens=4),
              SamplingParams(temperature=0.8, seed=3, repetition_penalty=1e-38)]
    seqs = [seq(), seq((4,)), seq(), seq()]
    gens = lambda: [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2),  # noqa: E731
                    torch.Generator().manual_seed(3)]
    toks, lps = sample(logits.clone(), params, gens(), seqs)
    assert toks[2] is None and toks[3] is None and lps[2] is None
    assert toks[0] == int(logits[0].argmax()) and toks[1] is not None and lps[1] is not None
    # the two rows left without a token by their own constraints are marked so (a client error, not the model's)
    assert [s.constraints_exhausted for s in seqs] == [False, False, True, True]
    seqs = [seq(), seq((4,)), seq(), seq()]
    poisoned = logits.clone()
    poisoned[1, 7] = float("nan")
    toks2, lps2 = sample(poisoned, params, gens(), seqs)
    assert toks2[1] is None and lps2[1] is None and toks2[0] == toks[0]
    assert not seqs[1].constraints_exhausted  # non-finite logits: the model's fault, even on a penalised row
    greedy = [SamplingParams(temperature=0.0, allowed_token_ids=[9], bad_words=["x"])]
    dead = seq(bad=[(9,)])
    assert sample(logits[:1].clone(), greedy, [None], [dead])[0] == [None] and dead.constraints_exhausted


def test_a_request_whose_own_constraints_leave_no_token_ends_alone_as_a_client_error(llm, solo):
    """allowed_token_ids=["a"] with bad_words=["aa"] leaves nothing at output token 2 (the word's last token
    is masked once the output ends with "a"), and a tiny repetition_penalty over a temperature pushes a
    seen token to +inf: both used to end like non-finite model logits (a 500 on the server). They end
    with `error_param` naming the field (a 400), the batch's other requests equal their solo runs, and
    the engine keeps serving."""
    a = llm.engine.tokenizer.encode("a", add_special_tokens=False)
    dead_words = SamplingParams(max_tokens=6, temperature=0.0, allowed_token_ids=a, bad_words=["aa"])
    dead_penalty = SamplingParams(max_tokens=6, temperature=1.0, seed=1, repetition_penalty=1e-38)
    prompts = [p for p, _ in TENANTS]
    outs = llm.generate(["hello world", *prompts, "hello world"], [dead_words, *[GREEDY] * len(TENANTS), dead_penalty],
                        adapters=[None, *[t for _, t in TENANTS], "upper"])
    words, penalty = outs[0], outs[-1]
    assert words.finish_reason == "abort" and words.text == "a" and words.error_param == "allowed_token_ids"
    assert "output token 2" in words.error and "allowed_token_ids and bad_words" in words.error
    assert "non-finite" not in words.error and words.stop_reason == words.error
    assert penalty.finish_reason == "abort" and penalty.error_param == "repetition_penalty"
    assert "repetition_penalty and temperature" in penalty.error
    assert [o.token_ids for o in outs[1:-1]] == [solo[t] for t in TENANTS]
    assert all(o.error is None for o in outs[1:-1])
    assert not llm.engine.has_unfinished()
    assert llm.generate(["hello world"], GREEDY)[0].token_ids == solo[("hello world", None)]


@pytest.mark.parametrize(("kwargs", "param", "says"), [
    (dict(allowed_token_ids="a", bad_words=["a"]), "allowed_token_ids", "bad_words mask them"),
    (dict(allowed_token_ids="eos", min_tokens=2), "allowed_token_ids", "min_tokens=2 masks EOS"),
    (dict(allowed_token_ids="a+eos", bad_words=["a"], min_tokens=1), "allowed_token_ids", "bad_words mask them and"),
    (dict(repetition_penalty=1e-300), "repetition_penalty", "positive finite float32"),
    (dict(repetition_penalty=1e300), "repetition_penalty", "positive finite float32"),
])
def test_constraints_that_leave_no_token_from_the_start_are_refused_up_front(llm, kwargs, param, says):
    """What is knowable before any step is a ConfigError naming the field (HTTP 400), and nothing starts."""
    from engine.errors import ConfigError

    a = llm.engine.tokenizer.encode("a", add_special_tokens=False)
    eos = sorted(llm.engine.eos_token_ids)
    ids = {"a": a, "eos": eos, "a+eos": a + eos}
    if "allowed_token_ids" in kwargs:
        kwargs = {**kwargs, "allowed_token_ids": ids[kwargs["allowed_token_ids"]]}
    with pytest.raises(ConfigError, match=says) as err:
        llm.generate(["hello world"], SamplingParams(max_tokens=4, **kwargs))
    assert err.value.param == param
    assert not llm.engine.has_unfinished()
    # still allowed: a multi-token bad word (the engine's own check), ignore_eos under min_tokens
    assert llm.generate(["hi"], SamplingParams(max_tokens=2, allowed_token_ids=a + eos, bad_words=["a"]))[0].error is None
    assert llm.generate(["hi"], SamplingParams(max_tokens=2, allowed_token_ids=eos, min_tokens=1,
                                               ignore_eos=True))[0].error is None


@pytest.mark.parametrize("kwargs", [dict(presence_penalty=10**400), dict(min_p=float("nan")),
                                    dict(repetition_penalty=float("inf")), dict(logit_bias={1: 10**400}),
                                    dict(logit_bias={1: float("nan")})])
def test_sampling_params_refuse_non_finite_and_overflowing_sampling_numbers(kwargs):
    """issue 18's numbers are held to the same rule: a ConfigError (400 on the server), never OverflowError."""
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="finite"):
        SamplingParams(**kwargs)
