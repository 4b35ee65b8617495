"""Working-set replay: how many LoRA slots a real request trace needs (torch-free).

A trace is JSONL, one request per line: `{"timestamp": ..., "adapter": "name"}`, or an OpenAI
request-log record where `model` names the adapter. `adapter`/`model` null, "" or one of
`base_names` (the base model's served names) is a base-model request: it needs no slot and is
excluded from hit rates. `timestamp` (optional) is
unix seconds (number or numeric string) or ISO 8601; it only sets the trace duration for loads/s.
Requests are replayed in file order.

The slot cache is LRU (what the engine's device tier does). One pass computes the LRU
stack distance of every request (Mattson et al., 1970): a request hits a cache of `n` slots iff
fewer than `n` distinct adapters were used since that adapter's previous request. So one replay
gives the hit count for EVERY max_loras at once. We keep only the `max_slots` most recently
used adapters' last-use times in a sorted list: a reuse is found by bisect, and anything deeper
is a miss for every simulated size.

Hit rate = hits / adapter requests over the WHOLE trace, cold (first-use) misses included, so
a trace cycling over k adapters reaches (N - k) / N with k slots and 0 with k - 1.
"""

from __future__ import annotations

import json
import math
import os
from bisect import bisect_left
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from engine.errors import ConfigError

MAX_SIMULATED_SLOTS = 8192  # far beyond what any GPU holds; bounds the replay's per-request work
_PROGRESS_EVERY = 1 << 16  # lines between progress callbacks

ProgressFn = Callable[[int, int], None]  # (bytes read so far, total bytes)


class TraceError(ConfigError):
    """A trace file that cannot be read or has a malformed line (the message names the line)."""


@dataclass(frozen=True)
class TraceReplay:
    """Result of one LRU replay. `hits_by_slots[n - 1]` = hits with n slots, for n = 1..len."""

    path: str
    requests: int
    adapter_requests: int
    base_requests: int
    distinct_adapters: int
    duration_s: float | None
    hits_by_slots: tuple[int, ...]
    max_simulated: int

    @property
    def exact_limit(self) -> int:
        """Largest slot count whose hit count is known exactly (all counts beyond stay the same)."""
        return len(self.hits_by_slots)

    def hits(self, slots: int) -> int:
        """Requests served from a resident slot with `slots` LRU slots."""
        if slots < 1:
            return 0
        if slots > len(self.hits_by_slots):
            if self.distinct_adapters > self.max_simulated:
                raise ValueError(f"only slot counts up to {self.max_simulated} were simulated")
            return self.hits_by_slots[-1] if self.hits_by_slots else 0
        return self.hits_by_slots[slots - 1]

    def loads(self, slots: int) -> int:
        """Adapter loads (misses, cold ones included) with `slots` slots."""
        return self.adapter_requests - self.hits(slots)

    def hit_rate(self, slots: int) -> float:
        """hits / adapter requests over the whole trace (1.0 for a trace with no adapter requests)."""
        return self.hits(slots) / self.adapter_requests if self.adapter_requests else 1.0

    def loads_per_second(self, slots: int) -> float | None:
        """Loads divided by the trace's time span; None without at least two distinct timestamps."""
        if not self.duration_s:
            return None
        return self.loads(slots) / self.duration_s

    @property
    def best_hit_rate(self) -> float:
        """The hit rate once every adapter fits (max_loras >= distinct adapters): only cold misses remain."""
        if not self.adapter_requests:
            return 1.0
        return (self.adapter_requests - self.distinct_adapters) / self.adapter_requests

    def smallest_slots_for(self, target_hit_rate: float) -> int | None:
        """Smallest max_loras whose hit rate is >= target, or None if no simulated size reaches it."""
        if self.adapter_requests == 0:
            return 1
        need = target_hit_rate * self.adapter_requests
        for n, hits in enumerate(self.hits_by_slots, start=1):
            if hits >= need - 1e-9:
                return n
        return None

    def candidate_slots(self) -> list[int]:
        """1, 2, 4, ... up to the first power of two that holds every adapter (or the simulated cap)."""
        top = min(max(self.distinct_adapters, 1), self.max_simulated)
        out, n = [], 1
        while True:
            out.append(min(n, self.max_simulated))
            if n >= top:
                return out
            n *= 2


