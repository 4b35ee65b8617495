"""`mlora serve`: Serve the base model and its LoRA adapters behind an OpenAI-compatible API."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Optional

import typer

from mlora_cli._common import console

_ENGINE = "Engine"
_LORA = "LoRA"
_HTTP = "HTTP"
_RAY = "Ray"
_SCHED = "Scheduling"


class Policy(str, Enum):
    fair = "fair"
    fcfs = "fcfs"
    priority = "priority"


def parse_lora(specs: list[str]) -> tuple[tuple[str, str], ...]:
    """`name=path` items (path: directory or Hub id) -> ((name, path), ...); a clear error otherwise."""
    from engine.errors import UsageError
    from engine.config import ADAPTER_NAME_RULE, valid_adapter_name

    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():  # NAME= would shadow a demo adapter with nothing
            raise UsageError(f"--lora expects NAME=PATH, got {spec!r}", hint="e.g. --lora sql=./adapters/sql-lora")
        if not valid_adapter_name(name.strip()):
            raise UsageError(f"--lora name {name.strip()!r} is not allowed: use {ADAPTER_NAME_RULE}")
        out.append((name.strip(), path.strip()))
    return tuple(out)


def parse_lora_weights(specs: list[str]) -> tuple[tuple[str, float], ...]:
    """`NAME=W` items (NAME: an adapter, the base model or a request-named tenant) -> ((name, weight), ...)."""
    from engine.config import positive_number
    from engine.errors import UsageError

    out = []
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not name.strip() or weight != weight:
            raise UsageError(f"--lora-weight expects NAME=WEIGHT, got {spec!r}", hint="e.g. --lora-weight sql=2")
        out.append((name.strip(), positive_number(weight, f"--lora-weight {name.strip()}", error=UsageError)))
    return tuple(out)


def scan_lora_dir(directory: str | None, *, base: str | None = None, max_lora_rank: int | None = None
                  ) -> tuple[tuple[str, str], ...]:
    """--lora-dir: every subdirectory of `directory` holding adapter_config.json, named after it, sorted;
    one that fails validation is skipped with a warning (the others are still served)."""
    from engine.config import EngineConfig
    from engine.server.config import servable_adapters_in_dir
    from mlora_cli._common import err_console

    if directory is None:
        return ()
    rank = max_lora_rank or EngineConfig.max_lora_rank
    good, skipped = servable_adapters_in_dir(directory, base=base, max_lora_rank=rank)
    for line in skipped:
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False, markup=True, soft_wrap=True)
    return good


def read_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's contents, or the template itself when no such file exists (vLLM's rule)."""
    import os

    from engine.errors import UsageError

    if value is None:
        return None
    if os.path.isfile(os.path.expanduser(value)):
        with open(os.path.expanduser(value), encoding="utf-8") as f:
            return f.read()
    if not any(mark in value for mark in ("{{", "{%")):
        raise UsageError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


