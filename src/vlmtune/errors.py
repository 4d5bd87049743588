"""Every error vlmtune raises on purpose, in one module every other imports (so none imports another for them).

Each carries a message that names the file, row, field or option at fault and says what to do; the CLI prints
it without a traceback (`cli.main`).
"""

from __future__ import annotations


class DataError(ValueError):
    """A dataset, record or image that cannot be used as it is."""


class ConfigError(ValueError):
    """Every problem found in a configuration, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded: not a model directory, or a hub id that cannot be reached."""


class RunDirError(RuntimeError):
    """A run directory that is missing or not a finished run."""


class TrainingStopped(RuntimeError):
    """Training ended before its last step, on purpose: a signal, or too many non-finite steps in a row.

    The message says where it stopped and how to go on; `exit_code` is what the CLI exits with.
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
