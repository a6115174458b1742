"""The Lightning callback that carries ``report.latency_batches`` to the report (imported
when a run starts, so listing plugins does not import Lightning)."""

from __future__ import annotations

import lightning.pytorch as pl


class ReportSettings(pl.Callback):
    """Does nothing in the loop; carries ``report.latency_batches`` from the run's config to
    the ``run_summary`` hook, which sees only the trainer."""

    def __init__(self, latency_batches: int) -> None:
        self.latency_batches = latency_batches
