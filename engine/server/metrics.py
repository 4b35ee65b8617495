"""Prometheus metrics for `mlora serve`, on a per-app CollectorRegistry (two apps in one process,
as in tests, never collide).

Request-side series (requests, tokens, TTFT, per-token latency, end-to-end latency) are labelled
by `adapter`: the request's `model` field, i.e. the adapter name or the base model's name.
Engine-side series are read from `AsyncLLM.stats()` at scrape time. Names that routers already
know keep vLLM's spelling: `vllm:num_requests_running`, `vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc` and `vllm:lora_requests_info` (labels `max_lora`,
`waiting_lora_adapters`, `running_lora_adapters`: comma-joined adapter names; value = the
wall-clock time of the update), which the Gateway API Inference Extension reads for LoRA
affinity. Unlike vLLM we keep only the latest `lora_requests_info` series (old label sets are
dropped), which is what a reader that picks the newest timestamp sees anyway.
Prefix caching: `vllm:prefix_cache_queries_total` / `vllm:prefix_cache_hits_total` (tokens looked up
/ found cached at admission; hit rate = hits / queries), as vLLM.
Fair share is labelled by `tenant` (the request's "tenant" / X-Tenant-Id, else its adapter or the
base model's name): `mlora:tenant_service` (the scheduler's weighted counter),
`mlora:tenant_prompt_tokens_total`, `mlora:tenant_generation_tokens_total` (from the engine) and
`mlora:tenant_queue_wait_seconds` (arrival to first scheduled, per request).

vLLM's core request series are exported beside mlora's per-adapter ones, under vLLM's names and
labels (`model_name` = the served base model name, `engine` = "0"), so vLLM's Grafana dashboards
and alerts work unchanged: `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`,
`vllm:request_success_total{finished_reason}`, `vllm:time_to_first_token_seconds`,
`vllm:inter_token_latency_seconds` (and its older name `vllm:time_per_output_token_seconds`),
`vllm:e2e_request_latency_seconds`, `vllm:request_prompt_tokens`, `vllm:request_generation_tokens`,
`vllm:request_queue_time_seconds`, `vllm:num_preemptions_total`. As in vLLM they count every
request, adapters included, under the base model's name; `mlora:*` splits them by adapter.

`mlora:lora_load_duration_seconds{tier}` times both loads: `tier="disk"` (files -> CPU memory)
and `tier="slot"` (CPU memory -> a device slot, which every request of a non-resident adapter waits on).

Unloading an adapter removes every series labelled with it (`forget_adapter`), so a server that
loads and unloads adapters all day exports only the adapters it serves. Requests of that adapter
still in flight at the unload are counted, then their series are removed again as each one ends.
The `tenant` series of its name go too (its default tenant: the scheduler drops those counters).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from engine.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0)
MAX_UNLOADED_REMEMBERED = 1024  # unloaded names whose late-finishing requests still get their series removed
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector:
    """Yields the cumulative engine counters from the last stats snapshot (no double counting)."""

    def __init__(self, labels: tuple[str, str]) -> None:
        self.loads = 0
        self.evictions = 0
        self.preemptions = 0
        self.labels = labels  # (model_name, engine) of vLLM's series
        self.tenants: tuple[dict[str, float], dict[str, int], dict[str, int]] = ({}, {}, {})
        self.prefix_queries = 0
        self.prefix_hits = 0

    def collect(self) -> Iterable[Metric]:
        c = CounterMetricFamily("mlora:lora_loads", "Adapter loads into a device slot (cumulative).")
        c.add_metric([], float(self.loads))
        yield c
        e = CounterMetricFamily("mlora:lora_evictions", "Adapter evictions from a device slot (cumulative).")
        e.add_metric([], float(self.evictions))
        yield e
        p = CounterMetricFamily("vllm:num_preemptions", "Cumulative number of preemptions from the engine.",
                                labels=["model_name", "engine"])
        p.add_metric(list(self.labels), float(self.preemptions))
        yield p
        for family, value, what in (("vllm:prefix_cache_queries", self.prefix_queries, "Prefix cache queries, in terms "
                                     "of number of queried tokens."), ("vllm:prefix_cache_hits", self.prefix_hits,
                                     "Prefix cache hits, in terms of number of cached tokens.")):  # fmt: skip
            c = CounterMetricFamily(family, what, labels=["model_name", "engine"])
            c.add_metric(list(self.labels), float(value))
            yield c
        service, prompt, output = self.tenants
        v = GaugeMetricFamily("mlora:tenant_service", "Fair-share counter of each tenant: weighted tokens served "
                              "(prompt x fair_prompt_weight + output x fair_output_weight) / its weight.", labels=["tenant"])
        for name, value in sorted(service.items()):
            v.add_metric([name], value)
        yield v
        for family, counts, what in (("mlora:tenant_prompt_tokens", prompt, "Prompt tokens admitted"),
                                     ("mlora:tenant_generation_tokens", output, "Tokens generated")):
            c = CounterMetricFamily(family, f"{what} per tenant (cumulative).", labels=["tenant"])
            for name, count in sorted(counts.items()):
                c.add_metric([name], float(count))
            yield c

    def describe(self) -> Iterable[Metric]:
        return []


class ServerMetrics:
    """All series of one server. Handlers call `tracker()`; /metrics calls `refresh()` then `render()`."""

    def __init__(self, model_name: str, *, max_loras: int, lora_enabled: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.max_loras = max_loras
        r = self.registry
        self.requests = Counter("mlora:requests", "Finished requests by adapter and outcome "
                                "(finish reason, or the HTTP status of an error).", ["adapter", "outcome"], registry=r)
        self.prompt_tokens = Counter("mlora:prompt_tokens", "Prompt tokens of finished requests.", ["adapter"], registry=r)
        self.generation_tokens = Counter("mlora:generation_tokens", "Generated tokens.", ["adapter"], registry=r)
        self.ttft = Histogram("mlora:time_to_first_token_seconds", "Time from arrival to the first generated token.",
                              ["adapter"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("mlora:time_per_output_token_seconds", "Time between generated tokens.",
                              ["adapter"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("mlora:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             ["adapter"], buckets=E2E_BUCKETS, registry=r)
        self.load_seconds = Histogram("mlora:lora_load_duration_seconds", "Time to load an adapter: tier=disk "
                                      "(files -> CPU memory) or tier=slot (CPU memory -> a device slot).", ["tier"],
                                      buckets=LOAD_BUCKETS, registry=r)
        # vLLM's names and labels (model_name, engine) for the same request events, all adapters together
        v = ["model_name", "engine"]
        self.v_prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", v, registry=r)
        self.v_gen = Counter("vllm:generation_tokens", "Number of generation tokens processed.", v, registry=r)
        self.v_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                 v + ["finished_reason"], registry=r)
        self.v_ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                                v, buckets=TTFT_BUCKETS, registry=r)
        self.v_itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                               v, buckets=TPOT_BUCKETS, registry=r)
        self.v_tpot = Histogram("vllm:time_per_output_token_seconds", "Histogram of time per output token in "
                                "seconds (vLLM's older name of vllm:inter_token_latency_seconds).", v,
                                buckets=TPOT_BUCKETS, registry=r)
        self.v_e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                               v, buckets=E2E_BUCKETS, registry=r)
        self.v_queue = Histogram("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for "
                                 "request.", v, buckets=E2E_BUCKETS, registry=r)
        token_buckets = _one_two_five(1 << 20)
        self.v_req_prompt = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", v,
                                      buckets=token_buckets, registry=r)
        self.v_req_gen = Histogram("vllm:request_generation_tokens", "Number of generation tokens processed.", v,
                                   buckets=token_buckets, registry=r)
        self.queue_wait = Histogram("mlora:tenant_queue_wait_seconds", "Time from arrival to first being scheduled, "
                                    "per tenant.", ["tenant"], buckets=TTFT_BUCKETS, registry=r)
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch.", ["model_name", "engine"],
                             registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", ["model_name", "engine"],
                             registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                              ["model_name", "engine"], registry=r)
        self.kv_free = Gauge("mlora:kv_cache_free_blocks", "Free KV-cache blocks.", registry=r)
        self.kv_total = Gauge("mlora:kv_cache_total_blocks", "Total KV-cache blocks.", registry=r)
        self.resident = Gauge("mlora:lora_resident_adapters", "Adapters resident in device slots.", registry=r)
        self.resident_by_name = Gauge("mlora:lora_adapter_resident", "1 for each adapter resident in a device slot.",
                                      ["adapter"], registry=r)
        self.running_by_adapter = Gauge("mlora:num_requests_running_by_adapter", "Running requests per adapter.",
                                        ["adapter"], registry=r)
        self.waiting_by_adapter = Gauge("mlora:num_requests_waiting_by_adapter", "Waiting requests per adapter.",
                                        ["adapter"], registry=r)
        self.lora_info = None
        if lora_enabled:
            self.lora_info = Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                                   ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=r)
        self._labels = (model_name, "0")
        self._engine = _EngineCollector(self._labels)
        r.register(self._engine)  # type: ignore[arg-type]
        # unloaded adapters (most recent last, capped): a request of theirs that was still in flight
        # removes its series again when it ends; a new request for the name means it is served again
        self._unloaded: OrderedDict[str, None] = OrderedDict()

    def tracker(self, adapter_label: str, tenant: str | None = None) -> "RequestTracker":
        self._unloaded.pop(adapter_label, None)
        return RequestTracker(self, adapter_label, tenant or adapter_label)

    def forget_adapter(self, name: str) -> None:
        """Remove every series labelled `adapter=name` (call when the adapter is unloaded)."""
        if name == self.model_name:
            return
        for metric in (self.requests, self.prompt_tokens, self.generation_tokens, self.ttft, self.tpot, self.e2e,
                       self.resident_by_name, self.running_by_adapter, self.waiting_by_adapter):
            _remove_matching(metric, "adapter", name)
        _remove_matching(self.queue_wait, "tenant", name)  # the adapter's default tenant (the engine forgets it too)
        self._unloaded[name] = None
        self._unloaded.move_to_end(name)
        while len(self._unloaded) > MAX_UNLOADED_REMEMBERED:
            self._unloaded.popitem(last=False)

    def _tracker_done(self, label: str) -> None:
        if label in self._unloaded:  # it finished after its adapter was unloaded
            self.forget_adapter(label)

    def count_error(self, adapter_label: str, status: int) -> None:
        if adapter_label in self._unloaded:  # e.g. a 404 racing the unload: no series for a gone adapter
            return
        self.requests.labels(adapter_label, str(status)).inc()

    def refresh(self, stats: Any) -> None:
        """Copy one `EngineStats` snapshot into the gauges (called at scrape time)."""
        g = lambda name, default=0: getattr(stats, name, default)  # noqa: E731 - tolerate older engines
        self.running.labels(*self._labels).set(g("num_running"))
        self.waiting.labels(*self._labels).set(g("num_waiting"))
        free, total = g("kv_free_blocks"), g("kv_total_blocks")
        self.kv_free.set(free)
        self.kv_total.set(total)
        self.kv_usage.labels(*self._labels).set((total - free) / total if total else 0.0)
        resident = list(g("resident_adapters", []) or [])
        self.resident.set(len(resident))
        self.resident_by_name.clear()
        for name in resident:
            self.resident_by_name.labels(name).set(1)
        running = dict(g("running_by_adapter", {}) or {})
        waiting = dict(g("waiting_by_adapter", {}) or {})
        for gauge, counts in ((self.running_by_adapter, running), (self.waiting_by_adapter, waiting)):
            gauge.clear()
            for name, count in counts.items():
                gauge.labels(self._adapter_label(name)).set(count)
        self._engine.prefix_queries = g("prefix_cache_queries")
        self._engine.prefix_hits = g("prefix_cache_hits")
        self._engine.loads = g("lora_loads")
        self._engine.evictions = g("lora_evictions")
        self._engine.preemptions = g("num_preemptions")
        self._engine.tenants = (dict(g("tenant_service", {}) or {}), dict(g("tenant_prompt_tokens", {}) or {}),
                                dict(g("tenant_output_tokens", {}) or {}))
        for tier, key in (("disk", "lora_load_seconds"), ("slot", "lora_slot_load_seconds")):
            for seconds in g(key, []) or []:
                self.load_seconds.labels(tier).observe(seconds)
        if self.lora_info is not None:
            names = lambda counts: ",".join(n for n, c in counts.items() if n and c)  # noqa: E731
            self.lora_info.clear()
            self.lora_info.labels(
                max_lora=str(g("max_loras", self.max_loras) or self.max_loras),
                waiting_lora_adapters=names(waiting),
                running_lora_adapters=names(running),
            ).set_to_current_time()

    def _adapter_label(self, name: str | None) -> str:
        return name if name else self.model_name

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _one_two_five(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's token-count buckets)."""
    out, exp = [], 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exp
            if value > limit:
                return out
            out.append(value)
        exp += 1