def build_config(**opts: Any) -> Any:
    """The one frozen ServerConfig for these flags (engine options left unset keep the engine's defaults)."""
    from engine.config import EngineConfig
    from engine.server.config import ServerConfig

    engine_keys = ("model", "dtype", "device", "max_model_len", "max_num_seqs", "max_queue", "max_queue_per_tenant",
                   "max_loras", "max_lora_rank", "max_cpu_loras", "max_cpu_lora_bytes", "lora_dtype", "scheduling_policy", "max_seqs_per_tenant",
                   "served_model_name", "gpu_memory_utilization", "kv_cache_memory_bytes", "num_kv_blocks",
                   "block_size", "max_num_batched_tokens", "seed", "revision", "cpu_threads",
                   "enable_prefix_caching")
    engine_kwargs = {k: opts[k] for k in engine_keys if opts.get(k) is not None}
    if opts.get("lora_weight"):
        engine_kwargs["lora_weights"] = parse_lora_weights(opts["lora_weight"])
    if opts.get("lora_compose"):
        engine_kwargs["lora_compose"] = tuple(opts["lora_compose"])  # NAME=a:0.7,b:0.5, parsed by EngineConfig
    if opts.get("trust_remote_code"):
        engine_kwargs["trust_remote_code"] = True
    template = read_chat_template(opts.get("chat_template"))
    if template is not None:
        engine_kwargs["chat_template"] = template
    explicit = parse_lora(opts.get("lora") or [])  # usage errors first, before any adapter is read
    EngineConfig(**{k: v for k, v in engine_kwargs.items() if k != "model"})  # flag values checked before any I/O
    loras = scan_lora_dir(opts.get("lora_dir"), base=opts.get("model"), max_lora_rank=opts.get("max_lora_rank"))
    engine = EngineConfig(loras=loras + explicit, **engine_kwargs)
    server_keys = ("max_seqs_per_request", "max_body_bytes", "header_timeout", "body_timeout",
                   "trust_request_chat_template")
    server_kwargs = {k: opts[k] for k in server_keys if opts.get(k) is not None}
    return ServerConfig(engine=engine, host=opts["host"], port=opts["port"], api_key=opts.get("api_key"),
                        allow_runtime_lora=opts["allow_runtime_lora"], adapter_root=opts.get("adapter_root"),
                        grace_period=opts["grace_period"], lora_dir=opts.get("lora_dir"), **server_kwargs)


