"""Each adapter file is opened once and everything is read through that descriptor (issue 15:
no gap between checking a file and reading it)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.adapters.files import WeightsFile, read_json_file
from engine.demo import DEMO_ADAPTERS
from engine.errors import AdapterError


def test_weights_come_from_the_file_that_was_checked(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    shutil.copytree(DEMO_ADAPTERS["upper"], mine)
    f = mine / "adapter_model.safetensors"
    wf = WeightsFile(f)  # header checked on this open file
    f.unlink()
    f.symlink_to(DEMO_ADAPTERS["reverse"] / "adapter_model.safetensors")  # swapped after the check
    ref = load_file(DEMO_ADAPTERS["upper"] / "adapter_model.safetensors")
    assert all(torch.equal(wf.get(k), ref[k]) for k in wf.keys())
    assert wf.real_path == str(f.parent.resolve() / "adapter_model.safetensors")


def test_a_fifo_never_blocks_the_reader(tmp_path: Path) -> None:
    fifo = tmp_path / "adapter_config.json"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(result, lambda: read_json_file(fifo, "adapter_config.json")), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and isinstance(result[0], AdapterError) and "not a regular file" in str(result[0])


def _catch(out: list[BaseException], fn) -> None:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        out.append(e)


def test_a_file_that_shrinks_after_the_check_is_an_adapter_error(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    shutil.copytree(DEMO_ADAPTERS["upper"], mine)
    f = mine / "adapter_model.safetensors"
    wf = WeightsFile(f)
    os.truncate(f, 200)
    with pytest.raises(AdapterError, match="shrank"):
        for k in wf.keys():
            wf.get(k)
