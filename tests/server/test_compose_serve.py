"""Adapter composition through the server (issue 20): `adapters` in the body of completions and chat, and a
`lora_compose` alias named by `model`, equal the offline `LLM.generate(..., adapters=[[(name, weight), ...]])`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.server.config import ServerConfig
from tests.server.real_server import KEY, ServerThread

COMP = [("a", 0.7), ("b", 0.5)]
BODY = [{"name": "a", "weight": 0.7}, {"name": "b", "weight": 0.5}]


@pytest.fixture(scope="module")
def cfg(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> EngineConfig:
    from tests.tiny import build_peft_adapter

    root = tmp_path_factory.mktemp("compose_adapters")
    a = build_peft_adapter(tiny_base, root / "a", seed=21, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = build_peft_adapter(tiny_base, root / "b", seed=22, r=8, lora_alpha=16)
    return EngineConfig(model=str(tiny_base), dtype="float32", device="cpu", max_model_len=128, seed=0, max_loras=4,
                        loras=(("a", str(a)), ("b", str(b))), lora_compose=("mix=a:0.7,b:0.5",),
                        max_adapters_per_request=2)


@pytest.fixture(scope="module")
def server(cfg: EngineConfig) -> Iterator[ServerThread]:
    srv = ServerThread(ServerConfig(engine=cfg, port=0, api_key=KEY)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def want(cfg: EngineConfig) -> dict[str, list[float]]:
    """Offline logprobs of the greedy tokens (the tiny base repeats one token: the logprobs tell them apart)."""
    from engine import LLM

    llm = LLM(config=cfg)
    p = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    outs = llm.generate(["hello there"] * 3, p, adapters=[COMP, "a", None])
    return {k: [lp.logprob for lp in o.logprobs] for k, o in zip(("composed", "a", "base"), outs)}


def _close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and max(abs(x - y) for x, y in zip(got, want)) < 1e-4


def test_adapters_field_and_alias_equal_the_offline_composition(server: ServerThread, want: dict[str, list[float]]) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    base = server.engine.model_name
    kw: dict[str, Any] = dict(prompt="hello there", max_tokens=8, temperature=0.0, logprobs=1, extra_body={"ignore_eos": True})
    lps = lambda out: out.choices[0].logprobs.token_logprobs  # noqa: E731
    assert not _close(want["composed"], want["a"]) and not _close(want["composed"], want["base"])
    for model in (base, "a"):  # model: the base name or the first component
        out = client.completions.create(model=model, **{**kw, "extra_body": {"ignore_eos": True, "adapters": BODY}})
        assert _close(lps(out), want["composed"]), model
    assert _close(lps(client.completions.create(model="mix", **kw)), want["composed"])
    assert _close(lps(client.completions.create(model="a", **kw)), want["a"])
    chat = client.chat.completions.create(model=base, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0.0, extra_body={"adapters": BODY})
    assert chat.choices[0].message.content is not None


def test_models_lists_the_alias_with_its_recipe(server: ServerThread) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    cards = {m.id: m for m in client.models.list().data}
    assert cards["mix"].root == "a:0.7,b:0.5" and cards["mix"].parent == server.engine.model_name  # type: ignore[attr-defined]


@pytest.mark.parametrize(("adapters", "model", "status", "says"), [
    ([{"name": "nope", "weight": 1.0}, {"name": "a", "weight": 0.5}], None, 404, "nope"),
    ([{"name": "a", "weight": 1}, {"name": "b", "weight": 1}, {"name": "c", "weight": 1}], None, 400, "at most 2"),
    ([{"name": "a", "weight": "x"}], None, 400, "finite number"),
    ("a", None, 400, "list of"),
    (BODY, "b", 400, "first entry"),
])
def test_bad_compositions_are_refused(server: ServerThread, adapters: Any, model: str | None, status: int, says: str) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=model or server.engine.model_name, prompt="hi", max_tokens=2,
                                  extra_body={"adapters": adapters})
    assert err.value.status_code == status
    assert says in str(err.value)


def test_huge_composition_weights_are_a_400_naming_adapters_and_the_server_keeps_serving(
        server: ServerThread, want: dict[str, list[float]]) -> None:
    """A weight of 1e300 reached the engine (logits non-finite: 500); a 401-digit integer raised
    OverflowError in the check (500). Both are the client's mistake: 400, param "adapters"."""
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    for weight, says in ((1e300, "between -1000 and 1000"), (1e30, "between -1000 and 1000"),
                         (10**400, "more than 300 digits"), (-(10**400), "more than 300 digits")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=server.engine.model_name, prompt="hi", max_tokens=2,
                                      extra_body={"adapters": [{"name": "a", "weight": 0.5}, {"name": "b", "weight": weight}]})
        body = err.value.body
        assert err.value.status_code == 400 and body["param"] == "adapters" and says in body["message"], body
        assert "'b'" in body["message"]
    out = client.completions.create(model=server.engine.model_name, prompt="hello there", max_tokens=8, temperature=0.0,
                                    logprobs=1, extra_body={"ignore_eos": True, "adapters": BODY})
    assert _close(out.choices[0].logprobs.token_logprobs, want["composed"])


