"""EngineCore: the synchronous engine — requests in, incremental RequestOutputs out, one step at a time.

One step is nano-vllm's three lines plus adapter activation (vLLM's worker):
    out = scheduler.schedule(resident)          # which sequences, how many tokens each (no torch, no I/O)
    failed = self._activate(out)                # load + pin the step's adapters; failed loads leave `out`
    result = self._run(out)                     # tensors live only in the runner
    self._postprocess(out, result, failed)      # append tokens; every way a request ends is decided here
A finished request leaves through `_finish` only, which releases its KV blocks, adapter pins and
sampling generator exactly once (abort between steps leaves through it too).
LLM (offline) and AsyncLLM (server) both drive this class; it is not thread-safe by itself
(AsyncLLM applies adds/aborts between steps).

Failures stay with the request that met them: a request whose logits turn non-finite ends alone
(finish_reason "abort", `error` says why) and its KV blocks are zeroed before reuse; one whose own
sampling constraints leave no token ends the same way, with `error_param` naming the field (the
client's mistake: HTTP 400, where non-finite logits are the engine's, 500); an exception
inside one step's forward ends that step's requests the same way and the engine keeps serving.
Only `MAX_CONSECUTIVE_STEP_FAILURES` failed steps in a row (a broken device, not a bad request)
raise `EngineDeadError` out of `step()`: the caller must stop using this engine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.demo import DEMO_MODEL_NAME
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import ConfigError, EngineDeadError
from engine.input_processor import InputProcessor, resolve_components
from engine.loader import demo_adapters, load_hf_config, load_tokenizer, resolve_model_path
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence
from engine.stats import EngineStats  # re-exported: `from engine.core import EngineStats` keeps working

if TYPE_CHECKING:
    from engine.lora.engine import LoraEngine  # imported at run time only when LoRA is on (it brings torch)

StepResult = tuple[list[int | None], list[TokenLogprob | None]] | Exception  # the runner's tokens, or why it failed

log = logging.getLogger("mlora.engine")

# Failed steps in a row after which the engine gives up (each failure already ended that step's
# requests; this many in a row means every step fails, e.g. a lost device, so a restart is due).
MAX_CONSECUTIVE_STEP_FAILURES = 3


@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    sent_tokens: int = 0
    sent_chars: int = 0


class EngineCore:
    """Model, KV cache, scheduler and request bookkeeping of one engine instance."""

    def __init__(self, config: EngineConfig) -> None:
        from engine.runner import ModelRunner  # torch enters here

        self.config = config
        self.model_path = resolve_model_path(config.model, revision=config.revision)
        self.hf_config = load_hf_config(self.model_path, trust_remote_code=config.trust_remote_code)
        self.tokenizer = load_tokenizer(self.model_path, trust_remote_code=config.trust_remote_code)
        if config.chat_template is not None:
            self.tokenizer.chat_template = config.chat_template
        self.model_name = config.served_model_name or config.model or DEMO_MODEL_NAME
        self.compositions: dict[str, tuple[tuple[str, float], ...]] = {}  # alias -> ((adapter, weight), ...)
        self.runner = ModelRunner(config, self.hf_config, self.model_path)
        self.max_model_len = self.runner.max_model_len
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.lora: LoraEngine | None = None
        if config.enable_lora:
            from engine.lora.engine import LoraEngine

            self.lora = LoraEngine(config, self.runner)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_loras=config.max_loras if self.lora is not None else None,
            can_acquire=self.lora.can_acquire if self.lora is not None else None,
            bind=self.lora.bind if self.lora is not None else None,
            policy=config.scheduling_policy,
            weights=dict(config.lora_weights),
            prompt_weight=config.fair_prompt_weight,
            output_weight=config.fair_output_weight,
            max_seqs_per_tenant=config.max_seqs_per_tenant,
        )
        self.eos_token_ids = self._eos_ids()
        self.vocab_size = self.runner.args.vocab_size
        self.processor = InputProcessor(self.tokenizer, self.vocab_size, self.max_model_len, self.model_name, config,
                                        self.eos_token_ids)
        self._requests: dict[str, _Request] = {}
        self._failed_steps = 0  # consecutive steps whose forward raised
        if self.lora is not None:
            initial = dict(demo_adapters()) if config.model is None else {}
            initial.update(dict(config.loras))
            for name, path in initial.items():  # header-only: 1,000 adapters register in about a second
                self.lora.add_adapter(name, str(path), eager=False)
        for name, comp in config.lora_compose:  # after the adapters they compose
            self.add_composition(name, comp)

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        sources: list[Any] = [getattr(self.hf_config, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)]
        try:
            from transformers import GenerationConfig

            sources.append(GenerationConfig.from_pretrained(str(self.model_path)).eos_token_id)
        except Exception:  # no generation_config.json: fine
            pass
        for s in sources:
            if isinstance(s, int):
                ids.add(s)
            elif isinstance(s, (list, tuple)):
                ids.update(int(x) for x in s)
        return frozenset(ids)

    # -- requests ----------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(prompt text or None, prompt token ids), validated against vocab and context (InputProcessor)."""
        return self.processor.tokenize(prompt)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        *,
        prompt_text: str | None = None,
        priority: int = 0,
        tenant: str | None = None,
        adapters: Any = None,
    ) -> None:
        """Queue a request. `prompt_text` names the text of already-tokenized ids (for outputs).
        `adapters`: compose adapters with weights, [(name, weight), ...] or [{"name", "weight"}, ...]
        (engine.lora.compose); `adapter` may then be None or name the first component. An `adapter`
        that names a composition alias (`lora_compose`) composes too.
        `tenant` = whose fair share it uses (default: the adapter's name, or the base model's name);
        `priority`: lower first under the `priority` scheduling policy."""
        params = params or SamplingParams()
        self._check_new(request_id)
        text, ids = self.processor.process(prompt, params, priority)
        self.add_processed(request_id, ids, params, adapter, prompt_text=text if prompt_text is None else prompt_text,
                           priority=priority, tenant=tenant, adapters=adapters)

    def add_processed(self, request_id: str, ids: list[int], params: SamplingParams, adapter: str | None = None, *,
                      prompt_text: str | None = None, priority: int = 0, tenant: str | None = None,
                      adapters: Any = None) -> None:
        """Queue a request whose prompt and parameters `self.processor` already validated (AsyncLLM does that
        off the engine thread); what needs engine state is decided here: a new id, known adapters."""
        self._check_new(request_id)
        adapter, components = self.resolve_adapters(adapter, adapters)
        seq = Sequence(request_id, ids, params, prompt=prompt_text, adapter=adapter,
                       tenant=self.processor.tenant_of(adapter, tenant), priority=priority,
                       eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len,
                       components=components)  # fmt: skip
        seq.bad_words_token_ids = self.processor.bad_words_token_ids(params.bad_words)
        self._requests[request_id] = _Request(seq, IncrementalDetokenizer(self.tokenizer, ids, params))
        self.scheduler.add(seq)

    def _check_new(self, request_id: str) -> None:
        if request_id in self._requests:
            raise ConfigError(f"duplicate request id {request_id!r}")

    def add_composition(self, name: str, components: Any) -> None:
        """Register (or replace) alias `name` for a composition ("a:0.7,b:0.5" or [(name, weight), ...]);
        requests naming it compose those adapters. Its components must be registered, non-DoRA adapters."""
        from engine.lora.compose import normalize, parse_spec

        comp = normalize(parse_spec(components) if isinstance(components, str) else components,
                         max_components=self.config.max_adapters_per_request)
        if not comp:
            raise ConfigError(f"composition {name!r} has no component with a non-zero weight")
        if self.lora is None:
            raise ConfigError("LoRA is disabled for this engine", hint="create it with enable_lora=True")
        if name in self.lora.names():
            raise ConfigError(f"composition name {name!r} is already an adapter's name")
        self.lora.composition_check(comp)
        self.compositions[name] = comp

    def remove_composition(self, name: str) -> None:
        """Drop alias `name`; requests already admitted with it keep their components."""
        if self.compositions.pop(name, None) is None:
            from engine.errors import AdapterNotFoundError

            raise AdapterNotFoundError(f"composition {name!r} is not registered")

    def resolve_adapters(self, adapter: str | None, adapters: Any = None) -> tuple[str | None, tuple[tuple[str, float], ...]]:
        """One owner for "what does this request run": (adapter name or None, components or ()).
        A plain single adapter of weight 1 gets no components (the single-adapter path, unchanged)."""
        from engine.errors import AdapterNotFoundError
        from engine.lora.compose import is_plain

        _, comp = resolve_components(adapter, adapters, self.compositions, self.config.max_adapters_per_request)
        if not comp:
            return None, ()
        if self.lora is None:
            raise AdapterNotFoundError(f"adapter {comp[0][0]!r} is not registered (LoRA is disabled)")
        if is_plain(comp):
            self.lora.check_adapter(comp[0][0])
            return comp[0][0], ()
        self.lora.composition_check(comp)
        return comp[0][0], comp

    def abort(self, request_id: str) -> RequestOutput | None:
        """Abort a request (waiting or running); its blocks are freed now. None if unknown/finished
        (so a second abort does nothing)."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        req.seq.finish_reason = "abort"
        return self._finish(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns an output for every request that advanced or finished."""
        out = self.scheduler.schedule(self.lora.resident() if self.lora is not None else ())
        failed = self._activate(out)
        result = self._run(out) if not out.is_empty else None
        return self._postprocess(out, result, failed)

    def _activate(self, out: SchedulerOutput) -> list[tuple[Sequence, str]]:
        """Before the forward: unpin the adapters of preempted requests, then load and pin the adapters of
        the step's requests that hold none yet. Those whose adapter could not be loaded (files changed
        on disk, version gone) leave `out.scheduled`; returned with why, for `_postprocess` to end."""
        if self.lora is None:
            return []
        for seq in out.preempted:
            self.lora.release(seq)
        failed = self.lora.activate(it.seq for it in out.scheduled)
        if failed:
            gone = {id(seq) for seq, _ in failed}
            out.scheduled = [it for it in out.scheduled if id(it.seq) not in gone]
        return failed

    def _run(self, out: SchedulerOutput) -> StepResult:
        """The forward and sampling of the scheduled tokens; an exception is returned, not raised (it
        ends this step's requests, not the engine)."""
        now = time.monotonic()
        for item in out.scheduled:
            if item.seq.metrics.first_scheduled_time is None:
                item.seq.metrics.first_scheduled_time = now
        try:
            return self.runner.run(out, self.lora.step_inputs(out) if self.lora is not None else None)
        except Exception as exc:  # noqa: BLE001 - ends this step's requests, not the engine
            return exc

    def _postprocess(self, out: SchedulerOutput, result: StepResult | None,
                     failed: list[tuple[Sequence, str]]) -> list[RequestOutput]:  # fmt: skip
        """The one place a request ends, for every reason: its adapter failed to load, the step failed,
        its logits were non-finite, its own sampling constraints left no token, a stop token or its length
        (`Scheduler.postprocess`), a stop string."""
        outputs = []
        for seq, message in failed:  # adapters that could not be loaded any more (files changed on disk)
            log.warning("request %s: %s", seq.request_id, message)
            seq.finish_reason, seq.stop_reason = "abort", message
            self.block_manager.uncache(seq)  # its blocks were hashed at admission but will never be filled
            outputs.append(self._finish(self._requests[seq.request_id]))
        if isinstance(result, Exception):
            return outputs + self._fail_step(out, result)
        if result is None:
            return outputs
        self._failed_steps = 0
        tokens, logprobs = result
        for item, tok, lp in zip(out.scheduled, tokens, logprobs):
            if item.sample and tok is None:  # no token: the request's own constraints, or non-finite logits
                seq = item.seq
                outputs.append(self._fail_constraints(seq) if seq.constraints_exhausted else self._fail_nonfinite(seq))
            elif lp is not None and item.seq.logprobs is not None:
                item.seq.logprobs.append(lp)
        now = time.monotonic()
        for seq in self.scheduler.postprocess(out, tokens):  # appends tokens; stop tokens and length end here
            req = self._requests[seq.request_id]
            seq.metrics.first_token_time = seq.metrics.first_token_time or now
            seq.metrics.last_token_time = now
            if seq.finish_reason is None or seq.finish_reason == "length":
                stop = req.detok.add(seq.token_ids[-1])
                if stop is not None:
                    seq.finish_reason, seq.stop_reason = "stop", stop
            outputs.append(self._finish(req) if seq.finish_reason is not None else self._output(req))
        if self.lora is not None:
            self.lora.after_step(self.scheduler)
        return outputs

    def _fail(self, seq: Sequence, error: str) -> RequestOutput:
        """End one request with an engine-side error (finish_reason "abort", `error` = why)."""
        seq.finish_reason, seq.stop_reason, seq.error = "abort", error, error
        return self._finish(self._requests[seq.request_id])

    def _fail_constraints(self, seq: Sequence) -> RequestOutput:
        """The sampler found finite logits but nothing this request's own constraints let it sample: the
        client's mistake, told as such (`error_param`: HTTP 400), not as a fault of the model (500)."""
        p = seq.params
        # what masks tokens or pushes them to +inf, first; else whatever made the row penalised (never empty)
        names = [name for name, on in (
            ("allowed_token_ids", p.allowed_token_ids), ("bad_words", p.bad_words),
            ("min_tokens", seq.num_output_tokens < p.min_tokens), ("repetition_penalty", p.repetition_penalty != 1.0),
            ("temperature", p.repetition_penalty != 1.0 and not p.greedy)) if on] or [name for name, on in (
            ("logit_bias", p.logit_bias), ("presence_penalty", p.presence_penalty),
            ("frequency_penalty", p.frequency_penalty), ("min_tokens", p.min_tokens)) if on] or ["logit_bias"]  # fmt: skip
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        error = (f"no token can be sampled at output token {seq.num_output_tokens + 1}: this request's {listed} "
                 "leave no token with a finite logit (every token masked, or one pushed to +inf); the request "
                 "was stopped")
        log.info("request %s: %s", seq.request_id, error)
        seq.error_param = names[0]
        return self._fail(seq, error)

    def _fail_nonfinite(self, seq: Sequence) -> RequestOutput:
        where = f"adapter {seq.adapter!r}" if seq.adapter is not None else "the base model"
        error = (f"the model's logits became non-finite (NaN/Inf) at output token {seq.num_output_tokens + 1} "
                 f"with {where}; the request was stopped")
        log.error("request %s: %s", seq.request_id, error)
        # zero its K/V (NaN) before the blocks are handed out again, and never serve them from the prefix cache
        self.runner.scrub(self.block_manager.uncache(seq))
        return self._fail(seq, error)

    def _fail_step(self, out: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        """A step's forward raised: end that step's requests (each logged by id), keep the engine."""
        self._failed_steps += 1
        ids = [it.seq.request_id for it in out.scheduled]
        log.error("engine step failed (%d in a row) for request(s) %s: %s: %s", self._failed_steps,
                  ", ".join(ids), type(exc).__name__, exc, exc_info=exc)
        error = f"the engine failed while computing this request: {type(exc).__name__}: {exc}"
        outputs = []
        for it in out.scheduled:
            seq = it.seq
            if seq.request_id in self._requests:
                self.runner.scrub(self.block_manager.uncache(seq))  # a half-written step: never let it be read
                outputs.append(self._fail(seq, error))
        if self._failed_steps >= MAX_CONSECUTIVE_STEP_FAILURES:
            raise EngineDeadError(f"{self._failed_steps} engine steps failed in a row; last: {type(exc).__name__}: {exc}") from exc
        return outputs

    def _output(self, req: _Request) -> RequestOutput:
        seq = req.seq
        text = req.detok.visible_text(seq.is_finished)
        ids = seq.output_token_ids
        out = RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=seq.prompt_token_ids, adapter=seq.adapter,
            text=text, token_ids=list(ids), delta_text=text[req.sent_chars :], delta_token_ids=ids[req.sent_tokens :],
            finished=seq.is_finished, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, error=seq.error,
            error_param=seq.error_param,
            logprobs=list(seq.logprobs) if seq.logprobs is not None else None, metrics=seq.metrics,
            prompt_logprobs=list(seq.prompt_logprobs) if seq.prompt_logprobs is not None else None,
        )  # fmt: skip
        req.sent_chars, req.sent_tokens = len(text), len(ids)
        return out

    def _finish(self, req: _Request) -> RequestOutput:
        """The one exit of a request (its finish_reason set), taken once (it leaves `_requests`): its
        seat and KV blocks (a no-op when `Scheduler.postprocess` already freed them), its adapter pins
        and versions, and its sampling generator are released here."""
        seq = req.seq
        seq.metrics.finished_time = time.monotonic()
        self._requests.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        self.runner.release(seq)
        if self.lora is not None:
            self.lora.finish(seq)
        if not isinstance(seq.stop_reason, str):
            req.detok.flush()
        return self._output(req)

    # -- metrics -----------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Counters for metrics; safe to call from another thread while a step runs (snapshots)."""
        running, waiting = list(self.scheduler.running), list(self.scheduler.waiting)  # atomic copies
        s = EngineStats(
            num_running=len(running),
            num_waiting=len(waiting),
            kv_free_blocks=self.block_manager.num_free_blocks,
            kv_total_blocks=self.block_manager.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            tenant_service=dict(self.scheduler.vtc),  # dict() copies are atomic under the GIL
            tenant_prompt_tokens=dict(self.scheduler.prompt_served),
            tenant_output_tokens=dict(self.scheduler.output_served),
            prefix_cache_queries=self.block_manager.queries,
            prefix_cache_hits=self.block_manager.hits,
        )
        for seq in running:  # a composed request counts for each of its components
            for name in seq.adapter_names:
                s.running_by_adapter[name] = s.running_by_adapter.get(name, 0) + 1
        for seq in waiting:
            for name in seq.adapter_names:
                s.waiting_by_adapter[name] = s.waiting_by_adapter.get(name, 0) + 1
        if self.lora is not None:
            self.lora.fill_stats(s)
        return s
