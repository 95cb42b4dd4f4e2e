"""The engine: alternate Sersic, point-source, sky and PSF-calibration stages per band.

``run(galaxy, config)`` fits the base filter freely (primer fit on the raw data, then
the loop until the galaxy parameters stop moving, optional polish), then every other
filter with the base shape pinned (bands in parallel processes), or with the stars
force-fitted at the base positions. Each band loop::

    Sersic on (data - stars - sky)  ->  sky  ->  stars on (data - galaxy - sky)
    ->  sky  ->  outlier mask  ->  PSF kernel calibration (re-render the galaxy)

Only the *components* (galaxy, stars, sky images) are stored on the band; every image
a stage sees is derived from them (:meth:`Band.residual`). Stages come from the
configuration by name, or are passed in as objects (``run(..., sersic_fitter=obj)``).
The engine reports progress through a callback and never mutates the configuration.
"""

from __future__ import annotations

import logging
import math
import pickle
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import attrs
import numpy as np
from scipy import ndimage

from .calibrate import KernelTracker, galaxy_exclusion_mask
from .data import Band, Galaxy, SourceTable
from .errors import InputError, SphotError
from .flags import GALAXY_FLAGS
from .multiband import fit_wavelength_shape, wavelength_of
from .prep import GalaxyGuess, prepare
from .progress import null_progress
from .problem import SersicProblem, make_scale_problem
from .psf import SersicRenderer
from .stats import correlated_error_factor, noise_map, robust_sigma

#: free galaxy-centre shift (px) of a scale band that could not be registered on stars
UNREGISTERED_SHIFT = 0.5

__all__ = ["Stages", "run", "fit_band", "run_file", "parameter_change", "STAGE_NAMES"]

log = logging.getLogger(__name__)

#: keyword arguments of :func:`run` that replace a configured stage by an object
STAGE_NAMES = (
    "sersic_fitter",
    "primer_fitter",
    "first_fitter",
    "polish_fitter",
    "point_source_fitter",
    "forced_fitter",
    "refit",
    "sky",
    "kernel",
    "calibrator",
)


# ---------------------------------------------------------------------- stages


@attrs.frozen(eq=False)
class Stages:
    """The stage objects one run uses."""

    sersic_fitter: Any
    primer_fitter: Any
    first_fitter: Any
    polish_fitter: Any
    point_source_fitter: Any
    forced_fitter: Any
    refit: Any
    sky: Any
    kernel: Any
    calibrator: Any

    @classmethod
    def from_config(cls, config, registry=None, **given) -> "Stages":
        """Build the configured stages; ``given`` objects (or names) replace them."""
        unknown = set(given) - set(STAGE_NAMES)
        if unknown:
            raise InputError(f"unknown stage argument(s) {', '.join(sorted(unknown))}; valid: {', '.join(STAGE_NAMES)}")
        f = config.fitter
        plan = {
            "sersic_fitter": ("fitter", f.method),
            "primer_fitter": ("fitter", f.primer),
            "first_fitter": ("fitter", f.first_iteration),
            "polish_fitter": ("fitter", f.polish),
            "point_source_fitter": ("point_sources", config.psf.method),
            "forced_fitter": ("point_sources", config.psf.forced_method),
            "refit": ("refit", config.refit.method),
            "sky": ("sky", config.sky.method),
            "kernel": ("kernel", config.calib.family),
            "calibrator": ("calibrator", config.calib.method),
        }
        built = {}
        for key, (stage, name) in plan.items():
            value = given.get(key)
            if value is None:
                built[key] = config.build(stage, name, registry=registry)
            elif isinstance(value, str):
                built[key] = config.build(stage, value, registry=registry)
            else:
                built[key] = value
        # a sersic_fitter given as an object drives every Sersic fit unless those are given too
        if given.get("sersic_fitter") is not None and not isinstance(given["sersic_fitter"], str):
            for key in ("primer_fitter", "first_fitter", "polish_fitter"):
                if given.get(key) is None:
                    built[key] = built["sersic_fitter"]
        return cls(**built)


def _stage_name(obj) -> str:
    return getattr(obj, "name", "") or type(obj).__name__


# ------------------------------------------------------------------ convergence


def _change_and_scale(name: str, old: float, new: float, current: Mapping[str, float], error: float):
    """(change, scale of its uncertainty) of one parameter in the units of
    :func:`parameter_change`, or ``None`` for parameters not compared."""
    base = name.split("_")[0]
    if name in ("x_0", "y_0"):
        return abs(new - old), error
    if base in ("amplitude", "flux") or name.startswith("r_eff"):
        ref = max(abs(old), abs(new), 1e-12)
        return abs(new - old) / ref, error / ref
    if name.startswith("theta"):
        e = float(current.get("ellip" + name[len("theta") :], 1.0))
        return abs((new - old + math.pi / 2) % math.pi - math.pi / 2) * e, error * e
    if name.startswith("n") or name.startswith("ellip"):
        return abs(new - old), error
    return None


def parameter_change(
    previous: Mapping[str, float],
    current: Mapping[str, float],
    *,
    atol: float = 0.01,
    errors: Optional[Mapping[str, float]] = None,
    sigma_fraction: float = 0.0,
) -> float:
    """Largest parameter change between two iterations, in units of its tolerance.

    Each change is measured in physical units: centre in pixels; amplitudes, radii and
    point fluxes relative; Sersic index and ellipticity absolute; position angle in
    radians times the ellipticity (the angle of a round galaxy is meaningless). Its
    tolerance is ``atol``, or ``sigma_fraction`` times the parameter's 1-sigma
    uncertainty if that is larger (changes well inside the noise are jitter, not
    progress). A result <= 1 means every parameter is within its tolerance.
    """
    errors = errors or {}
    out = 0.0
    for name, new in current.items():
        if name not in previous:
            continue
        err = float(errors.get(name, float("nan")))
        pair = _change_and_scale(name, float(previous[name]), float(new), current, err if math.isfinite(err) else 0.0)
        if pair is None:
            continue
        change, scale = pair
        tol = max(atol, sigma_fraction * scale)
        out = max(out, change / tol)
    return out


# -------------------------------------------------------------------- one band


def _disc(shape, x, y, radius) -> Optional[np.ndarray]:
    if not radius > 0:
        return None
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (xx - x) ** 2 + (yy - y) ** 2 <= radius**2


def _pixel_of(shape, x, y):
    """Row and column indices of the pixels holding positions ``x, y`` (clipped to the image)."""
    iy = np.clip(np.round(np.asarray(y)).astype(int), 0, shape[0] - 1)
    ix = np.clip(np.round(np.asarray(x)).astype(int), 0, shape[1] - 1)
    return iy, ix


def _near(x, y, ref: np.ndarray, radius: float) -> np.ndarray:
    """Mask of the positions ``(x, y)`` within ``radius`` of a point of ``ref`` (N x 2)."""
    x = np.asarray(x, dtype=float)
    if not len(ref) or not x.size:
        return np.zeros(x.size, dtype=bool)
    from scipy.spatial import cKDTree

    d, _ = cKDTree(ref).query(np.column_stack([x, np.asarray(y, dtype=float)]))
    return d <= radius