def serve(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Base model: a local HF directory or a Hub id. Default: the built-in demo model (adapters upper, reverse, rot13).", rich_help_panel=_ENGINE)] = None,
    served_model_name: Annotated[Optional[str], typer.Option("--served-model-name", help="The base model's name in the API (/v1/models, responses, \"model\" of requests). \[default: --model as given, as vLLM]", rich_help_panel=_ENGINE, show_default=False)] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit) of --model.", rich_help_panel=_ENGINE, show_default=False)] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Let transformers run code shipped with the model's config/tokenizer.", rich_help_panel=_ENGINE)] = False,
    chat_template: Annotated[Optional[str], typer.Option("--chat-template", help="Chat template for /v1/chat/completions: a file, or the Jinja text itself. \[default: the tokenizer's]", rich_help_panel=_ENGINE, show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, help="Seed of the sampling generators of requests without their own seed. \[default: 0]", rich_help_panel=_ENGINE, show_default=False)] = None,
    gpu_memory_utilization: Annotated[Optional[float], typer.Option("--gpu-memory-utilization", min=0.0, max=1.0, help="CUDA: share of the GPU's total memory this server may fill (weights, LoRA slots, KV cache); the KV cache gets the rest. Ignored on CPU. \[default: 85% of what is free after loading]", rich_help_panel=_ENGINE, show_default=False)] = None,
    kv_cache_memory_bytes: Annotated[Optional[int], typer.Option("--kv-cache-memory-bytes", "--kv-cache-memory", min=1, help="KV cache size in bytes (CPU or CUDA).", rich_help_panel=_ENGINE, show_default=False)] = None,
    num_kv_blocks: Annotated[Optional[int], typer.Option("--num-kv-blocks", "--num-gpu-blocks-override", min=1, help="KV cache size in blocks of --block-size tokens.", rich_help_panel=_ENGINE, show_default=False)] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", min=1, help="Tokens per KV-cache block. \[default: 16]", rich_help_panel=_ENGINE, show_default=False)] = None,
    max_num_batched_tokens: Annotated[Optional[int], typer.Option("--max-num-batched-tokens", min=1, help="Tokens one step may process (prefill chunks + decodes). \[default: 2048]", rich_help_panel=_ENGINE, show_default=False)] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for torch's ops. \[default: torch's]", rich_help_panel=_ENGINE, show_default=False)] = None,
    lora: Annotated[Optional[list[str]], typer.Option("--lora", help="Adapter to serve, as NAME=PATH (directory or Hub id). Repeatable. Requests select it with \"model\": NAME.", rich_help_panel=_LORA, show_default=False)] = None,
    lora_dir: Annotated[Optional[str], typer.Option("--lora-dir", help="Serve every adapter in this directory (each subdirectory with adapter_config.json), named after its subdirectory; one that fails validation is skipped with a warning. With --allow-runtime-lora, an adapter added there later loads on its first request (vLLM's filesystem resolver). With --ray, replicas load them on demand.", rich_help_panel=_LORA, show_default=False)] = None,
    lora_compose: Annotated[Optional[list[str]], typer.Option("--lora-compose", help="A composed adapter name, as NAME=A:0.7,B:0.5: requests with \"model\": NAME get W x + 0.7 * delta_A + 0.5 * delta_B (as mlora merge --weight, nothing materialised). Repeatable. A request can also compose with \"adapters\": [{\"name\": A, \"weight\": 0.7}, ...].", rich_help_panel=_LORA, show_default=False)] = None,
    max_loras: Annotated[Optional[int], typer.Option("--max-loras", min=1, help="Adapters resident in device slots at once (distinct adapters per step). \\[default: 4]", rich_help_panel=_LORA)] = None,
    max_lora_rank: Annotated[Optional[int], typer.Option("--max-lora-rank", min=1, help="Largest adapter rank a slot holds. \\[default: 16]", rich_help_panel=_LORA)] = None,
    max_cpu_loras: Annotated[Optional[int], typer.Option("--max-cpu-loras", min=1, help="Adapters kept in CPU memory (>= --max-loras). \\[default: 2 x max-loras]", rich_help_panel=_LORA)] = None,
    max_cpu_lora_bytes: Annotated[Optional[int], typer.Option("--max-cpu-lora-bytes", min=0, help="Bytes of adapter weights the CPU tier may hold beyond --max-cpu-loras adapters (0: the count only, as vLLM). \\[default: 1 GiB; 0 when --max-cpu-loras is given]", rich_help_panel=_LORA, show_default=False)] = None,
    lora_dtype: Annotated[Optional[str], typer.Option("--lora-dtype", help="dtype of the LoRA slots and of the LoRA path: auto (the model's, as vLLM), float32, bfloat16 or float16 (vLLM allows auto/float16/bfloat16; mlora also float32: on a bf16/fp16 model the LoRA delta is computed in fp32 and added once, as PEFT does by default, for 2x the slot memory). \\[default: auto]", rich_help_panel=_LORA, show_default=False)] = None,
    allow_runtime_lora: Annotated[bool, typer.Option("--allow-runtime-lora", help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --adapter-root).", rich_help_panel=_LORA)] = False,
    adapter_root: Annotated[Optional[str], typer.Option("--adapter-root", help="Only load runtime adapters from inside this directory (symlinks resolved); required by --allow-runtime-lora (--adapter-root / allows any path).", rich_help_panel=_LORA)] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="auto, float32, bfloat16 or float16. \\[default: auto]", rich_help_panel=_ENGINE)] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda. \\[default: auto]", rich_help_panel=_ENGINE)] = None,
    max_model_len: Annotated[Optional[int], typer.Option("--max-model-len", min=1, help="Context length (prompt + completion). \\[default: the model's]", rich_help_panel=_ENGINE)] = None,
    max_num_seqs: Annotated[Optional[int], typer.Option("--max-num-seqs", min=1, help="Requests in the running batch. \\[default: 64]", rich_help_panel=_ENGINE)] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Waiting sequences beyond which new requests get 429 + Retry-After.", rich_help_panel=_ENGINE)] = 1024,
    max_queue_per_tenant: Annotated[int, typer.Option("--max-queue-per-tenant", min=1, help="Unfinished sequences (queued or running) one tenant may hold; more get 429 + Retry-After, so one tenant cannot fill --max-queue and lock the others out.", rich_help_panel=_ENGINE)] = 512,
    max_seqs_per_request: Annotated[int, typer.Option("--max-seqs-per-request", min=1, help="Most sequences (prompts x n) one request may queue; more is a 400.", rich_help_panel=_HTTP)] = 256,
    scheduling_policy: Annotated[Optional[Policy], typer.Option("--scheduling-policy", help="Who is admitted first: fair (weighted fair share across tenants: one adapter's flood cannot make the others wait), fcfs (arrival order) or priority (the request's \"priority\", lower first). \\[default: fair]", rich_help_panel=_SCHED, show_default=False)] = None,
    lora_weight: Annotated[Optional[list[str]], typer.Option("--lora-weight", help="A tenant's fair-share weight, as NAME=W (an adapter, the base model or a request's \"tenant\"; default 1). Repeatable.", rich_help_panel=_SCHED, show_default=False)] = None,
    max_seqs_per_tenant: Annotated[Optional[int], typer.Option("--max-seqs-per-tenant", min=1, help="Running requests one tenant may hold at once. \\[default: no cap]", rich_help_panel=_SCHED)] = None,
    enable_prefix_caching: Annotated[bool, typer.Option("--enable-prefix-caching/--no-enable-prefix-caching", help="Reuse the KV cache of prompt prefixes (full blocks) across requests of the same adapter version or of the base model; never across adapters.", rich_help_panel=_ENGINE)] = True,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.", rich_help_panel=_HTTP)] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port to listen on (0 = any free port).", rich_help_panel=_HTTP)] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="MLORA_API_KEY", help="Require 'Authorization: Bearer KEY' on every route but /health, /ping, /version and /metrics (probes and scrapers).", rich_help_panel=_HTTP, show_default=False)] = None,
    grace_period: Annotated[float, typer.Option("--grace-period", min=0.0, help="Seconds SIGINT/SIGTERM waits for in-flight requests before aborting them.", rich_help_panel=_HTTP)] = 10.0,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", min=1, help="Largest request body in bytes; larger ones get 413.", rich_help_panel=_HTTP)] = 4 * 1024 * 1024,
    header_timeout: Annotated[float, typer.Option("--header-timeout", min=0.001, help="Seconds a connection may take to send a request's headers, or sit idle between requests, before it is closed.", rich_help_panel=_HTTP)] = 10.0,
    body_timeout: Annotated[float, typer.Option("--body-timeout", min=0.001, help="Seconds a request body may take to arrive; slower ones get 408.", rich_help_panel=_HTTP)] = 30.0,
    trust_request_chat_template: Annotated[bool, typer.Option("--trust-request-chat-template", help="Accept a chat template sent in a request (chat_template); it renders sandboxed, bounded in size and time. Refused (400) without this flag.", rich_help_panel=_HTTP)] = False,
    ray: Annotated[bool, typer.Option("--ray", help="Serve with N engine replicas on Ray Serve behind one ingress; requests for an adapter go to a replica that holds it. Needs mlora\\[ray].", rich_help_panel=_RAY)] = False,
    replicas: Annotated[Optional[int], typer.Option("--replicas", min=1, help="Engine replicas with --ray (each one loads the base model; --max-loras/--max-cpu-loras are per replica). \\[default: 2]", rich_help_panel=_RAY, show_default=False)] = None,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", envvar="RAY_ADDRESS", help="Join this Ray cluster with --ray (e.g. auto, or HEAD_IP:6379). Default: start a local one.", rich_help_panel=_RAY, show_default=False)] = None,
) -> None:
    """Serve the base model and its LoRA adapters behind an OpenAI-compatible API.

    Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/ID], POST /tokenize,
    POST /detokenize, GET /version, GET /health, GET|POST /ping, GET /metrics, and with
    --allow-runtime-lora POST /v1/load_lora_adapter and /v1/unload_lora_adapter.
    A request's "model" field picks the adapter; the base model's name picks no adapter.
    """
    if replicas is not None and not ray:
        from engine.errors import UsageError

        raise UsageError("--replicas needs --ray", hint=f"mlora serve --ray --replicas {replicas}")
    config = build_config(model=model, served_model_name=served_model_name, revision=revision,
                          trust_remote_code=trust_remote_code, chat_template=chat_template, seed=seed,
                          gpu_memory_utilization=gpu_memory_utilization, kv_cache_memory_bytes=kv_cache_memory_bytes,
                          num_kv_blocks=num_kv_blocks, block_size=block_size,
                          max_num_batched_tokens=max_num_batched_tokens, cpu_threads=threads, lora=lora,
                          lora_dir=lora_dir, max_loras=max_loras, max_lora_rank=max_lora_rank,
                          max_cpu_loras=max_cpu_loras, max_cpu_lora_bytes=max_cpu_lora_bytes, lora_dtype=lora_dtype,
                          allow_runtime_lora=allow_runtime_lora,
                          adapter_root=adapter_root, dtype=dtype, device=device, max_model_len=max_model_len,
                          max_num_seqs=max_num_seqs, max_queue=max_queue, max_queue_per_tenant=max_queue_per_tenant, host=host, port=port,
                          api_key=_api_key(api_key), grace_period=grace_period,
                          max_seqs_per_request=max_seqs_per_request, max_body_bytes=max_body_bytes,
                          header_timeout=header_timeout, body_timeout=body_timeout,
                          trust_request_chat_template=trust_request_chat_template, lora_weight=lora_weight,
                          max_seqs_per_tenant=max_seqs_per_tenant, lora_compose=lora_compose,
                          enable_prefix_caching=enable_prefix_caching,
                          scheduling_policy=scheduling_policy.value if scheduling_policy is not None else None)
    if ray:
        if lora_compose:
            from engine.errors import UsageError

            raise UsageError("--lora-compose is not supported with --ray yet: replicas load one adapter per request "
                             "on demand, a composition needs all of its adapters on one replica")
        _serve_ray(config, 2 if replicas is None else replicas, ray_address)
        return
    from engine.server.run import serve as run_server

    run_server(config, on_ready=_ready(config),
               on_bound=lambda: console.print("[dim]loading the model...[/]", highlight=False))
    console.print("[dim]server stopped[/]", highlight=False)