def replay_trace(
    path: str | os.PathLike[str],
    *,
    max_slots: int = MAX_SIMULATED_SLOTS,
    progress: ProgressFn | None = None,
    base_names: Collection[str] = (),
) -> TraceReplay:
    """Replay a JSONL trace against an LRU slot cache of every size 1..max_slots in one pass.

    A request naming one of `base_names` is a base-model request, like one naming no adapter.
    """
    base_names = frozenset(base_names)
    path = Path(path)
    try:
        total = path.stat().st_size
        f = open(path, "rb")  # noqa: SIM115 - closed below; binary so tell() works while iterating
    except OSError as exc:
        raise TraceError(f"cannot read trace {str(path)!r}: {exc.strerror or exc}") from None
    loads, bisect, missing = json.loads, bisect_left, _MISSING
    last: dict[str, int] = {}  # adapter -> time (request index) of its latest use
    recent: list[int] = []  # ascending last-use times of the max_slots most recently used adapters
    depth_hist = [0] * max_slots  # depth_hist[d]: reuses with d other adapters used in between
    t = base = records = 0
    t_min = t_max = None
    with f:
        for lineno, raw in enumerate(f, start=1):
            if lineno % _PROGRESS_EVERY == 0 and progress is not None:
                progress(f.tell(), total)
            try:
                obj = loads(raw)
            except ValueError as exc:
                if not raw.strip():
                    continue  # blank line
                raise TraceError(f"{path.name} line {lineno}: malformed JSON ({_why(exc)})") from None
            except RecursionError:
                raise TraceError(f"{path.name} line {lineno}: malformed JSON (nested too deeply)") from None
            if type(obj) is not dict:
                raise TraceError(f"{path.name} line {lineno}: expected a JSON object, got {type(obj).__name__}")
            records += 1
            ts = obj.get("timestamp")
            if ts is not None:
                if type(ts) is not float or not -_MAX_TIMESTAMP <= ts <= _MAX_TIMESTAMP:  # fast path: a plain float
                    ts = _parse_timestamp(ts, path.name, lineno)
                if t_min is None or ts < t_min:
                    t_min = ts
                if t_max is None or ts > t_max:
                    t_max = ts
            name = obj.get("adapter", missing)
            if name is missing:
                name = obj.get("model", missing)
                if name is missing:
                    raise TraceError(f"{path.name} line {lineno}: no 'adapter' (or 'model') field")
            if not name:  # null / "": a base-model request, no slot needed
                base += 1
                continue
            if type(name) is not str:
                raise TraceError(f"{path.name} line {lineno}: adapter name must be a string, got {name!r}")
            if name in base_names:  # the base model under its served name
                base += 1
                continue
            prev = last.get(name)
            if prev is not None and prev >= recent[0]:  # among the max_slots most recent: a reuse
                k = bisect(recent, prev)
                depth_hist[len(recent) - 1 - k] += 1
                del recent[k]
            elif len(recent) == max_slots:
                del recent[0]  # the LRU adapter leaves every simulated cache
            recent.append(t)
            last[name] = t
            t += 1
    if progress is not None:
        progress(total, total)
    distinct = len(last)
    exact = min(distinct, max_slots)
    hits_by_slots, running = [], 0
    for d in range(exact):
        running += depth_hist[d]
        hits_by_slots.append(running)
    duration = (t_max - t_min) if t_min is not None and t_max is not None and t_max > t_min else None
    return TraceReplay(
        path=str(path),
        requests=records,
        adapter_requests=t,
        base_requests=base,
        distinct_adapters=distinct,
        duration_s=duration,
        hits_by_slots=tuple(hits_by_slots),
        max_simulated=max_slots,
    )


_MISSING = object()


def _why(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    return str(exc).splitlines()[0][:120]


# JSON allows NaN, Infinity, 1e999 and 400-digit integers: a timestamp must be a float within +-1e300 (any unit:
# seconds, ms or ns all fit) so that the trace's duration (max - min) and loads/s stay finite numbers.
_MAX_TIMESTAMP = 1e300


def _parse_timestamp(value: object, name: str, lineno: int) -> float:
    """Unix seconds (int, float or a numeric string) or ISO 8601, as a finite float; TraceError otherwise."""
    ts: float | None = None
    if type(value) is int or type(value) is float:
        try:
            ts = float(value)
        except OverflowError:  # a 400-digit integer
            ts = math.inf
    elif isinstance(value, str):
        try:
            ts = float(value)
        except ValueError:
            try:
                ts = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except (ValueError, OverflowError):
                pass
    if ts is None:
        raise TraceError(f"{name} line {lineno}: timestamp must be unix seconds or ISO 8601, got {value!r}")
    if not -_MAX_TIMESTAMP <= ts <= _MAX_TIMESTAMP:  # NaN fails this too
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise TraceError(f"{name} line {lineno}: timestamp must be a finite number of unix seconds, got {shown}")
    return ts


__all__ = ["MAX_SIMULATED_SLOTS", "TraceError", "TraceReplay", "replay_trace"]