def _remove_matching(metric: Any, label: str, value: str) -> None:
    """Drop every child of a labelled metric whose `label` equals `value`."""
    if hasattr(metric, "remove_by_labels"):  # prometheus_client >= 0.22
        metric.remove_by_labels({label: value})
        return
    pos = list(metric._labelnames).index(label)
    for values in [v for v in list(metric._metrics) if v[pos] == value]:
        metric.remove(*values)


class RequestTracker:
    """Latency and token accounting of one engine request, fed with each RequestOutput."""

    def __init__(self, metrics: ServerMetrics, adapter_label: str, tenant: str | None = None) -> None:
        self.m = metrics
        self.label = adapter_label
        self.tenant = tenant or adapter_label
        self.arrival = time.monotonic()
        self.last: float | None = None
        self.done = False
        self.generated = 0

    def on_output(self, out: RequestOutput) -> None:
        n = len(out.delta_token_ids)
        if n:
            now = time.monotonic()
            v = self.m._labels
            if self.last is None:
                self.m.ttft.labels(self.label).observe(now - self.arrival)
                self.m.v_ttft.labels(*v).observe(now - self.arrival)
                timing = out.metrics
                if timing is not None and timing.first_scheduled_time is not None:
                    waited = max(0.0, timing.first_scheduled_time - timing.arrival_time)
                    self.m.queue_wait.labels(self.tenant).observe(waited)
                    self.m.v_queue.labels(*v).observe(waited)
                n -= 1  # the first token's time is TTFT, not inter-token latency
            if n > 0 and self.last is not None:
                per_token = (now - self.last) / n
                for hist in (self.m.tpot.labels(self.label), self.m.v_itl.labels(*v), self.m.v_tpot.labels(*v)):
                    for _ in range(n):
                        hist.observe(per_token)
            self.last = now
            self.generated += len(out.delta_token_ids)
            self.m.generation_tokens.labels(self.label).inc(len(out.delta_token_ids))
            self.m.v_gen.labels(*v).inc(len(out.delta_token_ids))
        if out.finished:
            self.finish(out.finish_reason or "stop", len(out.prompt_token_ids))

    def finish(self, outcome: str, prompt_tokens: int = 0) -> None:
        if self.done:
            return
        self.done = True
        elapsed = time.monotonic() - self.arrival
        self.m.requests.labels(self.label, outcome).inc()
        self.m.prompt_tokens.labels(self.label).inc(prompt_tokens)
        self.m.e2e.labels(self.label).observe(elapsed)
        v = self.m._labels
        self.m.v_prompt.labels(*v).inc(prompt_tokens)
        self.m.v_success.labels(*v, outcome).inc()  # stop, length or abort: vLLM's finished_reason values
        self.m.v_e2e.labels(*v).observe(elapsed)
        self.m.v_req_prompt.labels(*v).observe(prompt_tokens)
        self.m.v_req_gen.labels(*v).observe(self.generated)
        self.m._tracker_done(self.label)


def merge_expositions(parts: list[tuple[str, bytes]], *, label: str) -> bytes:
    """One Prometheus exposition from several (e.g. one per Ray Serve replica), each sample tagged
    with `label`="<its part's name>", so the same series of different replicas stay apart."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for value, text in parts:
        for fam in text_string_to_metric_families(text.decode()):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            merged.samples.extend(s._replace(labels={label: value, **s.labels}) for s in fam.samples)

    class _Merged:
        def collect(self) -> Iterable[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())  # type: ignore[arg-type]
    return generate_latest(registry)
