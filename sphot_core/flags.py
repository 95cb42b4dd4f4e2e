"""Bit flags: one registry for galaxy fits, one for point sources.

Each flag is a bit with a name and a one-line description; the documentation page
``docs/flags.rst`` is generated from these registries, so the code and the docs cannot
disagree. Combine with ``|`` and test with ``&``::

    from sphot_core.flags import GALAXY_FLAGS
    flags = GALAXY_FLAGS.AT_LOWER_BOUND | GALAXY_FLAGS.NOT_CONVERGED
    GALAXY_FLAGS.names(flags)     # ['AT_LOWER_BOUND', 'NOT_CONVERGED']
"""

from __future__ import annotations

from typing import Iterable

import attrs

__all__ = ["Flag", "FlagRegistry", "GALAXY_FLAGS", "SOURCE_FLAGS"]


@attrs.frozen
class Flag:
    bit: int
    name: str
    description: str


class FlagRegistry:
    """An ordered set of named bits."""

    def __init__(self, title: str, flags: Iterable[Flag]):
        self.title = title
        self._flags = tuple(flags)
        bits = [f.bit for f in self._flags]
        if len(set(bits)) != len(bits) or any(b <= 0 or b & (b - 1) for b in bits):
            raise ValueError(f"{title}: flag bits must be distinct powers of two")
        for f in self._flags:
            setattr(self, f.name, f.bit)

    def __iter__(self):
        return iter(self._flags)

    def __len__(self):
        return len(self._flags)

    def names(self, value: int) -> list:
        """Names of the bits set in ``value``."""
        return [f.name for f in self._flags if int(value) & f.bit]

    def describe(self, value: int) -> str:
        return ", ".join(self.names(value)) or "none"

    def table_rst(self) -> str:
        """The registry as a reStructuredText list table (used by the docs)."""
        lines = [".. list-table::", "   :header-rows: 1", "", "   * - bit", "     - name", "     - meaning"]
        for f in self._flags:
            lines += [f"   * - {f.bit}", f"     - ``{f.name}``", f"     - {f.description}"]
        return "\n".join(lines) + "\n"


GALAXY_FLAGS = FlagRegistry(
    "Galaxy (Sersic) fit flags, column ``flags`` of NAME_galaxy.csv",
    [
        Flag(1, "AT_LOWER_BOUND", "a fitted parameter ended within 1e-3 of its range (in log for r_eff) of its lower bound, or a linear parameter (amplitude, flux_point) at zero"),
        Flag(2, "AT_UPPER_BOUND", "a fitted parameter ended within 1e-3 of its range (in log for r_eff) of its upper bound"),
        Flag(4, "NOT_CONVERGED", "the optimizer did not report convergence (iteration or evaluation limit)"),
        Flag(8, "TOO_FEW_PIXELS", "fewer usable pixels than a minimum (10 x the number of free parameters)"),
        Flag(16, "SINGULAR_COVARIANCE", "the covariance matrix could not be computed; errors are NaN"),
        Flag(32, "LOOP_NOT_CONVERGED", "the alternating Sersic/stars/sky loop stopped at its iteration cap"),
        Flag(64, "BAND_FAILED", "the fit of this band failed; see the message in the log and NAME_sphot.h5"),
        Flag(128, "NO_SIGNAL", "the fitted amplitude is zero or not significant (flux below 1 sigma)"),
        Flag(256, "CALIBRATION_FAILED", "PSF kernel calibration failed; the previous PSF was kept"),
        Flag(512, "SHIFT_AT_BOUND", "scale fit: the free centre shift hit its bound"),
        Flag(1024, "NONFINITE", "the loss or the model became non-finite during the fit"),
    ],
)

SOURCE_FLAGS = FlagRegistry(
    "Point-source flags, column ``flags`` of NAME_sources.csv",
    [
        Flag(1, "EDGE", "the source's fit box (1 FWHM, at least 2 px, around it) extends beyond the image"),
        Flag(2, "NEAR_NODATA", "NaN or masked pixels within 1 FWHM of the source"),
        Flag(4, "POSITION_AT_BOUND", "a refit moved the position to its bound"),
        Flag(8, "LEFTOVER", "added by the refit's search for leftover peaks"),
        Flag(16, "FORCED", "position fixed (forced photometry at given positions)"),
        Flag(32, "BLENDED", "another source lies within 1 FWHM"),
        Flag(64, "SINGULAR", "the flux uncertainty could not be computed (flux_err is NaN)"),
        Flag(128, "NEAR_GALAXY_CENTRE", "inside the galaxy-centre region (forced photometry only)"),
        Flag(256, "LOW_SNR", "forced photometry: flux below low_snr (default 3) times its error; the row is kept"),
    ],
)
