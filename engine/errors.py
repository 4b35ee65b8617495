"""Errors a user can act on. The CLI prints them as one line and exits with `exit_code`."""

from __future__ import annotations


class MloraError(Exception):
    """A known, user-facing error: one-line message, optional hint, CLI exit code."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class NotBuiltError(MloraError):
    """A subcommand that exists in the CLI but whose engine part has not landed yet."""


class AdapterError(MloraError):
    """An adapter that cannot be read, validated or served."""


class ConfigError(MloraError):
    """A bad configuration value (model config, engine config, CLI flags, a request's parameters: HTTP 400).

    `param`, where the raising site knows it, names the request field at fault ("prompt", "min_tokens",
    "logit_bias", ...); the server reports it as the OpenAI error's `param`."""

    def __init__(self, message: str, *, param: str | None = None, hint: str | None = None,
                 exit_code: int | None = None) -> None:
        super().__init__(message, hint=hint, exit_code=exit_code)
        self.param = param


class TokenIdError(ConfigError):
    """A token id outside the model's vocabulary, in the prompt or a sampling parameter (HTTP 400).

    `param` names the request field that holds it ("prompt", "logit_bias", "allowed_token_ids")."""

    def __init__(self, message: str, *, param: str, hint: str | None = None) -> None:
        super().__init__(message, param=param, hint=hint)


class UsageError(ConfigError):
    """A bad option value, caught before any work starts: a CLI usage error (exit 2, like click's own)."""

    exit_code = 2


class AdapterNotFoundError(MloraError):
    """A request or command named an adapter that is not registered (HTTP 404)."""


class PromptTooLongError(MloraError):
    """The prompt (plus max_tokens, where checked) does not fit the model's context (HTTP 400)."""

    def __init__(self, message: str, *, param: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.param = param


class QueueFullError(MloraError):
    """The engine's waiting queue is at its limit (HTTP 429 with Retry-After)."""


class EngineStoppedError(MloraError):
    """The engine is shutting down and accepts no new requests (HTTP 503)."""


class EngineDeadError(MloraError):
    """The engine loop cannot continue (every step fails): the process should exit and be restarted."""
