"""Adapters are immutable once registered (issue 15).

A request finishes on the adapter version it was admitted with, whatever happens to the name
meanwhile (replace, unload, preemption); a re-read from disk after eviction gives the registered
files and bytes or fails that adapter alone, cleanly; requests waiting for an unloaded adapter
are told so. Bookkeeping with fakes first (milliseconds), then the real demo engine.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.errors import AdapterNotFoundError
from engine.lora.manager import AdapterCache, AdapterChangedError, AdapterVersionGoneError


# ---------------------------------------------------------------------------------- fakes
@dataclass(frozen=True)
class Fake:
    name: str
    path: str
    fingerprint: object


class Disk:
    """A loader whose adapters carry a fingerprint = what is on the fake disk now."""

    def __init__(self, max_loras: int) -> None:
        self.content: dict[str, str] = {}
        self.slots: list[Fake | None] = [None] * max_loras
        self.loads: list[str] = []

    def load(self, name: str, path: str) -> Fake:
        self.loads.append(path)
        return Fake(name, path, self.content[path])

    def write(self, slot: int, adapter: Fake) -> None:
        self.slots[slot] = adapter

    def clear(self, slot: int) -> None:
        self.slots[slot] = None


def make(max_loras: int = 1, max_cpu: int = 1) -> tuple[AdapterCache, Disk]:
    disk = Disk(max_loras)
    cache = AdapterCache(max_loras=max_loras, max_cpu_loras=max_cpu, loader=disk.load,
                         slot_writer=disk.write, slot_clearer=disk.clear)
    return cache, disk


def test_bound_version_survives_replace_and_preemption() -> None:
    cache, disk = make(1, 1)
    disk.content.update({"/p/a1": "v1", "/p/a2": "v2", "/p/b": "b"})
    cache.register("a", "/p/a1")
    s = cache.acquire("a")
    vid = cache.bind(s)  # a request admitted on a's first version
    cache.release("a", s)  # ... is preempted
    cache.register("a", "/p/a2")  # replace: new requests get v2
    cache.register("b", "/p/b")
    s2 = cache.acquire("a")
    assert disk.slots[s2].fingerprint == "v2"
    cache.release("a", s2)
    s3 = cache.acquire("a", version=vid)  # the preempted request comes back: v1, not v2
    assert disk.slots[s3].fingerprint == "v1"
    cache.release("a", s3)
    cache.unbind(vid)  # it finished: the old version is gone for good
    assert "a" in cache and cache.version_of("a") != vid
    with pytest.raises(AdapterVersionGoneError):
        cache.acquire("a", version=vid)
    assert all(v.fingerprint != "v1" for v in cache._cpu)  # no stale copy left in the CPU tier


def test_replaced_version_a_paused_request_needs_stays_in_cpu_even_if_its_files_go() -> None:
    cache, disk = make(1, 2)
    disk.content.update({"/p/a1": "v1", "/p/a2": "v2", "/p/b": "b", "/p/c": "c"})
    cache.register("a", "/p/a1")
    s = cache.acquire("a")
    vid = cache.bind(s)
    cache.release("a", s)  # preempted
    cache.register("a", "/p/a2")
    del disk.content["/p/a1"]  # the operator deleted the old files after the replace
    for n in "bc":  # other adapters churn through the CPU tier
        cache.register(n, f"/p/{n}")
        cache.release(n, cache.acquire(n))
    s = cache.acquire("a", version=vid)  # served from the CPU copy: no disk read
    assert disk.slots[s].fingerprint == "v1"
    cache.release("a", s)
    cache.unbind(vid)
    assert all(v.fingerprint != "v1" for v in cache._cpu)


@pytest.mark.parametrize("tampered", [False, True])
def test_bound_version_evicted_before_the_replace_is_reread_and_checked(tampered: bool) -> None:
    cache, disk = make(1, 1)
    disk.content.update({"/p/a1": "v1", "/p/a2": "v2", "/p/b": "b"})
    cache.register("a", "/p/a1")
    s = cache.acquire("a")
    vid = cache.bind(s)
    cache.release("a", s)  # preempted
    cache.register("b", "/p/b")
    cache.release("b", cache.acquire("b"))  # b takes the slot and the CPU tier: v1 is on disk only
    assert cache.cpu_resident() == ["b"]
    cache.register("a", "/p/a2")  # replaced while the request is paused
    if tampered:
        disk.content["/p/a1"] = "evil"
        with pytest.raises(AdapterChangedError):
            cache.acquire("a", version=vid)
        cache.unbind(vid)  # the engine fails that request; the version is forgotten
        assert vid not in cache._versions
    else:
        s = cache.acquire("a", version=vid)
        assert disk.slots[s].fingerprint == "v1" and disk.loads[-1] == "/p/a1"


def test_unload_keeps_bound_requests_and_tells_new_ones() -> None:
    cache, disk = make(2, 2)
    disk.content["/p/a"] = "a"
    cache.register("a", "/p/a")
    s = cache.acquire("a")
    vid = cache.bind(s)
    cache.release("a", s)  # preempted
    cache.remove("a")
    with pytest.raises(AdapterNotFoundError):  # a request that never started
        cache.acquire("a")
    s = cache.acquire("a", version=vid)  # the one already under way finishes on its weights
    assert disk.slots[s].path == "/p/a"
    cache.release("a", s)
    cache.unbind(vid)
    assert cache._versions == {} and cache._cpu == {} and disk.slots == [None, None]


def test_changed_bytes_or_files_on_reread_break_that_adapter_only() -> None:
    cache, disk = make(1, 1)
    disk.content.update({"/p/a": "a", "/p/b": "b"})
    cache.register("a", "/p/a")
    cache.register("b", "/p/b")  # evicts a from the CPU tier
    disk.content["/p/a"] = "tampered"
    with pytest.raises(AdapterChangedError, match="changed on disk since it was registered"):
        cache.acquire("a")
    disk.content["/p/a"] = "a"  # even if it is put back, it stays refused until loaded again
    n = len(disk.loads)
    with pytest.raises(AdapterChangedError):
        cache.acquire("a")
    assert len(disk.loads) == n and cache.prefetch(["a"], background=False) == 0
    s = cache.acquire("b")
    assert disk.slots[s].path == "/p/b"  # other adapters are untouched
    cache.release("b", s)
    cache.register("a", "/p/a")  # re-registration clears it
    assert disk.slots[cache.acquire("a")].fingerprint == "a"


# ---------------------------------------------------------------------------------- real engine
GREEDY = dict(max_tokens=40, temperature=0.0)


@pytest.fixture(scope="module")
def demo_adapters() -> dict[str, Path]:
    from engine.demo import DEMO_ADAPTERS

    return dict(DEMO_ADAPTERS)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _run(core, reqs: list[tuple[str, str, str | None]]) -> dict[str, object]:
    from engine import SamplingParams

    for rid, prompt, adapter in reqs:
        core.add_request(rid, prompt, SamplingParams(**GREEDY), adapter)
    out = {}
    while core.has_unfinished():
        for o in core.step():
            if o.finished:
                out[o.request_id] = o
    return out


def test_symlinks_outside_root_after_eviction_are_never_served(tmp_path: Path, demo_adapters, caplog) -> None:
    """Issue 15 case 4: files swapped for symlinks to outside weights, then the adapter pushed out
    of the slots and the CPU tier: the re-read is refused, that adapter's request ends with a clear
    error, the other tenants in the same batch are unaffected."""
    from engine import LLM

    root, outside = tmp_path / "root", tmp_path / "outside"
    mine = _copy(demo_adapters["upper"], root / "mine")
    _copy(demo_adapters["reverse"], outside / "evil")
    llm = LLM(max_loras=1, max_cpu_loras=1)
    llm.add_adapter("mine", str(mine))
    core = llm.engine
    assert _run(core, [("a", "hello world", "mine")])["a"].text == "HELLO WORLD"
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (mine / f).unlink()
        (mine / f).symlink_to(outside / "evil" / f)
    assert _run(core, [("b", "hello world", "rot13")])["b"].text == "uryyb jbeyq"  # mine leaves slot and CPU
    assert "mine" not in core.lora.cache.cpu_resident()
    outs = _run(core, [("c", "hello world", "mine"), ("d", "hello world", "rot13"), ("e", "hello world", None)])
    c = outs["c"]
    assert c.finish_reason == "abort" and c.token_ids == [] and "changed on disk" in c.stop_reason
    assert "outside" not in c.stop_reason  # clients are not told server paths ...
    assert "its files now resolve to" in caplog.text and str(outside) in caplog.text  # ... the log says where
    assert outs["d"].text == "uryyb jbeyq" and outs["e"].text == "hello world"
    # restoring the files does not revive it silently; loading it again (the operator's act) does
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (mine / f).unlink()
        shutil.copy(demo_adapters["upper"] / f, mine / f)
    assert _run(core, [("f", "hello world", "mine")])["f"].finish_reason == "abort"
    llm.add_adapter("mine", str(mine))
    assert _run(core, [("g", "hello world", "mine")])["g"].text == "HELLO WORLD"
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


def test_weights_rewritten_in_place_after_eviction_are_refused(tmp_path: Path, demo_adapters) -> None:
    """Same path, same real file, other bytes (written in place inside the root): the content hash
    catches what a path check cannot."""
    from engine import LLM

    mine = _copy(demo_adapters["upper"], tmp_path / "mine")
    llm = LLM(max_loras=1, max_cpu_loras=1)
    llm.add_adapter("mine", str(mine))
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(demo_adapters["reverse"] / f, mine / f)  # a valid adapter, just not this one
    core = llm.engine
    _run(core, [("b", "hi", "rot13")])
    outs = _run(core, [("c", "hello world", "mine"), ("d", "hello world", "reverse")])
    assert outs["c"].finish_reason == "abort" and "changed on disk" in outs["c"].stop_reason
    assert outs["d"].text == "dlrow olleh"


@pytest.mark.parametrize("kind", ["fifo", "loop", "devnull"])
def test_special_files_at_reread_fail_cleanly(tmp_path: Path, demo_adapters, kind: str) -> None:
    """A FIFO, a symlink loop or a device swapped in under the root neither hangs nor crashes the engine."""
    from engine import LLM

    mine = _copy(demo_adapters["upper"], tmp_path / "mine")
    llm = LLM(max_loras=1, max_cpu_loras=1)
    llm.add_adapter("mine", str(mine))
    w = mine / "adapter_model.safetensors"
    w.unlink()
    if kind == "fifo":
        os.mkfifo(w)
    elif kind == "loop":
        w.symlink_to(w)
    else:
        w.symlink_to("/dev/null")
    core = llm.engine
    _run(core, [("b", "hi", "rot13")])
    outs = _run(core, [("c", "hello world", "mine"), ("d", "hello world", "rot13")])
    assert outs["c"].finish_reason == "abort" and "could not be loaded" in outs["c"].stop_reason
    assert outs["d"].text == "uryyb jbeyq"


def _preempt_then(core, action) -> dict[str, object]:
    """Run a base request and an `upper` one in a KV pool too small for both: `upper` (admitted
    last: the victim under the fcfs policy) is preempted mid-answer; `action()` runs while it waits
    to be re-admitted."""
    from engine import SamplingParams

    core.add_request("base", "hello there friend", SamplingParams(**GREEDY))
    core.add_request("v", "hello world again", SamplingParams(**GREEDY), "upper")
    done, acted = {}, False
    while core.has_unfinished():
        for o in core.step():
            if o.finished:
                done[o.request_id] = o
        waiting = [s for s in core.scheduler.waiting if s.request_id == "v"]
        if not acted and waiting and waiting[0].num_preemptions:
            assert waiting[0].num_output_tokens > 0  # really mid-answer
            action()
            acted = True
    assert acted, "the test did not force a preemption"
    return done


@pytest.mark.parametrize("policy", ["fcfs", "fair"])
@pytest.mark.parametrize("change", ["replace", "unload"])
def test_preempted_request_finishes_on_the_version_it_started_with(demo_adapters, change: str, policy: str) -> None:
    """Issue 15 case 5: `hello world again` on `upper`, preempted, `upper` replaced by `reverse`
    (or unloaded) meanwhile: the answer is still the solo run on the old version."""
    from engine import LLM, SamplingParams

    solo = LLM(max_loras=2).generate(["hello world again"], SamplingParams(**GREEDY), adapters=["upper"])[0].text
    assert solo == "HELLO WORLD AGAIN"
    # the victim must be `upper`'s request: fcfs takes the last admitted; fair the most over-served
    # tenant, which a small weight makes `upper` (else the base tenant's longer prompt would)
    weights = (("upper", 0.25),) if policy == "fair" else ()
    llm = LLM(num_kv_blocks=12, block_size=4, max_model_len=48, max_loras=2, max_cpu_loras=3, scheduling_policy=policy,
              lora_weights=weights)
    core = llm.engine
    if change == "replace":
        act = lambda: llm.add_adapter("upper", str(demo_adapters["reverse"]))  # noqa: E731
    else:
        act = lambda: llm.remove_adapter("upper")  # noqa: E731
    done = _preempt_then(core, act)
    assert core.scheduler.num_preemptions >= 1
    assert done["v"].text == solo and done["v"].finish_reason == "stop"
    assert done["base"].text == "hello there friend"
    if change == "replace":  # new requests get the new version; the old one is gone
        assert llm.generate(["hello world"], SamplingParams(**GREEDY), adapters=["upper"])[0].text == "dlrow olleh"
        assert len(core.lora.cache._versions) == 3
    else:
        assert "upper" not in llm.list_adapters() and len(core.lora.cache._versions) == 2
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


def test_waiting_request_for_unloaded_adapter_is_told_so(demo_adapters) -> None:
    """Issue 15 case 3 (engine side): a request that never started when its adapter was unloaded ends
    with finish_reason 'abort' and a stop_reason that says the adapter was unloaded."""
    from engine import LLM, SamplingParams

    llm = LLM(max_loras=1, max_num_seqs=1)
    core = llm.engine
    core.add_request("first", "hello world", SamplingParams(**GREEDY), "rot13")
    core.add_request("second", "hello world", SamplingParams(**GREEDY), "upper")
    core.step()  # first runs; second waits for the seat
    llm.remove_adapter("upper")
    done = {}
    while core.has_unfinished():
        done.update({o.request_id: o for o in core.step() if o.finished})
    assert done["first"].text == "uryyb jbeyq"
    assert done["second"].finish_reason == "abort"
    assert done["second"].stop_reason == "adapter 'upper' was unloaded before this request started"


def test_server_maps_an_unloaded_adapter_abort_to_404_not_shutdown() -> None:
    """Issue 15 case 3 (server side): the engine's 'adapter ... was unloaded' ending becomes a 404
    naming the adapter; a plain abort (shutdown) stays a 503."""
    from engine.outputs import RequestOutput
    from engine.server.app import _check_abort
    from engine.server.protocol import APIError

    class Engine:  # the adapter is already gone from the registry
        def list_adapters(self) -> list[str]:
            return []

    gone = RequestOutput("r", "hi", [1], adapter="upper", finished=True, finish_reason="abort",
                         stop_reason="adapter 'upper' was unloaded before this request started")
    with pytest.raises(APIError) as err:
        _check_abort(gone, Engine())
    assert (err.value.status, err.value.param, err.value.message) == (404, "model", gone.stop_reason)
    shutdown = RequestOutput("r", "hi", [1], adapter="upper", finished=True, finish_reason="abort")
    with pytest.raises(APIError) as err:
        _check_abort(shutdown, Engine())
    assert err.value.status == 503 and "shutting down" in err.value.message


def test_registration_confines_the_files_actually_read(tmp_path: Path, demo_adapters) -> None:
    """The server checks --adapter-root before the load; files swapped for outside symlinks between
    that check and the load are caught on the files the loader really opened, and nothing changes."""
    from engine import LLM
    from engine.errors import AdapterError

    root, outside = (tmp_path / "root").resolve(), (tmp_path / "outside").resolve()
    ok = _copy(demo_adapters["upper"], root / "ok")
    swapped = _copy(demo_adapters["upper"], root / "swapped")
    _copy(demo_adapters["reverse"], outside / "evil")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (swapped / f).unlink()
        (swapped / f).symlink_to(outside / "evil" / f)
    llm = LLM(max_loras=1)
    lora = llm.engine.lora
    lora.add_adapter("ok", str(ok), root=str(root))
    with pytest.raises(AdapterError, match="lies outside the adapter root"):
        lora.add_adapter("ok", str(swapped), root=str(root))  # a bad replacement keeps the old version
    with pytest.raises(AdapterError, match="lies outside the adapter root"):
        lora.add_adapter("new", str(swapped), root=str(root))
    assert "new" not in llm.list_adapters()
    assert _run(llm.engine, [("a", "hello world", "ok")])["a"].text == "HELLO WORLD"


def test_weights_that_overflow_the_slot_dtype_are_refused_on_the_bytes_served(tmp_path: Path, demo_adapters) -> None:
    """Finite in the fp32 file, Inf after the cast to fp16 slots: refused at registration (the
    check runs on the tensors the slot will hold, not on a separate read)."""
    import torch
    from safetensors.torch import load_file, save_file

    from engine.errors import AdapterError
    from engine.lora.slots import LoraSlots

    bad = _copy(demo_adapters["upper"], tmp_path / "bad")
    sd = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in sd if "lora_B" in k)
    sd[key] = sd[key].float() * 0 + 1e30
    save_file({k: v.float().contiguous() for k, v in sd.items()}, bad / "adapter_model.safetensors")
    from engine import LLM

    dims = LLM(max_loras=1).engine.runner.dims
    slots = LoraSlots(dims, max_loras=1, max_rank=16, dtype=torch.float16)
    with pytest.raises(AdapterError, match="float16"):
        slots.load("bad", str(bad))
    slots.load("upper", str(demo_adapters["upper"]))  # a normal adapter is fine


def test_loaded_weights_own_their_memory(tmp_path: Path, demo_adapters) -> None:
    """Loaded (validated, hashed) weights are not views of the file: rewriting it in place does not
    change them and truncating it does not crash the process (a memory map would SIGBUS)."""
    import subprocess
    import sys

    mine = _copy(demo_adapters["upper"], tmp_path / "mine")
    code = f"""