def _api_key(given: str | None) -> str | None:
    """--api-key, or MLORA_API_KEY when set: an empty one is passed on (ServerConfig refuses it), not dropped."""
    import os

    if given is None and "MLORA_API_KEY" in os.environ:
        return os.environ["MLORA_API_KEY"]
    return given


def _serve_ray(config: Any, replicas: int, address: str | None) -> None:
    """`--ray`: deploy on Ray Serve (engine.server.ray_ingress) with the same ServerConfig."""
    from engine.errors import ConfigError

    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise ConfigError("--ray needs Ray Serve, which is not installed: install mlora[ray]",
                          hint='pip install "mlora[ray]"') from None
    from engine.server.ray_ingress import RayConfig, serve_ray

    ray_config = RayConfig(server=config, replicas=replicas, address=address)
    where = f"joining the Ray cluster at {address}" if address else "starting a local Ray instance"
    console.print(f"[dim]{where}; deploying {replicas} replica(s)...[/]", highlight=False)
    serve_ray(ray_config, on_ready=_ready(config, replicas=replicas))
    console.print("[dim]server stopped[/]", highlight=False)


def _ready(config: Any, replicas: int | None = None) -> Any:
    def on_ready(url: str, base: str, adapters: list[str]) -> None:
        from rich.markup import escape

        on_ray = f" on Ray Serve ({replicas} replica{'s' if replicas != 1 else ''})" if replicas else ""
        console.print(f"[bold green]mlora serving[/] {escape(base)}{on_ray} at [bold]{url}[/]  (OpenAI base_url: {url}/v1)",
                      highlight=False, soft_wrap=True)
        shown = ", ".join(escape(a) for a in adapters) if adapters else "[dim]none[/]"
        console.print(f"adapters: {shown}", highlight=False, soft_wrap=True)
        extras = []
        if config.api_key:
            extras.append("API key required on /v1")
        if config.allow_runtime_lora:
            extras.append("runtime adapter loading on" + (f" (root {escape(config.adapter_root)})" if config.adapter_root else ""))
        if extras:
            console.print("[dim]" + "; ".join(extras) + "[/]", highlight=False, soft_wrap=True)
        console.print("[dim]Ctrl+C to stop[/]", highlight=False)

    return on_ready


def register(app: typer.Typer) -> None:
    app.command(name="serve", help="Serve the base model and its LoRA adapters behind an OpenAI-compatible API.")(serve)
