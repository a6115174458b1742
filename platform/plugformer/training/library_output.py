"""Where library output goes during a run: to the run's log file (``train.log``), and to
the console only when it concerns the user.

Libraries' INFO messages (Lightning's tips and notices, its model summary) and the warnings
listed in :data:`LIBRARY_NOISE` go to the log file only; plugformer's and Hydra's messages
and every other library warning reach the console too. Configured with logging handlers,
filters and ``logging.captureWarnings`` when a run starts, and undone when it ends.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

LOG_FILE = "train.log"

# Warnings that do not concern the user of a plugformer run: (pattern of the message, why).
# They go to train.log only; any warning not matched here stays on the console.
LIBRARY_NOISE: tuple[tuple[str, str], ...] = (
    (r"does not have many workers", "Lightning's loader advice; data tasks read in-memory splits (data.num_workers sets workers)"),
    (r"Experiment logs directory .* exists and is not empty", "the run directory is plugformer's own"),
    (r"Checkpoint directory .* exists and is not empty", "a resumed run writes into its own checkpoints folder"),
    (r"The `srun` command is available on your system but is not used", "a SLURM hint for runs started without srun"),
    (r"The anonymous setting has no effect", "Lightning's WandbLogger passes anonymous=None to wandb.init"),
    (r"LeafSpec", "a deprecation inside a library"),
)
_NOISE = re.compile("|".join(f"(?:{pattern})" for pattern, _ in LIBRARY_NOISE))

# Loggers whose INFO messages are for the user: plugformer's own and Hydra's (sweep progress).
_USER_LOGGERS = ("plugformer", "plugformer_plugins", "hydra", "__main__")
# Lightning's loggers that may carry a console handler of their own (attached at import).
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


def shows_on_console(record: logging.LogRecord) -> bool:
    """Whether a log record is for the console: plugformer's and Hydra's messages, and
    library warnings and errors that are not in :data:`LIBRARY_NOISE`. Everything else
    (library INFO: tips, notices, the model summary) is for train.log only."""
    if record.name.split(".")[0] in _USER_LOGGERS:
        return True
    if record.levelno < logging.WARNING:
        return False
    return _NOISE.search(record.getMessage()) is None


# The logger that ``logging.captureWarnings`` sends Python warnings to.
_WARNINGS_LOGGER = "py.warnings"


class ConsoleFilter(logging.Filter):
    """Lets through to a console handler only what :func:`shows_on_console` accepts, but
    no captured Python warning: those have a stderr handler of their own (Hydra's console
    handler writes to stdout, and warnings belong on stderr)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != _WARNINGS_LOGGER and shows_on_console(record)


@dataclass
class Routing:
    """What :func:`route_library_output` changed, so :meth:`restore` can undo it (a sweep runs
    several jobs in one process, and tests call ``train`` in-process)."""

    log_file: Path | None = None
    added: list[tuple[logging.Logger, logging.Handler]] = field(default_factory=list)
    removed: list[tuple[logging.Logger, logging.Handler]] = field(default_factory=list)
    filtered: list[tuple[logging.Handler, logging.Filter]] = field(default_factory=list)
    propagate: list[tuple[logging.Logger, bool]] = field(default_factory=list)
    root_level: int | None = None
    captured_warnings: bool = False

    def restore(self) -> None:
        for handler, console_filter in self.filtered:
            handler.removeFilter(console_filter)
        for logger, handler in self.added:
            logger.removeHandler(handler)
            handler.close()
        for logger, handler in self.removed:
            logger.addHandler(handler)
        for logger, propagate in self.propagate:
            logger.propagate = propagate
        if self.root_level is not None:
            logging.getLogger().setLevel(self.root_level)
        if self.captured_warnings:
            logging.captureWarnings(False)
        self.added, self.removed, self.filtered, self.propagate = [], [], [], []
        self.root_level, self.captured_warnings = None, False


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def _writes_into(handler: logging.Handler, folder: Path) -> bool:
    filename = getattr(handler, "baseFilename", None)
    return isinstance(filename, str) and Path(filename).resolve().parent == folder.resolve()


def route_library_output(run_dir: Path, rank: int = 0) -> Routing:
    """From now until :meth:`Routing.restore`: every log record and Python warning goes to
    the run's log file, and only what :func:`shows_on_console` accepts goes to the console.

    The log file is the one Hydra's job logging already writes into ``run_dir``
    (``train.log``; Lightning's DDP ranks get ``train_ddp_process_<rank>.log``), else
    ``train.log`` (``train.rank<rank>.log`` on other ranks), added here. Lightning's own
    console handlers are detached and its loggers propagate to the root logger, so its
    messages are written once, through the same handlers. Warnings are captured into the
    ``py.warnings`` logger (``logging.captureWarnings``), so the same rule sorts them,
    unless something records warnings already (``warnings.catch_warnings(record=True)``).
    """
    routing = Routing()
    root = logging.getLogger()
    if root.level > logging.INFO or root.level == logging.NOTSET:  # INFO reaches the log file
        routing.root_level = root.level
        root.setLevel(logging.INFO)
    files = [h for h in root.handlers if _writes_into(h, run_dir)]
    if files:
        routing.log_file = Path(files[0].baseFilename)  # type: ignore[attr-defined]
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        routing.log_file = run_dir / (LOG_FILE if rank == 0 else f"train.rank{rank}.log")
        handler = logging.FileHandler(routing.log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(handler)
        routing.added.append((root, handler))
    consoles = [h for h in root.handlers if _is_console(h)]
    if not consoles:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(console)
        routing.added.append((root, console))
        consoles = [console]
    for handler in consoles:
        console_filter = ConsoleFilter()
        handler.addFilter(console_filter)
        routing.filtered.append((handler, console_filter))
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if _is_console(h)]:
            logger.removeHandler(handler)
            routing.removed.append((logger, handler))
        routing.propagate.append((logger, logger.propagate))
        logger.propagate = True
    if warnings.showwarning is not getattr(logging, "_showwarning", None) and not _warnings_recorded():
        logging.captureWarnings(True)
        routing.captured_warnings = True
        stderr = logging.StreamHandler(sys.stderr)  # as Python would print them, when they concern the user
        stderr.setFormatter(logging.Formatter("%(message)s"))
        stderr.addFilter(shows_on_console)
        captured = logging.getLogger(_WARNINGS_LOGGER)
        captured.addHandler(stderr)
        routing.added.append((captured, stderr))
    return routing


def _warnings_recorded() -> bool:
    """Whether ``warnings.catch_warnings(record=True)`` (pytest, ``pytest.warns``) is
    collecting warnings now: they are left to it rather than sent to the log."""
    return getattr(getattr(warnings, "_showwarnmsg_impl", None), "__module__", "warnings") != "warnings"
