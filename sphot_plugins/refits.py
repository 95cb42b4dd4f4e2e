"""Joint refits of all point sources: ``nnls``, ``iterative`` and ``none``.

A refit receives the image with the galaxy and sky removed (no source subtracted) and
the sources found by a detecting fitter (or by the previous iteration), re-solves them
jointly, may add leftover sources (flag ``LEFTOVER``, kept on later refits) and drops
sources whose flux goes to zero. Without a noise map it estimates one
(:func:`sphot_core.stats.noise_map`). Flux errors
come from its own final design, and the model image is exactly the returned table
rendered. See ``docs/point_sources.rst``.
"""

from __future__ import annotations

import logging
from typing import Any, Dict

import attrs
import numpy as np

from sphot_core import photometry as ph
from sphot_core.flags import SOURCE_FLAGS
from sphot_core.hookspecs import StrategySpec
from sphot_core.stages import PointSourceResult, RefitStrategy
from sphot_core.stats import background_sigma

__all__ = ["NnlsOptions", "NnlsRefit", "IterativeOptions", "IterativeRefit", "NoRefitOptions", "NoRefit", "SPECS"]

log = logging.getLogger(__name__)

_positive = attrs.validators.gt(0)
_non_negative = attrs.validators.ge(0)


def _setup(image, noise, mask, exclude, options, psf):
    """Checked inputs (:func:`sphot_core.photometry.fit_inputs`), fit-box half-size and cached PSF."""
    inputs = ph.fit_inputs(image, noise, mask, exclude, where="refit")
    return inputs, ph.fit_half_size(psf, options.fit_box_fwhm), ph.CachedPSF(psf)


def _usable_sources(sources, valid, stats):
    """Drop input sources whose nearest pixel is unusable (NaN or masked); count them."""
    on = ph.pixel_value(valid, sources.x, sources.y, fill=False)
    stats["dropped_on_nodata"] = int(np.count_nonzero(~on))
    return sources.select(on)


def _leftovers(inputs, psf, resid, x, y, flux, core, *, k_sigma, box_size, dedup_psfsigma, stats):
    """One pass of the leftover search: new sources on the residual (others subtracted).

    Peaks of ``resid/noise`` above ``k_sigma`` times its background sigma
    (:func:`sphot_core.photometry.find_leftover_peaks`), not in ``exclude`` and not
    within ``dedup_psfsigma`` PSF sigmas of a source with positive flux, get their
    position and flux fitted on the residual (within 0.5 FWHM). Leftovers that end off
    the usable pixels or in ``exclude`` are dropped, and so are those that run to
    their position bound with unusable pixels in their fit box: they chase the light of
    a source hidden in the no-data region.

    Returns
    -------
    tuple of ndarray or None
        ``(x, y, flux)`` of the new sources (appending their number to
        ``stats["leftovers_added"]``), or None when no peak qualified.
    """
    system, excl = inputs.system, inputs.exclude
    lx, ly, strength = ph.find_leftover_peaks(resid, system.noise, system.valid, k_sigma, box_size)
    keep = ~ph.pixel_value(excl, lx, ly, fill=True)
    live = flux > 0
    keep &= ph.dedup(lx, ly, strength, x[live], y[live], dedup_psfsigma * psf.sigma)
    if not keep.any():
        return None
    fit = ph.fit_positions(
        system.with_image(resid), psf, lx[keep], ly[keep], np.zeros(np.count_nonzero(keep)),
        bound=0.5 * psf.fwhm, core_half=core, halves=core,
    )
    fx, fy = fit["x"], fit["y"]
    near_nodata = ~ph.box_usable(system.valid, fx, fy, core)
    ok = (fit["flux"] > 0) & ph.pixel_value(system.valid, fx, fy, fill=False) & ~(fit["at_bound"] & near_nodata)
    ok &= ~ph.pixel_value(excl, fx, fy, fill=True)
    stats["leftovers_added"].append(int(np.count_nonzero(ok)))
    return fx[ok], fy[ok], fit["flux"][ok]


