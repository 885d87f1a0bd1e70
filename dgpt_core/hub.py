"""Fail fast and clearly when a Hugging Face Hub resource is asked for without Hub access."""

from __future__ import annotations

import functools
import os
import socket
import threading
from urllib.parse import urlparse

HUB_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
"""The variables huggingface_hub itself reads (at import) to refuse every request to the Hub."""
OFFLINE_VARS = (*HUB_OFFLINE_VARS, "HF_DATASETS_OFFLINE")
"""Every HF offline variable: the Hub's, and the datasets library's for dataset downloads."""


def offline_vars(names: tuple[str, ...] = OFFLINE_VARS) -> dict[str, str]:
    """The variables of `names` that declare offline mode (1/true/yes/on), with their values."""
    values = {var: os.environ.get(var, "").strip() for var in names}
    return {var: value for var, value in values.items() if value.lower() in {"1", "true", "yes", "on"}}


def is_offline() -> bool:
    """True when the environment declares offline mode (any of the HF offline variables)."""
    return bool(offline_vars())


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """One bounded TCP probe of the Hub endpoint; DNS included, so it never hangs past `timeout`."""
    if is_offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def hub_error_message(kind: str, name: str) -> str:
    return (
        f"Cannot load the {kind} '{name}' from the Hugging Face Hub: the Hub is not reachable "
        f"(or HF_HUB_OFFLINE is set). To run offline, use the embedded default (presets 'tiny' "
        f"or 'ci', e.g. `dgpt run --preset tiny`) or point the config at a local path "
        f"(a folder saved with save_pretrained/save_to_disk, or .txt/.jsonl/.parquet files)."
    )


def require_hub(kind: str, name: str) -> None:
    """Raise a clear RuntimeError within seconds when `name` would need the unreachable Hub."""
    if not hub_reachable():
        raise RuntimeError(hub_error_message(kind, name))
