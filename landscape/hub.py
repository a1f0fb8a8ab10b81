"""Is a Hugging Face hub name worth asking the hub for?

A fast answer before transformers or datasets try: they retry an unreachable hub for half a minute
and print a line per retry.

A name is worth asking for when it is in the local Hugging Face cache, or when the hub is not
switched off (``HF_HUB_OFFLINE``) and answers a connection within a few seconds (tried once per
process).  Otherwise the caller refuses the name in one line, at once.
"""

import functools
import os
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "on", "yes", "true"}


def offline() -> bool:
    """Whether the environment switches the hub off (read now, not at import)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in names)


def _endpoint() -> "tuple[str, int]":
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy and url.scheme == "https":  # through a proxy, the proxy is what must answer
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


@functools.lru_cache(maxsize=None)
def _reachable(host: str, port: int, timeout: float) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:  # no such host (no DNS), refused, unreachable network, timed out
        return False


def reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub (or the HTTPS proxy) accepts a TCP connection within ``timeout`` seconds."""
    host, port = _endpoint()
    return _reachable(host, port, timeout)


def in_cache(name: str, repo_type: str = "model") -> bool:
    """Whether ``name`` (a hub id) has anything in the local Hugging Face caches."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    folder = f"{repo_type}s--" + name.replace("/", "--")
    roots = [Path(constants.HF_HUB_CACHE)]
    if repo_type == "dataset":
        roots.append(Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets"))
    for root in roots:
        if (root / folder).is_dir():
            return True
        if repo_type == "dataset" and root.is_dir():
            prefix = name.replace("/", "___")
            if any(p.name == prefix or p.name.startswith(prefix + "-") for p in root.iterdir()):
                return True
    return False


def unavailable(name: str, repo_type: str = "model") -> Optional[str]:
    """Why the hub cannot provide ``name``.

    Args:
        name: a hub repository id.
        repo_type: 'model' or 'dataset'.

    Returns:
        The reason, worded to follow "it is not a local path, and", or None when it is worth
        asking (cached, or the hub answers).
    """
    if in_cache(name, repo_type):
        return None
    if offline():
        return "it is not in the local Hugging Face cache and the hub is switched off (HF_HUB_OFFLINE)"
    if not reachable():
        host, port = _endpoint()
        return (f"it is not in the local Hugging Face cache and the hub cannot be reached ({host}:{port} did not "
                f"answer within {PROBE_TIMEOUT_S:g} s); check the name, or the network")
    return None