@attrs.frozen
class NnlsOptions(ph.FittedOptions):
    """Options of the ``nnls`` refit (TOML table ``[refit.nnls]``).

    Besides ``stamp_tolerance``, ``fit_box_fwhm`` and ``flux_bias_correction``
    (:class:`sphot_core.photometry.FittedOptions`):

    Attributes
    ----------
    leftover_max_iterations : int
        Passes of the leftover-peak search (0 = none).
    leftover_detect_k_sigma : float
        Peak threshold on ``residual/noise``, in units of its background sigma.
    leftover_dedup_psfsigma : float
        Leftover peaks within this many PSF sigmas of a source are ignored.
    leftover_box_size : int
        ``find_peaks`` box size (px).
    """

    leftover_max_iterations: int = attrs.field(default=3, validator=_non_negative)
    leftover_detect_k_sigma: float = attrs.field(default=5.0, validator=_positive)
    leftover_dedup_psfsigma: float = attrs.field(default=1.5, validator=_non_negative)
    leftover_box_size: int = attrs.field(default=3, validator=attrs.validators.ge(3))


class NnlsRefit(RefitStrategy):
    """All fluxes at once, non-negative, at fixed positions, plus a leftover-peak loop.

    Positions stay where the detecting fitter put them (input sources on unusable pixels
    are dropped and counted in ``stats["dropped_on_nodata"]``); leftover peaks of the residual
    (not within ``leftover_dedup_psfsigma`` of a source, not in ``exclude``) get their
    position fitted on the residual and join the next joint solve.
    """

    name = "nnls"
    Options = NnlsOptions

    def refit(self, image, noise, psf, sources, *, mask=None, exclude=None) -> PointSourceResult:
        o = self.options
        inputs, core, psf = _setup(image, noise, mask, exclude, o, psf)
        img, system = inputs.image, inputs.system
        stats: Dict[str, Any] = {"refit": "nnls", "leftovers_added": []}
        sources = _usable_sources(sources, system.valid, stats)
        x = np.asarray(sources.x, dtype=float)
        y = np.asarray(sources.y, dtype=float)
        flags = np.asarray(sources.flags, dtype=np.int64)
        kw = dict(tolerance=o.stamp_tolerance, minimum_half=core, wings=True)
        sol = ph.solve_fluxes(system, psf, x, y, np.asarray(sources.flux, dtype=float), **kw)
        stats["solver_iterations"] = [sol.info["iterations"]]
        for _ in range(o.leftover_max_iterations):
            resid = img - ph.model_image(img.shape, psf, x, y, sol.flux, sol.halves)
            found = _leftovers(
                inputs, psf, resid, x, y, sol.flux, core, k_sigma=o.leftover_detect_k_sigma,
                box_size=o.leftover_box_size, dedup_psfsigma=o.leftover_dedup_psfsigma, stats=stats,
            )
            if found is None or found[0].size == 0:
                break
            lx, ly, lf = found
            x, y = np.r_[x, lx], np.r_[y, ly]
            flags = np.r_[flags, np.full(lx.size, SOURCE_FLAGS.LEFTOVER, dtype=np.int64)]
            sol = ph.solve_fluxes(system, psf, x, y, np.r_[sol.flux, lf], **kw)
            stats["solver_iterations"].append(sol.info["iterations"])
        live = sol.flux > 0
        stats["dropped_zero_flux"] = int(np.count_nonzero(~live))
        stats["solver_converged"] = bool(sol.info["converged"])
        log.info(
            "nnls refit: %d sources kept, %d dropped at zero flux, leftovers added per pass %s",
            np.count_nonzero(live), stats["dropped_zero_flux"], stats["leftovers_added"],
        )
        return ph.finalize(
            img, system, psf, x[live], y[live], sol.flux[live], sol.flux_errors()[live], flags[live],
            tolerance=o.stamp_tolerance, fit_half=core, positions_fitted=o.flux_bias_correction, stats=stats,
        )