def test_a_composition_alias_registered_and_removed_at_runtime(cfg: EngineConfig, want: dict[str, list[float]],
                                                               tmp_path: Path) -> None:
    """`/v1/load_lora_adapter {"lora_name", "compose"}` registers an alias while serving (as
    --lora-compose at start); it then serves the composition by `model`; unloading it removes the
    alias and leaves its adapters loaded."""
    import dataclasses
    import json
    import urllib.error
    import urllib.request

    class Reply:
        def __init__(self, status_code: int, text: str) -> None:
            self.status_code, self.text = status_code, text

        def json(self) -> Any:
            return json.loads(self.text)

    def post(url: str, body: Any, headers: dict[str, str], timeout: float) -> Reply:
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={**headers, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return Reply(r.status, r.read().decode())
        except urllib.error.HTTPError as e:
            return Reply(e.code, e.read().decode())

    srv = ServerThread(ServerConfig(engine=dataclasses.replace(cfg, lora_compose=()), port=0, api_key=KEY,
                                    allow_runtime_lora=True, adapter_root=str(tmp_path))).start()
    auth = {"Authorization": f"Bearer {KEY}"}
    load, unload = f"{srv.url}/v1/load_lora_adapter", f"{srv.url}/v1/unload_lora_adapter"
    try:
        client = openai.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0)
        kw: dict[str, Any] = dict(prompt="hello there", max_tokens=8, temperature=0.0, logprobs=1,
                                  extra_body={"ignore_eos": True})
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="mix2", **kw)
        r = post(load, body={"lora_name": "mix2", "compose": "a:0.7,b:0.5"}, headers=auth, timeout=30)
        assert r.status_code == 200, r.text
        out = client.completions.create(model="mix2", **kw)
        assert _close(out.choices[0].logprobs.token_logprobs, want["composed"])
        assert "mix2" in [m.id for m in client.models.list().data]
        r = post(load, body={"lora_name": "mix3", "compose": [{"name": "a", "weight": 1}, {"name": "nope", "weight": 1}]},
                          headers=auth, timeout=30)
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
        r = post(load, body={"lora_name": "mix3", "compose": "a:x"}, headers=auth, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "compose"
        # a huge weight (a 401-digit integer: OverflowError in the check, 500) is a 400 naming compose
        for spec, says in (([{"name": "a", "weight": 10**400}], "more than 300 digits"),
                           ([{"name": "a", "weight": 1e300}], "between -1000 and 1000"), ("a:1e300", "between"),
                           ("a:" + "9" * 401, "finite")):
            r = post(load, body={"lora_name": "mix3", "compose": spec}, headers=auth, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["param"] == "compose", r.text
            assert says in r.json()["error"]["message"], r.text
        assert "mix3" not in [m.id for m in client.models.list().data]
        assert _close(client.completions.create(model="mix2", **kw).choices[0].logprobs.token_logprobs, want["composed"])
        assert post(unload, body={"lora_name": "mix2"}, headers=auth, timeout=30).status_code == 200
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="mix2", **kw)
        assert _close(client.completions.create(model="a", **kw).choices[0].logprobs.token_logprobs, want["a"])
    finally:
        srv.stop()
