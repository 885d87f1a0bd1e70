"""The settings of `dgpt serve`: built once from the command line, passed around as one object."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from dgpt_core.cli_errors import UsageError


@dataclass(frozen=True)
class ServeSettings:
    """How the server listens, batches and what it refuses."""

    model_dir: str
    """The saved model folder served (its name is the model id of the API)."""
    host: str = "127.0.0.1"
    """Interface to listen on; loopback by default, so nothing outside the machine reaches it."""
    port: int = 8000
    """TCP port to listen on."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key; None = no key required. The key itself
    is never a flag, so it stays out of shell history and process listings."""
    api_key: str | None = field(default=None, repr=False)
    """The API key read from `api_key_env` (never logged or printed; hidden from repr)."""
    device: str | None = None
    """torch device of the model (None: cuda if available, else cpu)."""
    batch_window_ms: float = 20.0
    """How long the oldest waiting request waits for others to join its batch."""
    max_batch_size: int = 32
    """Most sequences (requests x n) decoded together in one batch."""
    max_n: int = 4
    """Largest `n` (choices per request) accepted."""
    max_tokens_cap: int = 512
    """Largest `max_tokens` accepted."""
    max_steps: int = 1024
    """Largest `steps` sampler option accepted."""
    max_body_bytes: int = 1_000_000
    """Largest request body accepted, in bytes."""
    max_stop_sequences: int = 4
    """Most `stop` strings accepted (OpenAI's limit)."""

    def __post_init__(self) -> None:
        positive = {"batch_window_ms": self.batch_window_ms >= 0, "max_batch_size": self.max_batch_size >= 1,
                    "max_n": self.max_n >= 1, "max_tokens_cap": self.max_tokens_cap >= 1,
                    "max_steps": self.max_steps >= 1, "max_body_bytes": self.max_body_bytes >= 1,
                    "port": 0 <= self.port <= 65535}
        bad = [name for name, ok in positive.items() if not ok]
        if bad:
            raise UsageError(f"invalid server settings: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")
        if self.max_n > self.max_batch_size:
            raise UsageError(f"max_n ({self.max_n}) must not exceed max_batch_size ({self.max_batch_size})")

    @staticmethod
    def read_api_key(env_name: str | None) -> str | None:
        """The key in the environment variable `env_name` (None when no name is given); a
        UsageError when the variable is unset or empty, rather than silently serving without a key."""
        if env_name is None:
            return None
        key = os.environ.get(env_name, "")
        if not key:
            raise UsageError(f"--api-key-env {env_name}: the environment variable {env_name} is unset or empty")
        return key
