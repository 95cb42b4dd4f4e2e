"""The sphot exception hierarchy.

Every error sphot raises on purpose derives from :class:`SphotError`. The command line
turns them into one-line messages and the exit code of the class; tracebacks are shown
only with ``-v``. All exceptions pickle (they cross process boundaries when bands or
galaxies run in worker processes), including their keyword attributes.
"""

from __future__ import annotations

__all__ = [
    "SphotError",
    "ConfigError",
    "InputError",
    "PluginError",
    "FitError",
    "DegenerateCutoutError",
    "OutputError",
    "PartialFailure",
]


class SphotError(Exception):
    """Base class of every error raised by sphot on purpose.

    Parameters
    ----------
    message : str
        One line that says what went wrong and where.
    **context
        Extra attributes kept on the exception (e.g. ``path``, ``filter``, ``stage``).
    """

    exit_code = 1

    def __init__(self, message: str = "", **context):
        super().__init__(message)
        self.message = message
        self.context = dict(context)
        for key, value in context.items():
            setattr(self, key, value)

    def __reduce__(self):
        # default pickling of Exception drops keyword arguments
        return (_rebuild, (type(self), self.message, self.context))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls, message, context):
    return cls(message, **context)


class ConfigError(SphotError):
    """Invalid configuration: broken TOML, unknown section/key, bad value."""

    exit_code = 2


class InputError(SphotError):
    """Bad input data: missing file, not HDF5, missing filter, wrong shapes, bad PSF."""

    exit_code = 3


class PluginError(SphotError):
    """Plugin discovery or lookup failed: unknown strategy name, conflicting names."""

    exit_code = 4


class FitError(SphotError):
    """A fit could not produce a usable result."""

    exit_code = 5


class DegenerateCutoutError(FitError, InputError):
    """The cutout cannot be fitted at all (no finite pixels, no galaxy signal, ...)."""

    exit_code = 6


class OutputError(SphotError):
    """Outputs could not be written (directory not writable, disk full, ...)."""

    exit_code = 7


class PartialFailure(SphotError):
    """The run finished, but some bands or galaxies failed (see the outputs and logs)."""

    exit_code = 8
