"""The huggingface_hub client details the publisher relies on: which errors are transient, a
timeout on every request, and repo creation that tells whether it created the repo.

    with request_timeout(60.0):
        url, created = create_repo(HfApi(token=token), "me/dgpt-tiny", private=True)
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport-level errors (timeouts included) of whichever HTTP clients huggingface_hub may use."""
    names = {
        "httpx2": ("TimeoutException", "NetworkError", "RemoteProtocolError"),
        "httpx": ("TimeoutException", "NetworkError", "RemoteProtocolError"),
        "requests": ("ConnectionError", "Timeout"),
    }
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name, attrs in names.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found += [getattr(module, a) for a in attrs if hasattr(module, a)]
    return tuple(found)


def is_retryable(err: BaseException) -> bool:
    """Timeouts, network errors and HTTP 408/429/5xx; offline mode and other HTTP errors are final."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return False
    if isinstance(err, HfHubHTTPError):
        response = getattr(err, "response", None)
        return response is None or response.status_code in RETRYABLE_STATUS
    return isinstance(err, _network_errors())


@contextmanager
def request_timeout(seconds: float) -> Iterator[None]:
    """Bound every HTTP request huggingface_hub sends while inside to `seconds` (connect, each read
    and write, waiting for a pooled connection); a stalled request raises an httpx timeout.

    huggingface_hub >= 1.0 sends all requests through one shared httpx client whose timeout is
    None, and HfApi's repo and commit methods take no timeout; the only hook is the client factory.
    The factory in place (a user's own included) is wrapped for the duration and restored on exit,
    which also closes the bounded client. The client is shared: requests from other threads of the
    process are bounded too while inside. Xet transfers (hf_xet, when installed) have their own
    HTTP stack and are not covered.
    """
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    previous = _http._GLOBAL_CLIENT_FACTORY  # no public getter

    def bounded() -> Any:
        client = previous()
        client.timeout = seconds
        return client

    set_client_factory(bounded)
    try:
        yield
    finally:
        set_client_factory(previous)


def create_repo(api: Any, repo_id: str, private: bool) -> tuple[str, bool]:
    """(URL, whether this call created it) of the model repo `repo_id` through the HfApi `api`; an
    existing repo is used as is. A creation whose answer was lost and then retried reads as
    existing: the safe side, since only a repo that a run certainly created may be deleted."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return str(api.create_repo(repo_id, private=private)), True
    except HfHubHTTPError as err:
        # 409: it exists; 401/402/403: a token may be unable to create repos yet able to write to
        # an existing one, which create_repo(exist_ok=True) checks
        if err.response is None or err.response.status_code not in (401, 402, 403, 409):
            raise
    return str(api.create_repo(repo_id, private=private, exist_ok=True)), False
