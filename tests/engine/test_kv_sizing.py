"""KV sizing flags (vLLM's --gpu-memory-utilization, --kv-cache-memory-bytes, --num-kv-blocks): the blocks
plan_kv allocates. CUDA's free/total memory is simulated, so this runs on CPU-only machines too."""

from __future__ import annotations

import logging

import pytest
import torch

from engine.planning.budget import ModelDims, kv_bytes_per_token
from engine.config import EngineConfig
from engine.errors import ConfigError
from engine.loader import load_hf_config, resolve_model_path
from engine.model import ModelArgs
from engine.runner import _slot_reserve, plan_kv

GiB = 2**30


def _dims() -> tuple[ModelDims, ModelArgs]:
    hf = load_hf_config(resolve_model_path(None))
    return ModelDims.from_hf_config(hf), ModelArgs.from_hf_config(hf)


def test_gpu_memory_utilization_gives_the_kv_cache_the_rest_of_the_share(monkeypatch: pytest.MonkeyPatch) -> None:
    dims, args = _dims()
    total, used = 100 * GiB, 30 * GiB  # 30 GiB already taken (weights, other processes)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total - used, total))
    cfg = EngineConfig(gpu_memory_utilization=0.5, max_loras=2)
    plan = plan_kv(cfg, dims, args, torch.float16, torch.device("cuda"))
    per_block = kv_bytes_per_token(dims, "torch.float16") * cfg.block_size
    want = (int(total * 0.5) - used - _slot_reserve(cfg, dims, torch.float16)) // per_block
    assert plan.num_blocks == want
    with pytest.raises(ConfigError, match="leaves no room for the KV cache"):
        plan_kv(EngineConfig(gpu_memory_utilization=0.2), dims, args, torch.float16, torch.device("cuda"))


def test_gpu_memory_utilization_is_ignored_on_cpu_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    dims, args = _dims()
    with caplog.at_level(logging.WARNING):
        plan = plan_kv(EngineConfig(gpu_memory_utilization=0.9), dims, args, torch.float32, torch.device("cpu"))
    default = plan_kv(EngineConfig(), dims, args, torch.float32, torch.device("cpu"))
    assert plan == default and "applies to CUDA only" in caplog.text


def test_kv_cache_memory_bytes_and_num_kv_blocks() -> None:
    dims, args = _dims()
    per_block = kv_bytes_per_token(dims, "torch.float32") * 8
    plan = plan_kv(EngineConfig(kv_cache_memory_bytes=per_block * 40 + 1, block_size=8), dims, args, torch.float32,
                   torch.device("cpu"))
    assert plan.num_blocks == 40
    assert plan_kv(EngineConfig(num_kv_blocks=7, block_size=8), dims, args, torch.float32,
                   torch.device("cpu")).num_blocks == 7
