"""Registry at scale (issue 19): registration reads config + safetensors header only; the first load
reads, validates and hashes the tensors and must find what registration saw; the hash rules every
re-read after that. Real demo engine, adapters copied to tmp_path and tampered with."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.lora.test_isolation import _copy, _run, demo_adapters  # noqa: F401 (demo_adapters: a fixture)

WEIGHTS = "adapter_model.safetensors"


def _rewrite_data(path: Path, fn) -> None:
    """Rewrite the tensor bytes of a safetensors file in place, header untouched: data = fn(data)."""
    f = path / WEIGHTS
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    data = fn(raw[8 + n:])
    assert len(data) == len(raw) - 8 - n
    f.write_bytes(raw[: 8 + n] + data)


def _halve_values(data: bytes) -> bytes:
    import torch

    t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return bytes(t.view(torch.float32).mul_(0.5).view(torch.uint8).numpy())  # the demo adapters are fp32


def test_registration_reads_no_tensor_data_and_a_corrupt_one_fails_alone_at_first_use(
        tmp_path: Path, demo_adapters, monkeypatch) -> None:
    """Registering at startup (`loras=`, as `mlora serve --lora`) reads no tensor bytes: a file whose
    data is all NaN but whose header is valid registers; its first use is refused with the reason,
    and the other tenants in the same batch are unaffected."""
    from engine import LLM
    from engine.adapters.files import WeightsFile

    bad = _copy(demo_adapters["upper"], tmp_path / "bad")
    _rewrite_data(bad, lambda d: b"\xff" * len(d))  # every float is NaN
    loras = [(f"copy{i}", str(_copy(demo_adapters["reverse"], tmp_path / f"copy{i}"))) for i in range(20)]
    reads: list[str] = []
    real_pread = WeightsFile._pread
    monkeypatch.setattr(WeightsFile, "_pread", lambda self, *a: (reads.append(str(self.path)), real_pread(self, *a))[1])
    llm = LLM(max_loras=2, max_cpu_loras=2, loras=(*loras, ("bad", str(bad))))
    core = llm.engine
    assert reads == [] and core.lora.cache.stats().disk_loads == 0
    assert "bad" in llm.list_adapters() and "copy19" in llm.list_adapters()
    monkeypatch.undo()

    outs = _run(core, [("c", "hello world", "bad"), ("d", "hello world", "copy7"), ("e", "hello world", None)])
    c = outs["c"]
    assert c.finish_reason == "abort" and c.token_ids == []
    assert "'bad'" in c.stop_reason and "NaN/Inf values" in c.stop_reason
    assert outs["d"].text == "dlrow olleh" and outs["e"].text == "hello world"
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


def test_one_adapter_added_at_runtime_is_fully_checked_at_once(tmp_path: Path, demo_adapters) -> None:
    """`add_adapter` (Python API, HTTP load, --lora-dir) reads the values before it returns: a bad
    one is refused with the reason and nothing changes."""
    from engine import LLM
    from engine.errors import AdapterError

    bad = _copy(demo_adapters["upper"], tmp_path / "bad")
    _rewrite_data(bad, lambda d: b"\xff" * len(d))
    llm = LLM(max_loras=1)
    with pytest.raises(AdapterError, match="'bad' cannot be served: NaN/Inf values"):
        llm.add_adapter("bad", str(bad))
    assert "bad" not in llm.list_adapters()


def test_header_level_problems_are_still_refused_at_registration(tmp_path: Path, demo_adapters) -> None:
    """What config + header can tell is decided at registration, with the reason: shapes that
    disagree with the config's rank, a rank above the slots'."""
    from engine import LLM
    from engine.errors import AdapterError
    from engine.lora.slots import LoraSlots

    llm = LLM(max_loras=1)
    odd = _copy(demo_adapters["upper"], tmp_path / "odd")
    cfg = json.loads((odd / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**cfg, "r": cfg["r"] * 2}))
    with pytest.raises(AdapterError, match="do not have rank"):
        llm.engine.lora.add_adapter("odd", str(odd), eager=False)
    big = _copy(demo_adapters["reverse"], tmp_path / "big")  # rank 16
    small = LoraSlots(llm.engine.runner.dims, max_loras=1, max_rank=8)
    with pytest.raises(AdapterError, match="rank 16 of layer 0 .* exceeds max_lora_rank 8"):
        small.inspect("big", str(big))
    assert "odd" not in llm.list_adapters()


def test_config_changed_between_registration_and_first_load_is_refused(tmp_path: Path, demo_adapters) -> None:
    """Same weights file, another lora_alpha: the first load does not find the config registration saw."""
    from engine import LLM

    mine = _copy(demo_adapters["upper"], tmp_path / "mine")
    llm = LLM(max_loras=1, max_cpu_loras=1, loras=(("mine", str(mine)),))  # header-only registration
    cfg = json.loads((mine / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * 2
    (mine / "adapter_config.json").write_text(json.dumps(cfg))
    outs = _run(llm.engine, [("c", "hello world", "mine"), ("d", "hello world", "reverse")])
    assert outs["c"].finish_reason == "abort" and "changed on disk" in outs["c"].stop_reason
    assert outs["d"].text == "dlrow olleh"
    llm.add_adapter("mine", str(_copy(demo_adapters["upper"], tmp_path / "fresh")))  # a new registration serves
    assert _run(llm.engine, [("e", "hello world", "mine")])["e"].text == "HELLO WORLD"


def test_values_rewritten_after_the_first_load_are_refused_on_reread(tmp_path: Path, demo_adapters) -> None:
    """Header and config untouched, tensor values changed in place after the first load: the content
    hash taken at that load catches it when the adapter is re-read after eviction."""
    from engine import LLM

    mine = _copy(demo_adapters["upper"], tmp_path / "mine")
    llm = LLM(max_loras=1, max_cpu_loras=1, loras=(("mine", str(mine)),))
    core = llm.engine
    assert core.lora.cache.digest_of(core.lora.cache.version_of("mine")) is None  # registered from the header
    assert _run(core, [("a", "hello world", "mine")])["a"].text == "HELLO WORLD"  # first load: hashed
    digest = core.lora.cache.digest_of(core.lora.cache.version_of("mine"))
    assert digest is not None
    _rewrite_data(mine, _halve_values)  # still finite and within bounds: only the hash can tell
    assert _run(core, [("b", "hello world", "rot13")])["b"].text == "uryyb jbeyq"  # mine leaves slot and CPU
    assert "mine" not in core.lora.cache.cpu_resident()
    outs = _run(core, [("c", "hello world", "mine"), ("d", "hello world", "rot13")])
    assert outs["c"].finish_reason == "abort" and "changed on disk" in outs["c"].stop_reason
    assert outs["d"].text == "uryyb jbeyq"


def test_unchanged_adapter_is_reread_after_eviction_and_served(tmp_path: Path, demo_adapters) -> None:
    """The hash check passes for untouched files: many adapters through one slot and one CPU entry
    give the same answers on every pass."""
    from engine import LLM

    llm = LLM(max_loras=1, max_cpu_loras=1,
              loras=tuple((f"u{i}", str(_copy(demo_adapters["upper"], tmp_path / f"u{i}"))) for i in range(4)))
    core = llm.engine
    for rnd in range(2):
        outs = _run(core, [(f"{rnd}-{i}", "hello world", f"u{i}") for i in range(4)])
        assert [outs[f"{rnd}-{i}"].text for i in range(4)] == ["HELLO WORLD"] * 4
    assert core.lora.cache.stats().load_failures == 0


def test_manifest_matches_the_full_load(demo_adapters) -> None:
    """The header-level view equals what the full load finds, and the first load's facts match it."""
    from engine.adapters import load_adapter
    from engine.adapters.manifest import read_manifest

    for path in demo_adapters.values():
        m, a = read_manifest(path), load_adapter(path)
        assert m is not None and m.fingerprint is not None and a.fingerprint is not None
        assert m.module_shapes() == a.module_shapes() and m.all_keys == a.all_keys
        assert m.fingerprint.digest is None and a.fingerprint.digest is not None
        assert (m.fingerprint.facts, m.fingerprint.files) == (a.fingerprint.facts, a.fingerprint.files)