class _BandLoop:
    """The alternating fit of one band (base, scale or forced)."""

    def __init__(self, band: Band, config, stages: Stages, emit: Callable, model: str):
        self.band = band
        self.cfg = config
        self.st = stages
        self.emit = emit
        self.model = model
        self._renderers: Dict[str, SersicRenderer] = {}
        calib = config.calib
        self.tracker = (
            KernelTracker(
                band.library_psf,
                stages.kernel,
                skip_threshold=calib.kernel_skip_threshold,
                skip_on_convergence=calib.kernel_fit_skip_on_convergence,
                damping=calib.damping,
            )
            if calib.in_mainloop
            else None
        )
        self.timings: Dict[str, float] = {}
        self.substructure = 0
        self._solver = None
        #: scale bands: callable returning the seed positions (the base catalogue, shifted)
        self.seed_for: Optional[Callable] = None
        self._calibration_warned: Optional[str] = None
        #: positions (x, y) returned to the galaxy in two of the loop's passes (for good),
        #: and those returned in one so far
        self._returned = np.zeros((0, 2))
        self._once = np.zeros((0, 2))
        #: scale bands: free centre shift around the registered base centre (pixels)
        self.shift_max = config.core.scale_shift_max
        #: seeded scale bands: pixels where the base band had usable data, and the
        #: unresolved-foreground image (part of the star model, see :meth:`_unresolved`)
        self.base_valid: Optional[np.ndarray] = None
        self.unresolved: Optional[np.ndarray] = None

    # ------------------------------------------------------------ helpers
    def _timed(self, key: str, t0: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0

    def renderer(self) -> SersicRenderer:
        psf = self.band.psf
        r = self._renderers.get(psf.key)
        if r is None:
            self._renderers = {psf.key: SersicRenderer(self.band.shape, psf)}
            r = self._renderers[psf.key]
        return r

    def _problem_kwargs(self, loss: Optional[str] = None) -> Dict[str, Any]:
        f = self.cfg.fitter
        return dict(
            loss=loss or f.loss,
            robust_kappa=f.robust_kappa,
            regularize_aspect=f.regularize_aspect,
            aspect_prior_sigma=f.aspect_prior_sigma,
            solve_sky=f.solve_sky,
            renderer=self.renderer(),
        )

    def _galaxy_ellipse(self, factor: float) -> Optional[np.ndarray]:
        res = self.band.sersic
        if res is None or factor <= 0:
            return None
        p = res.params
        geo = {
            "x_0": p["x_0"],
            "y_0": p["y_0"],
            "r_eff": max(p.get(k, 0.0) for k in ("r_eff", "r_eff_disk", "r_eff_bulge") if k in p),
            "ellip": p.get("ellip", p.get("ellip_disk", 0.0)),
            "theta": p.get("theta", p.get("theta_disk", 0.0)),
        }
        return galaxy_exclusion_mask(self.band.shape, geo, factor=factor, cap_fraction=0.49)

    def chi2_dof(self) -> float:
        """Reduced chi-square of the current joint model (see :meth:`Band.reduced_chi2`)."""
        from .io import _n_params

        return self.band.reduced_chi2(_n_params(self.band))

    # ------------------------------------------------------------- stages
    def sersic(
        self, fitter, start: Optional[Mapping[str, float]], base_params=None, loss: Optional[str] = None, pin_centre: bool = False
    ) -> None:
        t0 = time.perf_counter()
        b = self.band
        self.emit({"band": b.filter, "step": "sersic"})
        image = b.residual(galaxy=False)
        kw = self._problem_kwargs(loss)
        if base_params is None:
            problem = SersicProblem(image, b.noise, b.psf, mask=b.mask, model=self.model, start=start, **kw)
        else:
            problem = make_scale_problem(
                image,
                b.noise,
                b.psf,
                base_params,
                mask=b.mask,
                shift_max=0.0 if pin_centre else self.shift_max,
                allow_refit=self.cfg.core.allow_refit and not pin_centre,
                free=() if pin_centre else self.cfg.core.scale_free,
                model=self.model,
                **kw,
            )
        if problem.n_free == 0:  # everything pinned: only the linear parameters remain
            result = problem.finalize(
                np.zeros(0), success=True, message="no free shape parameter: linear parameters solved", optimizer="linear"
            )
        else:
            result = fitter.fit(problem, start)
        if not all(math.isfinite(float(v)) for v in result.params.values()):
            raise SphotError(f"band {b.filter}: the Sersic fit returned non-finite parameters ({result.message})")
        b.sersic = result
        b.galaxy_model = self.renderer().render(result.params, problem.spec)
        if result.sky_offset:
            b.sky_model = b.component("sky") + result.sky_offset
        self._timed("sersic", t0)

    def rerender(self) -> None:
        """Re-render (not refit) the galaxy after the PSF changed."""
        b = self.band
        if b.sersic is not None:
            b.galaxy_model = self.renderer().render(b.sersic.params, self.model)

    def sky(self) -> None:
        t0 = time.perf_counter()
        b = self.band
        mask = self._galaxy_ellipse(self.cfg.sky.galaxy_mask_r_eff)
        if b.mask is not None:
            mask = b.mask if mask is None else (mask | b.mask)
        res = self.st.sky.fit(b.residual(sky=False), b.noise, mask)
        b.sky = res
        b.sky_model = res.image
        self._timed("sky", t0)

    def measure_offset(self, min_snr: float = 20.0, bound: float = 1.5) -> Optional[np.ndarray]:
        """The band's registration offset from its bright stars.

        The current catalogue is fitted jointly with free positions (within ``bound``
        px) on (data - galaxy - sky); the median shift of the *seeded* stars (the base
        band's stars at their base positions, not the band's own leftover sources,
        which sit at positions fitted in this band) above ``min_snr`` that did not hit
        the bound is the offset of this band's image relative to the base band's
        (``None`` with fewer than three such stars).
        """
        from . import photometry as ph
        from .flags import SOURCE_FLAGS

        b = self.band
        src = b.sources
        if src is None or len(src) < 3:
            return None
        image = b.residual(stars=False)
        usable = ph.usable_pixels(image, b.mask)
        system = ph.PixelSystem.build(image, b.noise, usable)
        fit = ph.fit_positions(system, b.psf, src.x, src.y, src.flux, bound=bound, core_half=ph.fit_half_size(b.psf))
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.asarray(src.flux) / np.asarray(src.flux_err)
        seeded = (np.asarray(src.flags) & SOURCE_FLAGS.LEFTOVER) == 0
        good = seeded & (snr > min_snr) & ~fit["at_bound"] & (fit["flux"] > 0)
        if good.sum() < 3:
            return None
        return np.array([np.median(fit["x"][good] - src.x[good]), np.median(fit["y"][good] - src.y[good])])

    def _seeded(self, warm: bool) -> SourceTable:
        """The base band's sources at this band's offset, plus (in warm iterations) the
        band's own leftover sources that are not near one of them. Seeds whose flux
        went to zero in one iteration come back in the next."""
        sx, sy = self.seed_for()
        seeds = SourceTable.from_columns(sx, sy, np.zeros(sx.size))
        src = self.band.sources
        if not warm or src is None or len(src) == 0 or sx.size == 0:
            return seeds
        return SourceTable.concatenate([seeds, src.select(self._own(src))])

    def _own(self, src: SourceTable) -> np.ndarray:
        """Which of ``src`` are the band's own sources: not within 0.5 FWHM of a seed."""
        sx, sy = self.seed_for()
        return ~_near(src.x, src.y, np.column_stack([sx, sy]), 0.5 * self.band.psf.fwhm)

    def stars(self, *, warm: bool, positions=None) -> None:
        """Point sources on (data - galaxy - sky).

        ``positions``: forced photometry at these positions. With a seed catalogue
        (scale bands: the base band's sources at this band's offset) the refit strategy
        re-solves the seeds and the band's own leftovers every time. Otherwise the
        detecting fitter (ladder) runs, or, in warm iterations, the refit of the
        current catalogue. In a seeded scale band the star model also holds the level
        of the stars the band cannot look for under the galaxy (:meth:`_unresolved`).
        """
        t0 = time.perf_counter()
        b = self.band
        self.emit({"band": b.filter, "step": "stars"})
        image = b.residual(stars=False)
        if self.unresolved is not None:
            image = image - self.unresolved
        p = b.sersic.params if b.sersic is not None else {}
        exclude = _disc(b.shape, p.get("x_0", np.nan), p.get("y_0", np.nan), self.cfg.psf.center_mask_r_in_fwhm * b.psf.fwhm) if p else None
        leftover = None  # seeded scale bands: where the band may not add sources of its own
        if positions is not None:
            res = self.st.forced_fitter.fit(image, b.noise, b.psf, exclude=exclude, positions=positions)
        else:
            exclude = self._returned_exclude(exclude)
            if self.seed_for is not None:
                seeds = self._not_returned(self._seeded(warm))
                leftover = self._leftover_exclude(exclude)
                res = self.st.refit.refit(image, b.noise, b.psf, seeds, exclude=leftover)
            elif warm and b.sources is not None and len(b.sources) > 0 and not self.cfg.psf.redetect_each_iteration:
                res = self.st.refit.refit(image, b.noise, b.psf, self._not_returned(b.sources), exclude=exclude)
            else:
                res = self.st.point_source_fitter.fit(image, b.noise, b.psf, exclude=exclude, refit=self.st.refit)
        b.sources = res.sources
        b.star_model = res.model
        if positions is None:
            self.return_substructure(image, exclude, remember=warm)
        if self.seed_for is not None and positions is None:
            self.unresolved = self._unresolved(leftover)
            if self.unresolved is not None:
                b.star_model = b.star_model + self.unresolved
        self._timed("stars", t0)

    def _unresolved(self, excl: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """The light of the stars this band finds beyond the base band's depth, where it
        may not look for them (``[psf] scale_unresolved``).

        A seeded scale band adds sources of its own (stars the base band missed) only
        outside the leftover exclusion (the centre disc and the ``scale_leftovers_r_eff``
        ellipse). Outside, the sky then carries the band's own depth of unresolved
        stars; under the galaxy the same population of stars is present but unmodelled,
        and the galaxy would take its light. Its mean surface brightness is the flux of
        the band's own sources per usable pixel of the region they are searched in,
        counted only where the base band has data (elsewhere the base band could not
        have found them). ``excl`` is the leftover exclusion (:meth:`_leftover_exclude`).
        Returned as a constant over it (usable pixels), or ``None`` when there is nothing
        to correct.
        """
        b = self.band
        if not self.cfg.psf.scale_unresolved or excl is None or self.base_valid is None or b.sources is None or len(b.sources) == 0:
            return None
        src = b.sources
        own = self._own(src)
        search = b.valid & self.base_valid & ~excl
        iy, ix = _pixel_of(b.shape, src.x, src.y)
        counted = own & search[iy, ix] & np.isfinite(src.flux) & (src.flux > 0)
        area = int(search.sum())
        if area == 0 or not counted.any():
            return None
        level = float(np.sum(src.flux[counted])) / area
        out = np.zeros(b.shape)
        out[excl & b.valid] = level
        log.debug("band %s: unresolved foreground %.4g per px under the galaxy (%d own sources over %d px)", b.filter, level, int(counted.sum()), area)
        return out

    def _leftover_exclude(self, exclude):
        """Where a seeded scale band may not add sources of its own: the centre disc and,
        with ``[psf] scale_leftovers_r_eff``, the galaxy ellipse of that many r_eff (the
        stars there come from the sharper base band; new peaks there are mostly galaxy
        structure the pinned model misses)."""
        inner = self._galaxy_ellipse(self.cfg.psf.scale_leftovers_r_eff)
        if inner is None:
            return exclude
        return inner if exclude is None else (exclude | inner)

    def _remember(self, xy: np.ndarray) -> int:
        """Positions returned to the galaxy in this pass: those returned in an earlier
        pass too become structure for good (a source near a limit that came back in the
        next pass would make the loop cycle between two solutions); the others are
        candidates (a single crossing of the limit by noise does not lose a star).
        Returns the number of new candidates."""
        if not len(xy):
            return 0
        again = _near(xy[:, 0], xy[:, 1], self._once, self._returned_radius())
        self._returned = np.vstack([self._returned, xy[again]])
        self._once = np.vstack([self._once, xy[~again]])
        return int((~again).sum())

    def _returned_radius(self) -> float:
        return 0.5 * self.band.psf.fwhm + 0.5

    def _not_returned(self, sources: SourceTable) -> SourceTable:
        """``sources`` without those at a position returned to the galaxy before."""
        if not len(self._returned) or sources is None or len(sources) == 0:
            return sources
        return sources.select(~_near(sources.x, sources.y, self._returned, self._returned_radius()))

    def _returned_exclude(self, exclude):
        """``exclude`` plus a disc around every position returned to the galaxy before, so
        that the leftover search does not find the same structure again."""
        if not len(self._returned):
            return exclude
        r = self._returned_radius()
        out = np.zeros(self.band.shape, dtype=bool) if exclude is None else exclude.copy()
        for x, y in self._returned:
            out |= _disc(out.shape, x, y, r)
        return out

    def return_substructure(self, image, exclude, *, remember: bool = False) -> None:
        """Resolved sources inside the galaxy footprint are galaxy substructure.

        Clumps, star-forming knots and the ridge of a disk the smooth model misses look
        like positive peaks on the galaxy-subtracted image; as "stars" they would take
        galaxy light away, more with every iteration. A source inside the ellipse of
        ``galaxy_footprint_r_eff`` x r_eff whose SPREAD_MODEL exceeds SExtractor's
        star/galaxy threshold sqrt(epsilon^2 + (kappa sigma)^2) is removed, and so is, in
        a band that finds its own sources, the excess over the foreground density
        (:meth:`_density_excess`); the fluxes of the others are re-solved jointly
        (non-negative, no leftover search). With ``remember`` (the loop's passes) the
        positions go to :meth:`_remember`: one returned a second time gets no source
        again in this band. ``self.substructure`` counts the structure positions of this
        pass: the remembered ones plus this pass's first returns (this pass's returns
        when not remembering).
        """
        b = self.band
        cfg = self.cfg.psf
        src = b.sources
        if src is None or len(src) == 0 or cfg.galaxy_footprint_r_eff <= 0:
            return
        footprint = self._galaxy_ellipse(cfg.galaxy_footprint_r_eff)
        if footprint is None:
            return
        iy, ix = _pixel_of(b.shape, src.x, src.y)
        limit = np.sqrt(cfg.extended_spread_epsilon**2 + (cfg.extended_spread_kappa * src.spread_model_err) ** 2)
        extended = footprint[iy, ix] & np.isfinite(src.spread_model) & (src.spread_model > limit)
        crowded = np.zeros_like(extended)
        if cfg.substructure_density_sigma > 0 and self.seed_for is None:
            crowded = self._density_excess(image, exclude, footprint, iy, ix, ~extended)
        gone = extended | crowded
        if remember:
            first = self._remember(np.column_stack([src.x[gone], src.y[gone]]))
            self.substructure = len(self._returned) + first
        else:
            self.substructure = int(gone.sum())
        if not gone.any():
            return
        res = self._flux_solver().refit(image, b.noise, b.psf, src.select(~gone), exclude=exclude)
        b.sources = res.sources.renumbered()
        b.star_model = res.model
        log.debug(
            "band %s: %d resolved sources and %d in excess of the field density inside the galaxy footprint "
            "returned to the galaxy", b.filter, int(extended.sum()), int(crowded.sum()),
        )

    def _density_excess(self, image, exclude, footprint, iy, ix, candidate) -> np.ndarray:
        """Sources in excess of the foreground density inside the galaxy ellipses.

        The density of ``candidate`` sources outside ``footprint`` (the
        ``galaxy_footprint_r_eff`` ellipse), on usable pixels (finite, not masked, not in
        ``exclude``), predicts how many fall inside each nested ellipse of 0.25, 0.5, 1
        and 2 r_eff (up to the footprint); beyond that count plus ``substructure_density_sigma`` Poisson sigma,
        the excess (innermost ellipse first, least star-like first: highest
        SPREAD_MODEL / error) is marked. The detection limit is brighter on the galaxy
        than in the field, so the prediction is an upper bound. Nothing is marked when
        the field holds fewer than ten sources or a tenth of the usable pixels.
        """
        b = self.band
        cfg = self.cfg.psf
        out = np.zeros(candidate.shape, dtype=bool)
        usable = b.valid & np.isfinite(image)
        if exclude is not None:
            usable &= ~exclude
        field = usable & ~footprint
        in_field = candidate & field[iy, ix]
        if in_field.sum() < 10 or field.sum() < 0.1 * usable.sum():
            return out
        density = in_field.sum() / field.sum()
        src = b.sources
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.asarray(src.spread_model) / np.asarray(src.spread_model_err)
        score = np.where(np.isfinite(score), score, -np.inf)
        z = cfg.substructure_density_sigma
        factors = [f for f in (0.25, 0.5, 1.0, 2.0) if f < cfg.galaxy_footprint_r_eff] + [cfg.galaxy_footprint_r_eff]
        for factor in factors:
            ellipse = self._galaxy_ellipse(factor) & usable
            expected = density * ellipse.sum()
            inside = np.flatnonzero(candidate & ~out & ellipse[iy, ix])
            excess = inside.size - int(np.floor(expected + z * np.sqrt(expected)))
            if excess > 0:
                out[inside[np.argsort(-score[inside], kind="stable")[:excess]]] = True
        return out

    def _flux_solver(self):
        from .registry import get_registry

        if self._solver is None:
            self._solver = get_registry().create("refit", "nnls", {"leftover_max_iterations": 0})
        return self._solver

    def update_outliers(self) -> None:
        """Mask pixels of the full residual beyond ``residual_clip_sigma`` (outside the
        galaxy ellipse), grown by one pixel: saturated or badly subtracted stars."""
        b = self.band
        r = b.residual()
        sigma = robust_sigma(r)
        if not sigma > 0:
            b.mask = None
            return
        protect = self._galaxy_ellipse(self.cfg.core.mask_aper_size_in_r_eff)
        bad = np.isfinite(r) & (np.abs(r) > self.cfg.core.residual_clip_sigma * sigma)
        if protect is not None:
            bad &= ~protect
        bad = ndimage.binary_dilation(bad) if bad.any() else bad
        b.mask = bad if bad.any() else None

    def calibrate(self, iteration: int) -> None:
        if self.tracker is None or not self.tracker.should_calibrate():
            return
        t0 = time.perf_counter()
        b = self.band
        self.emit({"band": b.filter, "step": "calibration"})
        exclude = self._galaxy_ellipse(self.cfg.calib.center_mask_r_in_galaxy_size)
        try:
            fit = self.st.calibrator.calibrate(
                b.residual(stars=False),
                b.noise,
                b.library_psf,
                self.st.kernel,
                mask=b.mask,
                exclude=exclude,
                previous=self.tracker.fit,
            )
        except (SphotError, ValueError, np.linalg.LinAlgError, FloatingPointError) as exc:
            self._calibration_failed(iteration, str(exc))
            b.flags |= GALAXY_FLAGS.CALIBRATION_FAILED
            b.kernel_history.append({"iteration": iteration, "success": False, "message": str(exc)})
            self._timed("calibration", t0)
            return
        record = self.tracker.update(fit, iteration)
        b.kernel_history.append(record)
        if not record["success"]:
            self._calibration_failed(iteration, fit.message)
            b.flags |= GALAXY_FLAGS.CALIBRATION_FAILED
        elif record["accepted"]:
            b.flags &= ~GALAXY_FLAGS.CALIBRATION_FAILED
        if self.tracker.psf is not b.psf:
            b.psf = self.tracker.psf
            b.kernel = self.tracker.fit
            self.rerender()
        self._timed("calibration", t0)

    def _calibration_failed(self, iteration: int, message: str) -> None:
        """A warning for the band's first failed calibration (and for a new reason);
        repeats of the same failure go to the debug log (the flag and the band's
        ``kernel_history`` keep every one)."""
        level = logging.DEBUG if message == self._calibration_warned else logging.WARNING
        self._calibration_warned = message
        log.log(level, "band %s: PSF calibration failed at iteration %d: %s", self.band.filter, iteration, message)

    def joint(self, *, positions_fitted: bool) -> None:
        """Galaxy brightness and star fluxes in one linear solve (``[core] joint_linear``).

        Shape and positions stay as the last steps left them; the galaxy model (one
        column: every linear parameter scaled by the same factor) and the stars' stamps
        (and, with ``joint_linear_sky``, a sky correction) are solved together,
        non-negatively, on ``data - sky`` (minus the level of :meth:`_unresolved` in a
        seeded scale band). With ``joint_linear_galaxy = false`` the
        galaxy is held fixed (the solve is on ``data - galaxy - sky``) and only the stars
        and the sky correction are solved together. Alternating the steps reaches the
        same solution only slowly where they overlap (each step hands the other the
        light it cannot yet tell apart). Sources whose flux goes to zero are dropped;
        the galaxy's flux error becomes the larger of the Sersic fit's and the joint
        solve's (which includes the covariance with the stars). With
        ``positions_fitted`` (the positions were fitted on this image: base band) the
        star fluxes get the refit's position-bias correction, if it is configured.
        """
        from . import photometry as ph

        b = self.band
        src = b.sources
        if not self.cfg.core.joint_linear or b.sersic is None or b.galaxy_model is None or src is None or len(src) == 0:
            return
        t0 = time.perf_counter()
        opts = getattr(self.st.refit, "options", None)
        stamp = opts if isinstance(opts, ph.StampOptions) else ph.StampOptions()
        core = ph.fit_half_size(b.psf, stamp.fit_box_fwhm)
        with_galaxy = self.cfg.core.joint_linear_galaxy
        image = b.residual(galaxy=not with_galaxy, stars=False)
        if self.unresolved is not None:
            image = image - self.unresolved
        system = ph.PixelSystem.build(image, b.noise, ph.usable_pixels(image, b.mask))
        sky_terms = self._sky_terms()
        extra = list(sky_terms)
        signed = [True] * len(sky_terms)
        if with_galaxy:
            extra, signed = [b.galaxy_model] + extra, [False] + signed
        sol = ph.solve_fluxes(
            system, b.psf, src.x, src.y, src.flux, tolerance=stamp.stamp_tolerance, minimum_half=core, wings=True,
            extra=np.array(extra) if extra else None, extra_signed=signed,
        )
        n_gal = int(with_galaxy)
        if with_galaxy:
            scale = float(sol.extra_flux[0])
            if not (scale > 0 and math.isfinite(scale)):
                self._timed("joint", t0)
                return  # no galaxy left in the joint solve: the Sersic step will say so
            scale_err = float(sol.extra_errors()[0])
            log.debug("band %s: joint solve scales the galaxy by %.4f +- %.4f", b.filter, scale, scale_err)
            galaxy = scale * b.galaxy_model
        else:
            galaxy = 0.0  # already subtracted from the image
        keep = sol.flux > 0
        flux_err = sol.flux_errors()
        sky_change = np.tensordot(sol.extra_flux[n_gal:], sky_terms, axes=1) if len(sky_terms) else 0.0
        b.sky_model = b.component("sky") + sky_change
        stars_image = image - galaxy - sky_change
        res = ph.finalize(
            stars_image, system, b.psf, src.x[keep], src.y[keep],
            sol.flux[keep], flux_err[keep], np.asarray(src.flags)[keep], tolerance=stamp.stamp_tolerance,
            fit_half=core, positions_fitted=positions_fitted and getattr(stamp, "flux_bias_correction", False),
            stats={"refit": "joint"},
        )
        b.sources = res.sources
        b.star_model = res.model if self.unresolved is None else res.model + self.unresolved
        if with_galaxy:
            b.galaxy_model = galaxy
            b.sersic = _scaled(b.sersic, scale, scale_err)
        self._timed("joint", t0)

    def _sky_terms(self) -> np.ndarray:
        """Images of the sky corrections solved in :meth:`joint` (``[core]
        joint_linear_sky``): none for the ``none`` sky, a constant for ``constant``,
        else a constant and a plane (x, y in units of the image size around its centre)."""
        b = self.band
        name = getattr(self.st.sky, "name", "")
        if name == "none" or not self.cfg.core.joint_linear_sky:
            return np.zeros((0,) + b.shape)
        ny, nx = b.shape
        terms = [np.ones(b.shape)]
        if name != "constant":
            yy, xx = np.mgrid[0:ny, 0:nx]
            terms += [(xx - (nx - 1) / 2) / nx, (yy - (ny - 1) / 2) / ny]
        return np.array(terms)

    def cycle(self, iteration: int, *, warm: bool, positions=None) -> None:
        """sky -> stars -> joint galaxy/star brightness -> sky -> outliers -> calibration."""
        self.sky()
        self.stars(warm=warm, positions=positions)
        self.joint(positions_fitted=positions is None and self.seed_for is None)
        self.sky()
        self.update_outliers()
        self.calibrate(iteration)

    def record(self, stage: str, iteration: Optional[int], change: Optional[float], **extra) -> None:
        b = self.band
        entry = {
            **extra,
            "stage": stage,
            "iteration": iteration,
            "chi2_dof": self.chi2_dof(),
            "n_sources": len(b.sources) if b.sources is not None else 0,
            "n_substructure": self.substructure,
            "params": dict(b.sersic.params) if b.sersic is not None else {},
            "optimizer": b.sersic.optimizer if b.sersic is not None else "",
            "nfev": b.sersic.nfev if b.sersic is not None else 0,
            "change": change,
            "fwhm": b.psf.fwhm,
            "seconds": dict(self.timings),
        }
        b.history.append(entry)
        self.emit(
            {
                "band": b.filter,
                "stage": stage,
                "iteration": iteration,
                "chi2_dof": entry["chi2_dof"],
                "n_sources": entry["n_sources"],
            }
        )

    # ---------------------------------------------------------------- plans
    def initial_sky(self) -> None:
        b = self.band
        level = float(np.nanmedian(b.data))
        b.sky_model = np.full(b.shape, level)

    def error_factor(self) -> float:
        """``[core] correlated_errors``: the factor for the fit's errors from the spatial
        correlation of the full residual outside the sky fit's galaxy ellipse (lags up to
        2 FWHM, at least 4 and at most 16 px; :func:`~sphot_core.stats.correlated_error_factor`),
        1 when switched off."""
        b = self.band
        if not self.cfg.core.correlated_errors or b.galaxy_model is None or b.noise is None:
            return 1.0
        galaxy = self._galaxy_ellipse(self.cfg.sky.galaxy_mask_r_eff)
        region = b.valid if galaxy is None else b.valid & ~galaxy
        lag = int(np.clip(np.ceil(2.0 * b.psf.fwhm), 4, 16))
        return correlated_error_factor(b.residual(), b.noise, region, b.galaxy_model, usable=b.valid, max_lag=lag)

    def refresh_noise(self) -> None:
        """Noise map from the full residual (galaxy, stars and sky removed; outliers
        masked). Run after the primer cycle and after the first loop iteration, then
        kept fixed so that losses compare between iterations."""
        b = self.band
        nm = noise_map(b.residual(), b.mask)
        if np.isfinite(nm).all() and (nm > 0).all():
            b.noise = nm

    def loop(self, n_iter: int, fitter_for: Callable[[int], Any], base_params=None, positions_for=None) -> bool:
        """The main loop; returns True if the parameters converged."""
        core = self.cfg.core
        prev = dict(self.band.sersic.params)
        streak = 0
        for it in range(n_iter):
            self.sersic(fitter_for(it), prev, base_params)
            positions = positions_for() if positions_for else None
            self.cycle(it, warm=it > 0, positions=positions)
            if it == 0:
                self.refresh_noise()
            cur = dict(self.band.sersic.params)
            change = parameter_change(
                prev,
                cur,
                atol=core.mainloop_convergence_atol,
                errors=self.band.sersic.errors,
                sigma_fraction=core.mainloop_convergence_sigma,
            )
            self.record("loop", it, change)
            streak = streak + 1 if change <= 1.0 else 0
            prev = cur
            if it + 1 >= core.mainloop_min_iter and streak >= core.mainloop_convergence_patience:
                return True
        return n_iter == 0


def _scaled(result, scale: float, scale_err: float):
    """``result`` with every linear parameter (and the flux) multiplied by ``scale``.

    ``scale_err`` is the 1-sigma error of ``scale`` from a joint solve (at a fixed
    shape); the flux error and the fixed-shape flux error each become the larger of
    their scaled Sersic value and ``scale_err x flux``.
    """
    from .sersic import model_spec

    linear = set(model_spec(result.model).linear)
    params = {k: v * scale if k in linear else v for k, v in result.params.items()}
    errors = {k: v * scale if k in linear else v for k, v in result.errors.items()}
    cov = result.covariance
    if cov is not None:
        factor = np.array([scale if n in linear else 1.0 for n in result.names])
        cov = cov * np.outer(factor, factor)
    flux_err = result.flux_err * scale
    fixed = result.flux_err_fixed_shape * scale
    if math.isfinite(scale_err):
        joint = scale_err * result.flux
        flux_err = max(flux_err, joint) if math.isfinite(flux_err) else joint
        fixed = max(fixed, joint) if math.isfinite(fixed) else joint
    return attrs.evolve(
        result, params=params, errors=errors, covariance=cov, flux=result.flux * scale, flux_err=flux_err, flux_err_fixed_shape=fixed
    )


def _model_name(config) -> str:
    if config.core.fit_complex_model:
        return "disk+bulge"
    if config.core.fit_nucleus:
        return "sersic+point"
    return "sersic"


def fit_band(
    band: Band,
    config,
    stages: Stages,
    *,
    guess: Optional[Mapping[str, float]] = None,
    base: Optional[Mapping[str, Any]] = None,
    forced: bool = False,
    emit: Optional[Callable] = None,
) -> Band:
    """Fit one band in place and return it.

    Without ``base`` this is the base fit (free Sersic, starting from ``guess``).
    With ``base`` (``{"params": base Sersic parameters, "sources": (x, y) of the base
    stars}``) it is a scale fit; ``forced`` force-fits the stars at the base positions
    (shifted by this band's centre offset).
    """
    emit = emit or null_progress
    t_start = time.perf_counter()
    loop = _BandLoop(band, config, stages, emit, _model_name(config))
    core = config.core
    band.history = []
    band.kernel_history = []
    emit({"band": band.filter, "stage": "start"})
    loop.initial_sky()
    if base is None:
        loop.sersic(stages.primer_fitter, dict(guess or {}), loss=config.fitter.primer_loss)
        loop.cycle(-1, warm=False)
        loop.refresh_noise()
        loop.record("primer", None, None)
        converged = loop.loop(core.iter_basefit, lambda it: stages.first_fitter if it == 0 else stages.sersic_fitter)
        if config.fitter.use_final_polish:
            loop.sersic(stages.polish_fitter, dict(band.sersic.params))
            loop.sky()
            loop.stars(warm=True)
            loop.sky()
            loop.record("polish", None, None)
        stage_done = "basefit"
    else:
        base_params = dict(base["params"])
        bx, by = (np.asarray(v, dtype=float) for v in base["sources"])
        offset = np.zeros(2)

        def shifted():
            return (bx + offset[0], by + offset[1])

        positions_for = shifted if forced else None
        # the primer sees the stars still in the image: keep the base centre and shape
        # so that a bright star near the centre cannot pull the galaxy onto itself
        loop.sersic(stages.sersic_fitter, base_params, base_params, loss=config.fitter.primer_loss, pin_centre=True)
        if not forced and config.psf.scale_band_sources == "base" and bx.size:
            loop.seed_for = shifted
            loop.base_valid = base.get("valid")
        loop.cycle(-1, warm=False, positions=positions_for() if positions_for else None)
        # register the band on its stars (not on the galaxy centre, which is noisy in
        # faint bands); the scale fit's free shift refines the galaxy around this
        if bx.size and (loop.seed_for is not None or forced):
            measured = loop.measure_offset()
            if measured is None:
                loop.shift_max = max(config.core.scale_shift_max, UNREGISTERED_SHIFT)
                log.info("band %s: too few bright stars to register the band; galaxy centre free within %.2f px", band.filter, loop.shift_max)
            else:
                offset[:] = measured
                base_params = dict(base_params, x_0=base_params["x_0"] + offset[0], y_0=base_params["y_0"] + offset[1])
                log.info("band %s: offset from its stars (%.3f, %.3f) px relative to %s", band.filter, offset[0], offset[1], "the base band")
        loop.refresh_noise()
        loop.record("scale-primer", None, None, offset=[float(offset[0]), float(offset[1])])
        converged = loop.loop(core.iter_scalefit, lambda it: stages.sersic_fitter, base_params, positions_for)
        stage_done = "forcedfit" if forced else "scalefit"
    factor = loop.error_factor()
    band.sersic = band.sersic.with_error_factor(factor)
    if not converged:
        band.flags |= GALAXY_FLAGS.LOOP_NOT_CONVERGED
    band.status = "done"
    band.message = ""
    band.stages_done = [stage_done]
    band.history.append(
        {
            "stage": "total",
            "seconds": time.perf_counter() - t_start,
            "timings": dict(loop.timings),
            "peak_rss_mb": _peak_rss_mb(),
            "error_factor": factor,
        }
    )
    emit({"band": band.filter, "stage": "done", "chi2_dof": loop.chi2_dof(), "n_sources": len(band.sources or [])})
    return band


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (NaN where unknown)."""
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20
    except (ImportError, OSError):
        return float("nan")


def _fit_band_job(job: Dict[str, Any]) -> Band:
    """Worker entry point (top level, so it pickles)."""
    return fit_band(job["band"], job["config"], job["stages"], base=job["base"], forced=job["forced"], emit=job["emit"])


# ---------------------------------------------------------------- orchestration


def _reset(band: Band) -> None:
    band.psf = band.library_psf
    band.galaxy_model = band.star_model = band.sky_model = None
    band.sersic = band.sources = band.sky = band.kernel = None
    band.mask = None
    band.history = []
    band.kernel_history = []
    band.status = "pending"
    band.message = ""
    band.flags = 0
    band.stages_done = []


def _fail(band: Band, exc: BaseException, emit) -> None:
    band.status = "failed"
    band.message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, SphotError) else str(exc)
    band.flags |= GALAXY_FLAGS.BAND_FAILED
    log.error("band %s failed: %s", band.filter, band.message)
    emit({"band": band.filter, "stage": "failed", "message": band.message})


def _guess(galaxy: Galaxy) -> Dict[str, float]:
    g = galaxy.meta.get("guess")
    return GalaxyGuess(**g).sersic_start() if g else {}


def run(
    galaxy: Galaxy,
    config=None,
    *,
    filters: Optional[Sequence[str]] = None,
    forced: Optional[Sequence[str]] = None,
    jobs: Optional[int] = None,
    resume: bool = False,
    rerun: Optional[str] = None,
    photometry: bool = False,
    progress: Optional[Callable] = None,
    checkpoint: Optional[Callable[[Galaxy], None]] = None,
    registry=None,
    **stage_objects,
) -> Galaxy:
    """Fit every band of ``galaxy``; returns it (updated in place where possible).

    Parameters
    ----------
    galaxy : Galaxy
        From :func:`sphot_core.io.load_galaxy` (prepared here if needed) or read back
        from a NAME_sphot.h5 file (``resume``/``rerun``).
    config : SphotConfig, optional
        Default: :func:`~sphot_core.config.load_config` with no overrides.
    filters : sequence of str, optional
        Bands to (re)do among the scale-fitted ones; default all.
    forced : sequence of str, optional
        Bands whose stars are force-fitted at the base positions (default
        ``[core] forced_filters``).
    jobs : int, optional
        Processes for the scale fits (``None`` or 0 = all cores, 1 = in this process).
    resume : bool
        Skip bands already done (their stages recorded in the galaxy).
    rerun : {"basefit", "scalefit", "photometry"}, optional
        Redo that stage (and the stages that depend on it).
    photometry : bool
        Run aperture photometry at the end (rows in ``galaxy.meta["aperture"]``).
    progress : callable, optional
        Receives event dicts (see :mod:`sphot_core.progress`).
    checkpoint : callable, optional
        Called with the galaxy after the base fit and after each scale band, e.g. to
        write NAME_sphot.h5 so that a killed run can resume.
    **stage_objects
        Stage objects (or names) replacing configured ones: ``sersic_fitter``,
        ``primer_fitter``, ``first_fitter``, ``polish_fitter``,
        ``point_source_fitter``, ``forced_fitter``, ``refit``, ``sky``, ``kernel``,
        ``calibrator``.
    """
    if config is None:
        from .config import load_config

        config = load_config(galaxy_path=galaxy.source_path or None)
    if rerun not in (None, "basefit", "scalefit", "photometry"):
        raise InputError(f"--rerun must be basefit, scalefit or photometry, got {rerun!r}")
    emit = progress or null_progress
    stages = Stages.from_config(config, registry=registry, **stage_objects)
    if config.core.wavelength_shape:  # unknown wavelengths fail here, before any fitting
        for f in galaxy.bands:
            wavelength_of(f, config.wavelengths)
    t0 = time.perf_counter()
    if "guess" not in galaxy.meta:
        emit({"stage": "prep"})
        galaxy, guess = prepare(galaxy, config)
        galaxy.meta["guess"] = attrs.asdict(guess)
    base_name = galaxy.base_filter
    if base_name not in galaxy.bands:
        raise InputError(f"base filter {base_name} is not among the bands ({', '.join(galaxy.bands)})")
    others = [f for f in galaxy.bands if f != base_name]
    wanted = list(filters) if filters else others
    unknown = [f for f in wanted if f not in galaxy.bands]
    if unknown:
        raise InputError(f"--filters: {', '.join(unknown)} not among the bands ({', '.join(galaxy.bands)})")
    forced_set = set(config.core.forced_filters if forced is None else forced)
    base = galaxy.bands[base_name]

    # which bands to (re)do
    if rerun == "basefit":
        if filters:
            log.info("--rerun basefit redoes every band (they all depend on the base fit); --filters ignored")
        wanted = others
        for b in galaxy.bands.values():
            _reset(b)
    elif rerun == "scalefit":
        for f in wanted:
            if f != base_name:
                _reset(galaxy.bands[f])
    redo_base = base.status != "done" or not resume and rerun is None
    if redo_base:
        _reset(base)
        galaxy.meta.pop("base_params", None)
        galaxy.meta.pop("wavelength_shape", None)
        try:
            fit_band(base, config, stages, guess=_guess(galaxy), emit=emit)
            # the base band's own fit: what the scale fits pin to, whatever happens later
            galaxy.meta["base_params"] = dict(base.sersic.params)
        except (SphotError, ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:
            _fail(base, exc, emit)
        if checkpoint:
            checkpoint(galaxy)
    todo = [
        f
        for f in wanted
        if f != base_name
        and (redo_base or rerun == "scalefit" or galaxy.bands[f].status != "done" or not resume and rerun is None)
    ]
    if base.status != "done":
        for f in todo:
            band = galaxy.bands[f]
            band.status = "failed"
            band.message = f"base filter {base_name} failed: {base.message}"
            band.flags |= GALAXY_FLAGS.BAND_FAILED
    elif todo:
        base_info = {
            "params": dict(galaxy.meta.get("base_params") or base.sersic.params),
            "sources": (np.array(base.sources.x), np.array(base.sources.y)) if base.sources is not None else (np.zeros(0), np.zeros(0)),
            "valid": base.valid,
        }
        for f in todo:
            _reset(galaxy.bands[f])
        _scale_bands(galaxy, todo, config, stages, base_info, forced_set, jobs, emit, checkpoint)
    if config.core.wavelength_shape and base.status == "done" and (redo_base or todo or "wavelength_shape" not in galaxy.meta):
        _wavelength_shape(galaxy, config, emit)
        if checkpoint:
            checkpoint(galaxy)
    elif not config.core.wavelength_shape and todo and galaxy.meta.pop("wavelength_shape", None) is not None:
        log.warning(
            "[core] wavelength_shape is off but this galaxy had it on: the bands not refitted (%s) keep their law shapes",
            ", ".join(f for f in galaxy.bands if f not in todo) or "none",
        )
    if photometry or rerun == "photometry":
        _photometry(galaxy, config)
    galaxy.meta["seconds"] = galaxy.meta.get("seconds", 0.0) + (time.perf_counter() - t0)
    return galaxy


def _wavelength_shape(galaxy: Galaxy, config, emit) -> None:
    """``[core] wavelength_shape``: n and r_eff of every band as polynomials of
    ln(wavelength), fitted jointly (:func:`sphot_core.multiband.fit_wavelength_shape`).
    A failure is logged and recorded; the bands keep their scale-fit results."""
    emit({"stage": "wavelength"})
    try:
        law = fit_wavelength_shape(galaxy, config)
    except (SphotError, ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:
        log.warning("wavelength-dependent shape fit failed: %s; bands keep their scale-fit shapes", exc)
        galaxy.meta["wavelength_shape"] = {"error": str(exc)}
        return
    if law is not None:
        galaxy.meta["wavelength_shape"] = law


def _scale_bands(galaxy, todo, config, stages, base_info, forced_set, jobs, emit, checkpoint) -> None:
    n_workers = _band_workers(jobs, len(todo))
    jobs_list = [
        {"band": galaxy.bands[f], "config": config, "stages": stages, "base": base_info, "forced": f in forced_set, "emit": emit}
        for f in todo
    ]
    if n_workers > 1:
        try:
            pickle.dumps((config, stages))
        except Exception as exc:  # stage objects given by the caller may not pickle
            log.info("fitting the bands in this process (%s does not pickle)", exc)
            n_workers = 1
    if n_workers <= 1:
        _scale_bands_here(galaxy, jobs_list, emit, checkpoint)
        return
    from sphot_plugins.executors import ProcessExecutor, ProcessOptions

    options = config.strategy_options("executor", "processes") or ProcessOptions()

    relay = None
    if emit is not null_progress:
        from .progress import QueueRelay

        relay = QueueRelay(emit)
        for job in jobs_list:
            job["emit"] = relay.emitter()
    unstarted = []
    try:
        with ProcessExecutor(attrs.evolve(options, jobs=n_workers)) as ex:
            for outcome in ex.run(_fit_band_job, jobs_list):
                flt = outcome.job["band"].filter
                if outcome.ok:
                    galaxy.bands[flt] = outcome.result
                elif _never_started(outcome.error):
                    unstarted.append(flt)
                    continue
                else:
                    _fail(galaxy.bands[flt], _WorkerError(outcome.error), emit)
                if checkpoint:
                    checkpoint(galaxy)
    finally:
        if relay is not None:
            relay.close()
    if unstarted:
        log.warning(
            "worker processes could not start (%s); fitting those bands in this process. "
            "Scripts that call sphot with jobs > 1 need an `if __name__ == \"__main__\":` guard.",
            ", ".join(unstarted),
        )
        again = [job for job in jobs_list if job["band"].filter in unstarted]
        for job in again:
            job["emit"] = emit
        _scale_bands_here(galaxy, again, emit, checkpoint)


def _never_started(error: Optional[str]) -> bool:
    """The job never ran: it could not reach a worker, or its worker died before it started."""
    return bool(error) and ("could not be sent to a worker" in error or "before the job started" in error)


def _scale_bands_here(galaxy, jobs_list, emit, checkpoint) -> None:
    for job in jobs_list:
        try:
            _fit_band_job(job)
        except (SphotError, ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:
            _fail(job["band"], exc, emit)
        if checkpoint:
            checkpoint(galaxy)


class _WorkerError(SphotError):
    pass


def _band_workers(jobs: Optional[int], n: int) -> int:
    from sphot_plugins.executors import usable_cpus

    return max(1, min(int(jobs) if jobs else usable_cpus(), n))


def _photometry(galaxy: Galaxy, config) -> None:
    """Aperture photometry; a failure is logged and recorded, never fatal for the fits."""
    from .aperture import run_aperture_photometry

    try:
        galaxy.meta["aperture"] = run_aperture_photometry(galaxy, config.aperture)
        galaxy.meta.pop("aperture_error", None)
    except (SphotError, ValueError, ArithmeticError) as exc:
        galaxy.meta.pop("aperture", None)
        galaxy.meta["aperture_error"] = str(exc)
        log.error("%s: aperture photometry failed: %s", galaxy.name, exc)


# ------------------------------------------------------------------- one file


def state_path(path, out_dir) -> Optional[Path]:
    """The NAME_sphot.h5 to continue from: ``path`` itself if it is one, else the
    earlier output in ``out_dir`` (``None`` if there is none)."""
    from .io import output_paths

    path = Path(path)
    if is_sphot_file(path):
        return path
    state = output_paths(out_dir, path.stem)["sphot"]
    return state if state.exists() else None


def stored_config(state) -> str:
    """The configuration TOML stored in a NAME_sphot.h5 (without reading the images)."""
    import h5py

    with h5py.File(state, "r") as f:
        return str(f.attrs.get("config", ""))


def is_sphot_file(path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == "sphot"
    except (OSError, ValueError):
        return False


def run_file(
    path,
    out_dir=None,
    *,
    psf=None,
    config=None,
    filters: Optional[Sequence[str]] = None,
    base_filter: Optional[str] = None,
    forced: Optional[Sequence[str]] = None,
    photometry: bool = False,
    plot: bool = False,
    resume: bool = False,
    rerun: Optional[str] = None,
    jobs: Optional[int] = None,
    progress: Optional[Callable] = None,
    **stage_objects,
) -> Dict[str, Any]:
    """Load (or resume), fit and write the outputs of one galaxy file.

    ``path`` is a galaxy file, or a NAME_sphot.h5 written earlier (then ``rerun`` or
    ``resume`` continue from it). Outputs go to ``out_dir`` (default: the folder of a
    NAME_sphot.h5 input, else the working directory); NAME_sphot.h5 is rewritten
    atomically after the base fit and after every band, so a killed run loses at most
    the bands in flight and ``resume=True`` finishes it.

    Returns a summary dict (galaxy, status, bands ok/failed, seconds, outputs).
    """
    from . import io as sio
    from .config import SphotConfig, load_config

    t0 = time.perf_counter()
    path = Path(path)
    if not path.exists():
        raise InputError(f"galaxy file not found: {path}", path=str(path))
    from_state = is_sphot_file(path)
    if out_dir is None:
        out_dir = path.parent if from_state else Path(".")
    out_dir = sio.ensure_output_dir(out_dir)
    if from_state and rerun is None:
        resume = True
    state = state_path(path, out_dir) if (resume or rerun) else None
    if rerun and state is None:
        raise InputError(f"--rerun {rerun}: no earlier output {sio.output_paths(out_dir, path.stem)['sphot']} to rerun from", path=str(path))
    galaxy = None
    if state is not None:
        galaxy, stored = sio.read_sphot(state)
        if config is None:
            config = SphotConfig.from_toml_text(stored, label=f"stored config of {state.name}")
        elif stored and SphotConfig.from_toml_text(stored).tree != config.tree:
            log.warning("%s: continuing with a configuration that differs from the one stored in %s", galaxy.name, state.name)
    if config is None:
        config = load_config(galaxy_path=path)
    if base_filter:
        config = config.with_overrides({"core.base_filter": base_filter}, label="--base-filter")
    if galaxy is None:
        load = list(filters) if filters else None
        if load and config.core.base_filter not in load:
            load.insert(0, config.core.base_filter)
        galaxy = sio.load_galaxy(path, psf, config=config, filters=load)
    elif base_filter and galaxy.base_filter != base_filter:
        raise InputError(f"--base-filter {base_filter} differs from the base filter {galaxy.base_filter} of {path}; use --rerun basefit on the galaxy file instead")
    config_text = config.to_toml()
    paths = sio.output_paths(out_dir, galaxy.name)

    def checkpoint(g: Galaxy) -> None:
        sio.write_sphot(g, paths["sphot"], config_text)

    redo = list(filters) if filters and (resume or rerun) else None
    galaxy = run(
        galaxy,
        config,
        filters=redo,
        forced=forced,
        jobs=jobs,
        resume=resume,
        rerun=rerun,
        photometry=photometry,
        progress=progress,
        checkpoint=checkpoint,
        **stage_objects,
    )
    written = sio.write_outputs(galaxy, out_dir, config_text)
    if "aperture" in galaxy.meta:
        from .aperture import APERTURE_COLUMNS

        written["aperture"] = sio.write_csv(paths["aperture"], APERTURE_COLUMNS, galaxy.meta["aperture"])
    if plot:
        from .plotting import plot_galaxy

        plot_galaxy(galaxy, paths["plot"])
        written["plot"] = paths["plot"]
    failed = [f for f, b in galaxy.bands.items() if b.status != "done"]
    base = galaxy.bands[galaxy.base_filter]
    summary = {
        "galaxy": galaxy.name,
        "status": "failed" if base.status != "done" else ("partial" if failed else "ok"),
        "message": base.message if base.status != "done" else "",
        "bands_ok": sum(b.status == "done" for b in galaxy.bands.values()),
        "bands_failed": ",".join(failed),
        "seconds": round(time.perf_counter() - t0, 3),
        "outputs": {k: str(v) for k, v in written.items()},
    }
    return summary