@attrs.frozen
class IterativeOptions(ph.FittedOptions):
    """Options of the ``iterative`` refit (TOML table ``[refit.iterative]``).

    Besides ``stamp_tolerance``, ``fit_box_fwhm`` and ``flux_bias_correction``
    (:class:`sphot_core.photometry.FittedOptions`):

    Attributes
    ----------
    max_iterations : int
        Outer iterations (joint fit + leftover search).
    xy_bounds : float
        Largest shift (px) of a position from where the refit found it; 0 (default) pins
        the positions (fluxes only, plus the leftover search).
    detect_threshold : float
        Leftover peak threshold on ``residual/noise`` (photutils ``find_peaks``), in units
        of its background sigma.
    dedup_psfsigma : float
        Leftovers within this many PSF sigmas of a source are ignored.
    residual_tol : float
        Stop when the residual noise improves by less than this fraction.
    leftover_box_size : int
        ``find_peaks`` box size (px) of the leftover search.
    catastrophic_flux_factor : float
        A source whose flux grows beyond this factor times its starting flux is dropped
        and the fit repeated.
    position_iterations : int
        Gauss-Newton steps per outer iteration.
    """

    max_iterations: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    xy_bounds: float = attrs.field(default=0.0, validator=_non_negative)
    detect_threshold: float = attrs.field(default=4.0, validator=_positive)
    dedup_psfsigma: float = attrs.field(default=2.0, validator=_non_negative)
    residual_tol: float = attrs.field(default=0.01, validator=_non_negative)
    leftover_box_size: int = attrs.field(default=3, validator=attrs.validators.ge(3))
    catastrophic_flux_factor: float = attrs.field(default=20.0, validator=attrs.validators.gt(1))
    position_iterations: int = attrs.field(default=4, validator=attrs.validators.ge(1))


class IterativeRefit(RefitStrategy):
    """Joint least squares of all fluxes and positions, with leftover detection.

    Each iteration fits every position (within ``xy_bounds`` of where the refit found
    the source) and every flux (non-negative) at once
    (:func:`sphot_core.photometry.fit_positions`), drops catastrophic fluxes and
    refits, then searches the residual for leftover sources; it stops when the
    residual noise improves by less than ``residual_tol`` or nothing new is found.
    NaN and masked pixels are simply not in the design; input sources on them are
    dropped (``stats["dropped_on_nodata"]``), and a source that moves onto them (or into
    ``exclude``) is dropped and the fit repeated (``stats["moved_off_data"]``).
    """

    name = "iterative"
    Options = IterativeOptions

    def refit(self, image, noise, psf, sources, *, mask=None, exclude=None) -> PointSourceResult:
        o = self.options
        inputs, core, psf = _setup(image, noise, mask, exclude, o, psf)
        img, system, valid = inputs.image, inputs.system, inputs.valid
        stats: Dict[str, Any] = {
            "refit": "iterative", "leftovers_added": [], "catastrophic": 0, "moved_off_data": 0, "residual_sigma": []
        }
        sources = _usable_sources(sources, valid, stats)
        x = np.asarray(sources.x, dtype=float)
        y = np.asarray(sources.y, dtype=float)
        start = np.asarray(sources.flux, dtype=float)
        ax, ay = x.copy(), y.copy()
        flags = np.asarray(sources.flags, dtype=np.int64) & ~SOURCE_FLAGS.POSITION_AT_BOUND
        prev = None
        iteration = 0
        # max_iterations >= 1, and leftovers are only added while another iteration is
        # allowed: the loop always ends on a fit of the current sources
        while iteration < o.max_iterations:
            fit = ph.fit_positions(
                system, psf, x, y, start, anchor_x=ax, anchor_y=ay, bound=o.xy_bounds, core_half=core,
                tolerance=o.stamp_tolerance, iterations=o.position_iterations, wings=True,
            )
            bad = ~np.isfinite(fit["flux"]) | ((start > 0) & (fit["flux"] > o.catastrophic_flux_factor * start))
            fx, fy = fit["x"], fit["y"]
            off = ~ph.pixel_value(valid, fx, fy, fill=False) | ph.pixel_value(inputs.exclude, fx, fy, fill=False)
            if bad.any() or off.any():
                stats["catastrophic"] += int(np.count_nonzero(bad))
                stats["moved_off_data"] += int(np.count_nonzero(off & ~bad))
                drop = bad | off
                x, y, start, ax, ay, flags = (v[~drop] for v in (x, y, start, ax, ay, flags))
                continue  # refit without them; does not use up an iteration
            iteration += 1
            x, y = fit["x"], fit["y"]
            resid = img - ph.model_image(img.shape, psf, x, y, fit["flux"], fit["halves"])
            sigma = background_sigma(resid / system.noise, ~valid)
            stats["residual_sigma"].append(float(sigma))
            if prev is not None and prev - sigma < o.residual_tol * prev:
                break
            prev = sigma
            if iteration >= o.max_iterations:
                break
            found = _leftovers(
                inputs, psf, resid, x, y, fit["flux"], core, k_sigma=o.detect_threshold,
                box_size=o.leftover_box_size, dedup_psfsigma=o.dedup_psfsigma, stats=stats,
            )
            if found is None or found[0].size == 0:
                break
            lx, ly, lf = found
            start = np.r_[fit["flux"], lf]
            x, y, ax, ay = np.r_[x, lx], np.r_[y, ly], np.r_[ax, lx], np.r_[ay, ly]
            flags = np.r_[flags, np.full(lx.size, SOURCE_FLAGS.LEFTOVER, dtype=np.int64)]
        flags = flags | np.where(fit["at_bound"], SOURCE_FLAGS.POSITION_AT_BOUND, 0)
        live = fit["flux"] > 0
        stats["dropped_zero_flux"] = int(np.count_nonzero(~live))
        stats["iterations"] = iteration
        log.info(
            "iterative refit: %d sources kept after %d iterations, %d dropped at zero flux, %d catastrophic, "
            "leftovers added per pass %s",
            np.count_nonzero(live), iteration, stats["dropped_zero_flux"], stats["catastrophic"],
            stats["leftovers_added"],
        )
        return ph.finalize(
            img, system, psf, fit["x"][live], fit["y"][live], fit["flux"][live],
            fit["solution"].flux_errors()[live], flags[live],
            tolerance=o.stamp_tolerance, fit_half=core, positions_fitted=o.flux_bias_correction, stats=stats,
        )