import os, torch
from pathlib import Path
from engine.adapters import load_adapter
a = load_adapter({str(mine)!r})
before = [t.clone() for m in a.modules.values() for t in m.tensors()]
f = Path({str(mine)!r}) / "adapter_model.safetensors"
size = f.stat().st_size
with open(f, "r+b") as fh:
    fh.seek(1000); fh.write(b"\\x7f" * (size - 1000))
after = [t for m in a.modules.values() for t in m.tensors()]
assert all(torch.equal(x, y) for x, y in zip(before, after)), "weights changed with the file"
os.truncate(f, 100)
print(float(sum(t.float().sum() for t in after)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


def test_http_request_waiting_for_an_unloaded_adapter_gets_404_naming_it(tmp_path: Path) -> None:
    """Through the real server: one seat, a long base request holds it, a request for `upper` waits,
    `upper` is unloaded: the waiting request gets 404 'adapter 'upper' was unloaded ...', not 503
    'the server is shutting down'; the base request completes normally."""
    import json
    import threading
    import urllib.error
    import urllib.request

    from engine.config import EngineConfig
    from engine.server.config import ServerConfig
    from tests.server.real_server import KEY, ServerThread, scrape

    cfg = ServerConfig(engine=EngineConfig(max_loras=2, max_num_seqs=1), port=0, api_key=KEY, allow_runtime_lora=True,
                       adapter_root=str(tmp_path))
    srv = ServerThread(cfg).start()

    def post(path: str, body: dict) -> tuple[int, dict | str]:
        req = urllib.request.Request(f"{srv.url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                text = r.read().decode()
                return r.status, json.loads(text) if text.startswith("{") else text
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode())

    results: dict[str, tuple[int, object]] = {}
    long = {"model": "mlora-demo", "prompt": "hello", "max_tokens": 120, "temperature": 0, "ignore_eos": True}
    short = {"model": "upper", "prompt": "hello", "max_tokens": 8, "temperature": 0}
    try:
        a = threading.Thread(target=lambda: results.__setitem__("a", post("/v1/completions", long)))
        a.start()
        deadline = time.monotonic() + 60
        while scrape(srv.url, "vllm:num_requests_running") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        b = threading.Thread(target=lambda: results.__setitem__("b", post("/v1/completions", short)))
        b.start()
        while scrape(srv.url, "vllm:num_requests_waiting") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert post("/v1/unload_lora_adapter", {"lora_name": "upper"})[0] == 200
        a.join(120)
        b.join(120)
        metrics = urllib.request.urlopen(f"{srv.url}/metrics", timeout=30).read().decode()
        assert 'adapter="upper"' not in metrics  # the failed request left no series for the unloaded adapter
    finally:
        srv.stop()
    assert results["a"][0] == 200
    status, body = results["b"]
    assert status == 404, body
    assert body["error"]["message"] == "adapter 'upper' was unloaded before this request started"
