"""lm-evaluation-harness through mlora: its `local-completions` backend (echo + logprobs against the
real server) scores a local 20-item multiple-choice task exactly as its own `hf` backend does on the
same tiny model: same accuracy, per-choice loglikelihoods within 1e-3 (fp32).

Skipped where lm-eval is not installed (`pip install lm-eval`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.server.config import ServerConfig
from tests.server.real_server import ServerThread

WORDS = ["apple", "river", "stone", "cloud", "lamp", "tiger", "bread", "glass", "music", "paper"]


def _task(root: Path) -> Path:
    """A 20-item multiple-choice task on local data; answers spread over the 4 choices."""
    rows = []
    for i in range(20):
        w = WORDS[i % len(WORDS)]
        choices = [f" {WORDS[(i + k) % len(WORDS)]}" for k in (1, 3, 5, 7)]
        rows.append({"question": f"Item {i}: the word after {w} is", "choices": choices, "answer": i % 4})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "mlora_tiny_mc.yaml").write_text(
        "task: mlora_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return root


def _run(model: str, model_args: str, tasks_dir: Path) -> tuple[float, dict[int, list[float]]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out: Any = simple_evaluate(model=model, model_args=model_args, tasks=["mlora_tiny_mc"], device="cpu",
                               task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True)
    acc = out["results"]["mlora_tiny_mc"]["acc,none"]
    lls: dict[int, list[float]] = {}
    for s in out["samples"]["mlora_tiny_mc"]:
        lls[s["doc_id"]] = [float(r[0][0]) for r in s["resps"]]
    return acc, lls


def test_lm_eval_local_completions_equals_its_hf_backend(tiny_base: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    os.environ.pop("OPENAI_API_KEY", None)
    tasks = _task(tmp_path)
    cfg = EngineConfig(model=str(tiny_base), dtype="float32", device="cpu", max_model_len=128, seed=0)
    srv = ServerThread(ServerConfig(engine=cfg, port=0)).start()
    try:
        via_mlora = _run("local-completions", f"model={tiny_base},base_url={srv.base_url}/completions,"
                         f"tokenizer_backend=huggingface,tokenizer={tiny_base},tokenized_requests=True,"
                         "num_concurrent=1,max_retries=1,batch_size=4", tasks)
    finally:
        srv.stop()
    via_hf = _run("hf", f"pretrained={tiny_base},dtype=float32,batch_size=1", tasks)
    assert via_mlora[0] == via_hf[0]
    assert via_mlora[1].keys() == via_hf[1].keys() and len(via_hf[1]) == 20
    for doc, lls in via_hf[1].items():
        assert len(via_mlora[1][doc]) == len(lls) == 4
        for a, b in zip(via_mlora[1][doc], lls):
            assert abs(a - b) < 1e-3, (doc, via_mlora[1][doc], lls)
    # real scores (the defect this guards against gave every choice 0.0, so choice 0 always won)
    assert all(ll < 0 for lls in via_mlora[1].values() for ll in lls)
