"""Whether W&B online logging can work, found out in seconds.

Without an API key ``wandb.init`` asks for one on the terminal (or fails), and without a
network it retries for minutes. A run that asked for online logging checks both first and,
when either is missing, logs offline with one warning: ``wandb sync`` uploads it later.
"""

from __future__ import annotations

import netrc
import os
import socket
import sys
from urllib.parse import urlparse

DEFAULT_BASE_URL = "https://api.wandb.ai"
CONNECT_TIMEOUT_S = 3.0
#: wandb.init's own limit once the checks pass (its default is 90 s, with retries).
INIT_TIMEOUT_S = "30"


def _host_and_port() -> tuple[str, int]:
    url = urlparse(os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL)
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def online_unavailable_reason() -> str | None:
    """Why online logging cannot work now (no API key, server unreachable), or None."""
    host, port = _host_and_port()
    if not _has_api_key(host):
        return f"no W&B API key (neither WANDB_API_KEY nor a ~/.netrc entry for {host}; `wandb login` adds one)"
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return f"{host}:{port} cannot be reached within {CONNECT_TIMEOUT_S:g} s ({error})"
    return None


def choose_online() -> bool:
    """True when online logging can go ahead (and bounds wandb.init's wait); otherwise
    switches this process to offline logging with one warning and returns False."""
    reason = online_unavailable_reason()
    if reason is None:
        os.environ.setdefault("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S)
        return True
    os.environ["WANDB_MODE"] = "offline"
    print(
        f"plugformer: warning: W&B online logging is not possible: {reason}. This run logs to W&B offline "
        "instead; upload it later with `wandb sync <run dir>/wandb/offline-run-*`.",
        file=sys.stderr,
    )
    return False
