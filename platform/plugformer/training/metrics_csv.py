"""``metrics.csv`` that survives resumes and kills.

Lightning's CSVLogger deletes an existing metrics.csv when it starts and rewrites the file in
place when a new column appears. This logger instead:

- on a resume from a checkpoint at global step N, keeps every row logged before that
  checkpoint (CSV ``step`` < N; a test after fit at step N too) and drops the later ones,
  which the resumed run logs again;
  a row the resumed run logs again at step N - 1 (a validation that ran right after the
  checkpoint) is not written twice;
- leaves the file untouched until the run logs its first row, so a resume that fails before
  training changes nothing;
- writes each row to disk as it is logged (no buffering of 100 steps that a kill would lose)
  and rewrites the file with a new header atomically (temporary file, then rename).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from plugformer.training.checkpointing import raise_if_disk_full, replace_atomically


def _step(row: dict[str, Any]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


def _row_key(row: dict[str, Any]) -> tuple[int | None, frozenset[str]]:
    return _step(row), frozenset(k for k, v in row.items() if k not in ("step", "epoch") and v not in ("", None))


class _PersistentWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_before_step: int | None) -> None:
        self._keep_before_step = keep_before_step
        self._adopted = False
        self._replayed: set[tuple[int | None, frozenset[str]]] = set()
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes metrics.csv here; the file is adopted at the first save instead."""

    def _adopt_existing(self) -> None:
        """On a resume, keep the rows logged before the checkpoint; on a fresh run, start over."""
        self._adopted = True
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self._keep_before_step is None:
            path.unlink()
            return
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if self._logged_before_checkpoint(row)]
        self.metrics_keys = sorted(set(header) | set(self.metrics_keys))
        self._replayed = {_row_key(row) for row in rows if _step(row) == self._keep_before_step - 1}
        self._write_all(rows)

    def _logged_before_checkpoint(self, row: dict[str, Any]) -> bool:
        """Rows of steps before the checkpoint's; and a test after fit at the checkpoint's step
        (it evaluated that state, and a resume does not run it again in its place)."""
        step, keys = _row_key(row)
        assert self._keep_before_step is not None
        if step is None:
            return False
        return step < self._keep_before_step or (
            step == self._keep_before_step and bool(keys) and all(key.startswith("test/") for key in keys)
        )

    def _write_all(self, rows: list[dict[str, Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.metrics_keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        replace_atomically(Path(self.metrics_file_path), lambda handle: handle.write(buffer.getvalue().encode()))

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as file:
            rows = list(csv.DictReader(file))
        self._write_all(rows)

    def save(self) -> None:
        if not self.metrics:
            return
        if not self._adopted:
            self._adopt_existing()
        if self._replayed:
            self.metrics = [row for row in self.metrics if _row_key(row) not in self._replayed]
            if not self.metrics:
                return
        new_keys = self._record_new_keys()
        file_exists = os.path.isfile(self.metrics_file_path)
        if new_keys and file_exists:
            self._rewrite_with_new_header(self.metrics_keys)
        try:
            with open(self.metrics_file_path, "a" if file_exists else "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys, lineterminator="\n")
                if not file_exists:
                    writer.writeheader()
                writer.writerows(self.metrics)
                file.flush()
        except OSError as error:
            raise_if_disk_full(error, Path(self.metrics_file_path), "the rows logged before are kept")
            raise
        self.metrics = []


class PersistentCSVLogger(CSVLogger):
    """A CSVLogger writing ``<save_dir>/metrics.csv`` as described in this module.

    ``keep_before_step``: the global step of the checkpoint a resume starts from (None for a
    fresh run, whose metrics.csv starts empty)."""

    def __init__(self, save_dir: str, keep_before_step: int | None = None) -> None:
        super().__init__(save_dir=save_dir, name="", version="", flush_logs_every_n_steps=1)
        self._keep_before_step = keep_before_step

    def has_row(self, step: int, names: Iterable[str]) -> bool:
        """Whether metrics.csv already holds a row logged at ``step`` with exactly the metrics
        ``names`` (``step`` and ``epoch`` aside)."""
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if not path.is_file():
            return False
        wanted = (step, frozenset(names) - {"step", "epoch"})
        with open(path, newline="") as file:
            return any(_row_key(row) == wanted for row in csv.DictReader(file))

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:  # type: ignore[override]
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _PersistentWriter(self.log_dir, self._keep_before_step)
        return self._experiment
