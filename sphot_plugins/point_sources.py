"""Point-source fitters: the threshold ``ladder`` and ``forced`` photometry.

Both work on the image with the galaxy and the sky removed and return a
:class:`~sphot_core.stages.PointSourceResult` whose model image is exactly its table
rendered. See ``docs/point_sources.rst`` for the algorithms and every option.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import attrs
import numpy as np

from sphot_core import photometry as ph
from sphot_core.data import SourceTable
from sphot_core.errors import FitError, InputError, SphotError
from sphot_core.flags import SOURCE_FLAGS
from sphot_core.hookspecs import StrategySpec
from sphot_core.stages import PointSourceFitter, PointSourceResult
from sphot_core.stats import background_sigma

__all__ = ["LadderOptions", "LadderFitter", "ForcedOptions", "ForcedFitter", "SPECS"]

log = logging.getLogger(__name__)

_positive = attrs.validators.gt(0)
_non_negative = attrs.validators.ge(0)


def _default_finder_kwargs() -> Dict[str, Any]:
    return {"roundness_range": [-1.0, 1.0], "sharpness_range": [0.2, 1.0]}


def _check_th_max(instance, attribute, value):
    if value < instance.th_min:
        raise ValueError(f"th_max ({value}) must be >= th_min ({instance.th_min})")


@attrs.frozen
class LadderOptions(ph.FittedOptions):
    """Options of the ``ladder`` point-source fitter (TOML table ``[psf.ladder]``).

    Besides ``stamp_tolerance`` (PSF wing pixels brighter than this fraction of the
    noise are inside the stamp), ``fit_box_fwhm`` (half-size of the fit box in PSF
    FWHM, at least 2 px) and ``flux_bias_correction`` (correct the fluxes of the
    ladder's table, handed to the refit or returned without one, for the bias of
    positions fitted on the same image; refits that re-solve the fluxes have their own)
    from :class:`sphot_core.photometry.FittedOptions`:

    Attributes
    ----------
    th_min, th_max : float
        Lowest and highest detection thresholds, in units of the noise of the
        detection image.
    th_iter : int
        Number of thresholds, geometric from ``th_max`` down to ``th_min``.
    th_max_consec_empty : int
        Stop after this many consecutive passes that add nothing (after a first
        productive pass).
    bkg_refit_per_iteration : bool
        Re-estimate the noise of the detection image from the residual after each
        productive pass.
    bkg_floor_factor : float
        Floor of that re-estimate, as a fraction of the first estimate.
    ladder_dedup_psfsigma : float
        A detection within this many PSF sigmas of an accepted source is a duplicate
        (0 disables).
    detector : str
        ``"dao"`` (photutils ``DAOStarFinder``) or ``"peaks"`` (``find_peaks`` on a
        PSF-matched S/N map).
    finder_kwargs : dict
        Extra ``DAOStarFinder`` arguments.
    cuts_pos_err_max, cuts_res_cen_sigma_clip, cuts_cfit_sigma_clip,
    cuts_pos_diff_median_factor, cuts_flux_SNR_min : float
        Quality cuts (see :func:`sphot_core.photometry.quality_cuts`).
    raise_error : bool
        Raise a :class:`~sphot_core.errors.FitError` when a pass or the refit fails
        instead of logging the error and going on.
    max_shift_fwhm : float
        Largest distance (in FWHM) a fitted position may move from its detection.
    position_iterations : int
        Gauss-Newton iterations of each pass's joint position fit.
    noise_box_size : int
        Box size (px) of the noise map estimated when no noise is given.
    """

    th_min: float = attrs.field(default=5.0, validator=_positive)
    th_max: float = attrs.field(default=30.0, validator=[_positive, _check_th_max])
    th_iter: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    th_max_consec_empty: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    bkg_refit_per_iteration: bool = True
    bkg_floor_factor: float = attrs.field(default=0.3, validator=_non_negative)
    ladder_dedup_psfsigma: float = attrs.field(default=0.5, validator=_non_negative)
    detector: str = attrs.field(default="dao", validator=attrs.validators.in_(("dao", "peaks")))
    finder_kwargs: dict = attrs.field(factory=_default_finder_kwargs)
    cuts_pos_err_max: float = attrs.field(default=2.0, validator=_positive)
    cuts_res_cen_sigma_clip: float = attrs.field(default=3.0, validator=_positive)
    cuts_cfit_sigma_clip: float = attrs.field(default=3.0, validator=_positive)
    cuts_pos_diff_median_factor: float = attrs.field(default=3.0, validator=_positive)
    cuts_flux_SNR_min: float = attrs.field(default=1.0, validator=_non_negative)
    raise_error: bool = False
    max_shift_fwhm: float = attrs.field(default=1.0, validator=_positive)
    position_iterations: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    noise_box_size: int = attrs.field(default=32, validator=attrs.validators.ge(8))

    @property
    def cut_settings(self) -> ph.CutSettings:
        return ph.CutSettings(
            pos_err_max=self.cuts_pos_err_max,
            res_cen_sigma=self.cuts_res_cen_sigma_clip,
            cfit_sigma=self.cuts_cfit_sigma_clip,
            drift_factor=self.cuts_pos_diff_median_factor,
            snr_min=self.cuts_flux_SNR_min,
        )


@attrs.define
class _Catalogue:
    """Sources accepted by the ladder passes so far (one array per pass and column)."""

    cols: Dict[str, List[np.ndarray]] = attrs.field(factory=dict)

    def add(self, **cols):
        for k, v in cols.items():
            self.cols.setdefault(k, []).append(np.asarray(v))

    def column(self, name) -> np.ndarray:
        parts = self.cols.get(name, [])
        return np.concatenate(parts) if parts else np.zeros(0)

    def __len__(self) -> int:
        return self.column("x").size


class LadderFitter(PointSourceFitter):
    """Threshold-ladder detection and PSF photometry, then an optional joint refit.

    For each threshold from ``th_max`` down to ``th_min`` (geometric): detect on the
    current residual, drop detections on unusable or excluded pixels and duplicates of
    accepted sources (KD-tree), fit the new sources' positions and fluxes jointly on
    their fit boxes (:func:`sphot_core.photometry.fit_positions`), drop fits that
    converged onto another source, subtract the new sources with wing-holding stamps
    and re-estimate the detection noise (with a floor). After the last pass the
    quality cuts are applied once, on the residual of the whole ladder (so blends
    whose members were found in different passes are judged with all members
    subtracted). Then the ``refit`` strategy (if any) re-solves the accepted sources on
    the original image. ``positions`` is not used.
    """

    name = "ladder"
    Options = LadderOptions

    def fit(self, image, noise, psf, *, mask=None, exclude=None, positions=None, refit=None) -> PointSourceResult:
        o = self.options
        inputs = ph.fit_inputs(
            image, noise, mask, exclude, where="point sources (ladder)", noise_box_size=o.noise_box_size,
            require_pixels=True,
        )
        img, valid, excl, noise_arr = inputs.image, inputs.valid, inputs.exclude, inputs.noise
        noise_given = noise is not None
        model_psf, psf = psf, ph.CachedPSF(psf)
        resid, cat, stats = self._ladder(img, noise_arr, valid, excl, psf)
        if not noise_given:
            # the first map saw every star; the ladder residual gives a cleaner one
            noise_arr = ph.prepare_noise(np.where(valid, resid, np.nan), None, valid, o.noise_box_size)
        system = ph.PixelSystem.build(img, noise_arr, valid)
        keep = self._cuts(resid, system, psf, cat, stats)
        x, y, flux, flux_err = (cat.column(k)[keep] for k in ("x", "y", "flux", "flux_err"))
        if o.flux_bias_correction:
            # positions and fluxes were fitted on this image: the table handed on (to the
            # refit, or returned) carries fluxes corrected for that bias, once
            flux = ph.debias_flux(flux, flux_err)
        table = SourceTable.from_columns(x, y, flux, flux_err=flux_err)
        result = None
        if refit is not None:
            result = self._run_refit(refit, img, noise_arr, model_psf, table, mask, exclude, stats)
        if result is None:
            result = ph.finalize(
                img, system, psf, x, y, flux, flux_err, 0,
                tolerance=o.stamp_tolerance, fit_half=ph.fit_half_size(psf, o.fit_box_fwhm), stats={},
            )
        merged = dict(stats)
        merged.update({k: v for k, v in result.stats.items() if k not in merged})
        merged["n_sources"] = len(result.sources)
        log.info(
            "ladder: %d sources after %d passes (%d found by the ladder, %d rejected by cuts: %s)",
            len(result.sources),
            stats["passes_run"],
            len(cat),
            stats["cuts"]["rejected"],
            ", ".join(f"{k} {v}" for k, v in stats["cuts"].items() if k != "rejected"),
        )
        return attrs.evolve(result, stats=merged)

    # ---------------------------------------------------------------- internals
    def _run_refit(self, refit, img, noise_arr, psf, table, mask, exclude, stats) -> Optional[PointSourceResult]:
        try:
            return refit.refit(img, noise_arr, psf, table, mask=mask, exclude=exclude)
        except SphotError:
            raise
        except Exception as exc:  # a failing refit falls back to the ladder result
            msg = f"point sources: refit {type(refit).__name__} failed: {type(exc).__name__}: {exc}"
            if self.options.raise_error:
                raise FitError(msg) from exc
            log.error("%s; keeping the ladder photometry", msg)
            stats["refit_failed"] = msg
            return None

    def _ladder(self, img, noise_arr, valid, excl, psf):
        o = self.options
        thresholds = np.geomspace(o.th_max, o.th_min, o.th_iter)
        core = ph.fit_half_size(psf, o.fit_box_fwhm)
        resid = np.where(valid, img, np.nan)
        system = ph.PixelSystem.build(img, noise_arr, valid)
        cat = _Catalogue()
        stats: Dict[str, Any] = {
            "thresholds": [float(t) for t in thresholds],
            "detected": [],
            "excluded": [],
            "duplicates": [],
            "accepted": [],
            "noise_scale": [],
            "failed_passes": 0,
        }
        s0 = scale = None
        productive_before = False
        empty = 0
        passes = 0
        for i, th in enumerate(thresholds):
            passes += 1
            stat = ph.detection_image(resid, noise_arr, valid, psf, o.detector)
            if scale is None or (o.bkg_refit_per_iteration and productive_before):
                level = background_sigma(stat, ~valid)
                if s0 is None:
                    s0 = level
                scale = max(level, o.bkg_floor_factor * s0) if np.isfinite(level) else s0
            stats["noise_scale"].append(float(scale))
            try:
                added = self._pass(i, stat, th * scale, resid, system, valid, excl, psf, core, cat, stats)
            except SphotError:
                raise
            except Exception as exc:
                msg = f"point sources: ladder pass {i + 1} (threshold {th:.3g}) failed: {type(exc).__name__}: {exc}"
                if o.raise_error:
                    raise FitError(msg) from exc
                log.error(msg)
                stats["failed_passes"] += 1
                added = 0
            productive_before = added > 0
            if added:
                empty = 0
            elif len(cat):
                empty += 1
                if empty >= o.th_max_consec_empty:
                    break
        stats["passes_run"] = passes
        return resid, cat, stats

    def _pass(self, i, stat, threshold, resid, system, valid, excl, psf, core, cat, stats) -> int:
        """One ladder pass; updates ``resid`` in place and returns the number of sources added."""
        o = self.options
        xd, yd, strength = ph.detect(stat, valid, psf, threshold, method=o.detector, finder_kwargs=o.finder_kwargs)
        stats["detected"].append(int(xd.size))
        inside = ~ph.pixel_value(excl, xd, yd, fill=True)
        stats["excluded"].append(int(np.count_nonzero(~inside)))
        xd, yd, strength = xd[inside], yd[inside], strength[inside]
        radius = o.ladder_dedup_psfsigma * psf.sigma
        keep = ph.dedup(xd, yd, strength, cat.column("x"), cat.column("y"), radius)
        xd, yd = xd[keep], yd[keep]
        n_dup = int(np.count_nonzero(~keep))
        added = 0
        if xd.size:
            fit = ph.fit_positions(
                system.with_image(resid), psf, xd, yd, np.zeros(xd.size),
                bound=o.max_shift_fwhm * psf.fwhm, core_half=core, tolerance=o.stamp_tolerance,
                iterations=o.position_iterations,
            )
            x, y, flux = fit["x"], fit["y"], fit["flux"]
            ok = (flux > 0) & ph.pixel_value(valid, x, y, fill=False) & ~ph.pixel_value(excl, x, y, fill=True)
            # a fit that converged onto an accepted source (or a stronger new one) is a duplicate
            dup = ~ph.dedup(x, y, flux, cat.column("x"), cat.column("y"), radius) & ok
            n_dup += int(np.count_nonzero(dup))
            ok &= ~dup
            if ok.any():
                sol = ph.solve_fluxes(
                    system.with_image(resid), psf, x[ok], y[ok], flux[ok], tolerance=o.stamp_tolerance,
                    minimum_half=core, wings=True,
                )
                live = sol.flux > 0
                x, y, xd, yd = x[ok][live], y[ok][live], xd[ok][live], yd[ok][live]
                f, ferr, halves = sol.flux[live], sol.flux_errors()[live], sol.halves[live]
                resid -= ph.model_image(resid.shape, psf, x, y, f, halves)
                cat.add(x=x, y=y, flux=f, flux_err=ferr, halves=halves, drift=np.hypot(x - xd, y - yd),
                        group=np.full(x.size, i))
                added = int(x.size)
        stats["duplicates"].append(n_dup)
        stats["accepted"].append(added)
        return added

    def _cuts(self, resid, system, psf, cat, stats) -> np.ndarray:
        """Apply the quality cuts once, on the residual of the whole ladder."""
        o = self.options
        n = len(cat)
        stats["cuts"] = dict.fromkeys(ph.CUT_NAMES + ("rejected",), 0)
        if n == 0:
            return np.zeros(0, dtype=bool)
        core = ph.fit_half_size(psf, o.fit_box_fwhm)
        x, y, flux = cat.column("x"), cat.column("y"), cat.column("flux")
        _, sx, sy = ph.cramer_rao(psf, x, y, flux, system.noise, system.valid, cat.column("halves").astype(int), core)
        diag = ph.box_diagnostics(resid, system.noise, system.valid, x, y, flux, core)
        values = dict(
            x_err=sx, y_err=sy, z_centre=diag["z_centre"], chi=diag["chi"], cfit=diag["cfit"],
            drift=cat.column("drift"), flux=flux, flux_err=cat.column("flux_err"),
        )
        keep = np.ones(n, dtype=bool)
        group = cat.column("group")
        for g in np.unique(group):
            sel = group == g
            ok, counts = ph.quality_cuts({k: v[sel] for k, v in values.items()}, o.cut_settings)
            keep[sel] = ok
            for k, v in counts.items():
                stats["cuts"][k] += v
        return keep


# ----------------------------------------------------------------------- forced


@attrs.frozen
class ForcedOptions(ph.StampOptions):
    """Options of ``forced`` photometry (TOML table ``[psf.forced]``).

    Besides ``stamp_tolerance`` and ``fit_box_fwhm`` (fit box of ``qfit``/``cfit``)
    from :class:`sphot_core.photometry.StampOptions`:

    Attributes
    ----------
    low_snr : float
        Sources with ``flux < low_snr * flux_err`` get the ``LOW_SNR`` flag.
    noise_box_size : int
        Box size (px) of the noise map estimated when no noise is given.
    """

    low_snr: float = attrs.field(default=3.0, validator=_non_negative)
    noise_box_size: int = attrs.field(default=32, validator=attrs.validators.ge(8))


class ForcedFitter(PointSourceFitter):
    """Fluxes at given positions, solved jointly and non-negatively.

    Positions whose nearest pixel is outside the image or unusable (NaN or masked)
    cannot be measured: they are left out of the table and the model and counted in
    ``stats["outside"]`` / ``stats["on_nodata"]``. The ``id`` of each row is the
    1-based index of its position in the input, so dropped positions are the missing
    ids. Positions inside ``exclude`` are measured and flagged ``NEAR_GALAXY_CENTRE``.
    Every row has ``FORCED``; ``flux_err`` comes from the full normal matrix (also for
    zero fluxes). ``refit`` is not used.
    """

    name = "forced"
    Options = ForcedOptions

    def fit(self, image, noise, psf, *, mask=None, exclude=None, positions=None, refit=None) -> PointSourceResult:
        o = self.options
        if positions is None:
            raise InputError("forced photometry needs positions=(x, y)")
        x = np.atleast_1d(np.asarray(positions[0], dtype=float))
        y = np.atleast_1d(np.asarray(positions[1], dtype=float))
        if x.shape != y.shape or x.ndim != 1:
            raise InputError(f"forced photometry: x and y positions differ in shape ({x.shape} vs {y.shape})")
        inputs = ph.fit_inputs(
            image, noise, mask, exclude, where="forced photometry", noise_box_size=o.noise_box_size,
            require_pixels=True,
        )
        img, valid, excl, system = inputs.image, inputs.valid, inputs.exclude, inputs.system
        psf = ph.CachedPSF(psf)
        ny, nx = img.shape
        finite = np.isfinite(x) & np.isfinite(y)
        inside = finite & (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
        usable = inside & ph.pixel_value(valid, np.where(finite, x, -1), np.where(finite, y, -1), fill=False)
        stats = {
            "requested": int(x.size),
            "outside": int(np.count_nonzero(~inside)),
            "on_nodata": int(np.count_nonzero(inside & ~usable)),
        }
        ids = np.flatnonzero(usable) + 1
        x, y = x[usable], y[usable]
        core = ph.fit_half_size(psf, o.fit_box_fwhm)
        sol = ph.solve_fluxes(
            system, psf, x, y, np.zeros(x.size), tolerance=o.stamp_tolerance, minimum_half=core, wings=True
        )
        flux_err = sol.flux_errors(all_sources=True)
        flags = np.full(x.size, SOURCE_FLAGS.FORCED, dtype=np.int64)
        flags[ph.pixel_value(excl, x, y, fill=False)] |= SOURCE_FLAGS.NEAR_GALAXY_CENTRE
        flags[~(sol.flux >= o.low_snr * flux_err)] |= SOURCE_FLAGS.LOW_SNR
        stats["solver"] = sol.info
        if stats["outside"] or stats["on_nodata"]:
            log.info(
                "forced photometry: %d of %d positions not measured (%d outside the image, %d on unusable pixels)",
                stats["outside"] + stats["on_nodata"], x.size + stats["outside"] + stats["on_nodata"],
                stats["outside"], stats["on_nodata"],
            )
        return ph.finalize(
            img, system, psf, x, y, sol.flux, flux_err, flags,
            tolerance=o.stamp_tolerance, fit_half=core, ids=ids, stats=stats,
        )


SPECS = [
    StrategySpec(
        name="ladder",
        factory=LadderFitter,
        options=LadderOptions,
        description="threshold-ladder detection + joint PSF photometry, then a joint refit",
    ),
    StrategySpec(
        name="forced",
        factory=ForcedFitter,
        options=ForcedOptions,
        description="joint non-negative PSF fluxes at given positions",
    ),
]