@attrs.frozen
class NoRefitOptions(ph.FittedOptions):
    """Options of the ``none`` refit (TOML table ``[refit.none]``).

    ``stamp_tolerance`` and ``fit_box_fwhm`` set the model rendering and the fit box of
    ``qfit``/``cfit``. ``none`` keeps the fluxes it is given (a detecting fitter hands
    over fluxes already corrected for the position-fitting bias), so
    ``flux_bias_correction`` only matters to flux re-solves configured from these options.
    """


class NoRefit(RefitStrategy):
    """Keep the sources as they are: the model is the table rendered, fluxes and errors unchanged.

    The fluxes are not corrected again for the position-fitting bias: the detecting
    fitter did that where it fitted the positions, and applying ``none`` to its own
    output (the engine's warm iterations) must leave the fluxes alone.
    """

    name = "none"
    Options = NoRefitOptions

    def refit(self, image, noise, psf, sources, *, mask=None, exclude=None) -> PointSourceResult:
        o = self.options
        inputs, core, psf = _setup(image, noise, mask, exclude, o, psf)
        return ph.finalize(
            inputs.image, inputs.system, psf, sources.x, sources.y, sources.flux, sources.flux_err, sources.flags,
            tolerance=o.stamp_tolerance, fit_half=core, stats={"refit": "none"},
        )


SPECS = [
    StrategySpec(
        name="nnls",
        factory=NnlsRefit,
        options=NnlsOptions,
        description="joint non-negative fluxes on wing-holding stamps + leftover-peak loop",
    ),
    StrategySpec(
        name="iterative",
        factory=IterativeRefit,
        options=IterativeOptions,
        description="joint fluxes and bounded positions + leftover detection until the residual stops improving",
    ),
    StrategySpec(
        name="none", factory=NoRefit, options=NoRefitOptions, description="no refit: keep the detecting fitter's photometry"
    ),
]
