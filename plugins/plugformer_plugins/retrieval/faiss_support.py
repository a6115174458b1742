"""faiss, imported only when an index is built or searched (``import faiss`` costs start-up
time every other command would pay), with one clear message when it is not installed."""

from __future__ import annotations

from typing import Any

from plugformer import ConfigError


def require_faiss() -> Any:
    """The ``faiss`` module; a :class:`plugformer.ConfigError` naming the extra when absent."""
    try:
        import faiss
    except ImportError as error:
        raise ConfigError(
            f"Retrieval needs the faiss library, which is not installed ({error}).",
            expected="faiss-cpu (or faiss-gpu) importable as `faiss`",
            fix="pip install 'plugformer[retrieval]'  (or: pip install faiss-cpu)",
        ) from None
    return faiss
