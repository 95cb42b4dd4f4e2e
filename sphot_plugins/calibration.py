"""Kernel calibrators: fit ``K`` so that ``library_psf (*) K`` reproduces bright stars.

Both calibrators share one pipeline (the method is described in
``docs/calibration.rst``):

1. **Noise**: the given per-pixel sigma, else :func:`sphot_core.stats.noise_map` (the
   background noise measured in boxes of ``noise_box`` pixels and interpolated).
2. **Detection**: peaks of the image correlated with the PSF in use (the previous
   calibrated PSF, else the library) above ``detect_threshold`` in matched-filter S/N,
   outside ``exclude``.
3. **Anchor photometry, positions free**: every detection that is an anchor
   candidate or puts light on a candidate's stamp is fitted for flux, position
   (within ``calib_xy_bounds`` of its peak) and a local pedestal on its stamp, with
   the current models of the other sources subtracted (Jacobi iterations of
   linearised PSF fits); then faint neighbours hidden in the wings of bright stars
   are detected on the residual and everything is refitted. Nothing comes from a
   pinned table.
4. **Anchors**: the ``kernel_anchor_K`` brightest candidates with S/N >=
   ``anchor_min_snr``, stamp inside the image, no NaN/masked pixel within
   ``nodata_radius_in_fwhm`` FWHM, no other source within ``isolation_radius_in_fwhm``
   FWHM and no brighter source on the stamp. Each anchor's stamp gets a column for
   every source within ``kernel_fit_neighbor_pad_pix`` of the stamp's edge or whose
   wing adds more than ``neighbor_wing_snr`` sigma to it (the
   ``kernel_fit_max_neighbors`` brightest).
5. **Objective** for a kernel ``K``: ``library (*) K`` (the library cropped to the
   region the stamps need) is evaluated on every stamp; per stamp the anchor and
   neighbour fluxes are solved *non-negatively*, with a free pedestal and free
   first-order shifts of the anchor; the loss is the weighted residual sum of
   squares (chi-square) per stamp pixel.
6. **Passes**: a second pass redoes steps 2-5 starting from the sources of the first,
   with the PSF the first pass calibrated; then anchors whose residual is not
   explained by noise plus the typical mismatch (``anchor_clip``) are dropped and the
   kernel is refitted.

``multi_source`` minimises that loss over the kernel parameters directly.
``single_source`` fits every anchor on its own (same objective, one stamp) and combines
the per-anchor parameters by their median weighted by the anchor's squared S/N (the
Fisher information on a shape parameter of a bright star scales as S/N^2); a weighted
median resists blends and galaxies that slipped through the anchor cuts.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import attrs
import numpy as np
from scipy import ndimage, optimize, signal

from sphot_core.errors import InputError
from sphot_core.hookspecs import StrategySpec
from sphot_core.psf import PSFModel, add_stamps
from sphot_core.stages import KernelCalibrator, KernelFamily, KernelFit
from sphot_core.stats import noise_map, robust_sigma

__all__ = ["CalibrationOptions", "Anchors", "find_anchors", "MultiSourceCalibrator", "SingleSourceCalibrator", "SPECS"]

log = logging.getLogger(__name__)

_ge0 = attrs.validators.ge(0.0)
_gt0 = attrs.validators.gt(0.0)
_ge1 = attrs.validators.ge(1)

#: step (pixels) of the finite differences of the PSF with respect to position
_DXY = 0.05
#: largest position change (pixels) of one linearised photometry step
_MAX_STEP = 0.5
#: the photometry stops when no position moves more than this (pixels); the kernel
#: objective solves the anchor positions again (to first order) for every trial kernel
_PHOT_TOL = 0.01


@attrs.frozen
class CalibrationOptions:
    """Options of ``[psf-calib.multi_source]`` and ``[psf-calib.single_source]``.

    The first six keep the names of the original tool's ``[psf-calib]`` keys.

    Attributes
    ----------
    kernel_anchor_K : int
        Number of anchors (the brightest that pass the cuts).
    kernel_fit_stamp_half_min : int
        Minimum stamp half-size (pixels).
    kernel_fit_stamp_half_in_sigmaeff : float
        Stamp half-size in units of the Gaussian-equivalent sigma of the PSF in use.
    kernel_fit_max_neighbors : int
        Maximum number of neighbour columns per stamp (the brightest are kept).
    kernel_fit_neighbor_pad_pix : float
        Sources within this distance (pixels) of a stamp's edge are columns of it.
    calib_xy_bounds : float
        Largest distance (pixels, per axis) between a fitted position and its peak.
    detect_threshold : float
        Detection threshold in matched-filter signal-to-noise.
    anchor_min_snr : float
        Minimum flux signal-to-noise of an anchor.
    isolation_radius_in_fwhm : float
        An anchor has no other source closer than this many FWHM.
    isolation_flux_ratio : float
        An anchor has no source brighter than this times its flux within
        ``kernel_fit_neighbor_pad_pix`` of its stamp.
    nodata_radius_in_fwhm : float
        An anchor has no NaN or masked pixel within this many FWHM.
    neighbor_wing_snr : float
        A source farther than ``kernel_fit_neighbor_pad_pix`` from a stamp is still a
        column of it when its PSF wing adds more than this many noise sigma to the
        nearest stamp pixel.
    photometry_iterations : int
        Maximum Jacobi iterations of the anchor photometry (it stops earlier when no
        position moves by more than 0.01 pixel).
    position_min_snr : float
        Detections with a lower matched-filter S/N keep their peak position in the
        anchor photometry (only flux and pedestal are fitted).
    detection_rounds : int
        Detection rounds of the anchor photometry: each round after the first detects
        on the residual of the previous one and refits all sources.
    passes : int
        Calibration passes: each pass after the first refines the anchor photometry
        with the PSF calibrated by the previous pass (so positions, fluxes and
        neighbour lists no longer depend on the PSF in use) and refits the kernel.
    noise_box : int
        Box size (pixels) of :func:`sphot_core.stats.noise_map`, the noise estimate
        used when no noise map is given.
    anchor_clip : float
        After the fit of the last pass, anchors whose stamp chi-square exceeds what
        noise plus the typical PSF mismatch explains by this many standard deviations
        are dropped and the kernel refitted; 0 disables.
    min_anchors : int
        Fewer usable anchors than this: the calibration fails (previous PSF kept).
    xtol : float
        Convergence tolerance of the parameter search, as a fraction of each
        parameter's range.
    max_evaluations : int
        Cap on the objective evaluations of one search.
    """

    kernel_anchor_K: int = attrs.field(default=30, validator=_ge1)
    kernel_fit_stamp_half_min: int = attrs.field(default=8, validator=_ge1)
    kernel_fit_stamp_half_in_sigmaeff: float = attrs.field(default=3.0, validator=_gt0)
    kernel_fit_max_neighbors: int = attrs.field(default=15, validator=attrs.validators.ge(0))
    kernel_fit_neighbor_pad_pix: float = attrs.field(default=4.0, validator=_ge0)
    calib_xy_bounds: float = attrs.field(default=3.0, validator=_gt0)
    detect_threshold: float = attrs.field(default=5.0, validator=_gt0)
    anchor_min_snr: float = attrs.field(default=20.0, validator=_ge0)
    isolation_radius_in_fwhm: float = attrs.field(default=1.5, validator=_ge0)
    isolation_flux_ratio: float = attrs.field(default=1.0, validator=_gt0)
    nodata_radius_in_fwhm: float = attrs.field(default=2.0, validator=_ge0)
    neighbor_wing_snr: float = attrs.field(default=0.5, validator=_gt0)
    photometry_iterations: int = attrs.field(default=8, validator=_ge1)
    position_min_snr: float = attrs.field(default=10.0, validator=_ge0)
    detection_rounds: int = attrs.field(default=2, validator=_ge1)
    passes: int = attrs.field(default=2, validator=_ge1)
    noise_box: int = attrs.field(default=32, validator=attrs.validators.ge(8))
    anchor_clip: float = attrs.field(default=5.0, validator=_ge0)
    min_anchors: int = attrs.field(default=3, validator=_ge1)
    xtol: float = attrs.field(default=1e-3, validator=_gt0)
    max_evaluations: int = attrs.field(default=300, validator=_ge1)


# --------------------------------------------------------------------- utilities


def _psf_on_grid(psf: PSFModel, x, y, cx, cy, half: int) -> np.ndarray:
    """Unit-flux PSFs of sources at ``(x, y)`` on stamps centred on pixels ``(cx, cy)``.

    Returns an array ``(N, 2 half + 1, 2 half + 1)``; element ``[n, j, i]`` is the PSF of
    source ``n`` at image pixel ``(cy[n] - half + j, cx[n] - half + i)``. Sources are
    grouped by how far their own pixel is from the stamp centre, and
    :meth:`PSFModel.stamps` is called once per group (largest first, so the spline
    coefficients are computed once).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    cx = np.asarray(cx, dtype=int)
    cy = np.asarray(cy, dtype=int)
    n = 2 * half + 1
    out = np.empty((x.size, n, n))
    if x.size == 0:
        return out
    sx = np.floor(x + 0.5).astype(int)
    sy = np.floor(y + 0.5).astype(int)
    reach = np.maximum(np.abs(cx - sx), np.abs(cy - sy))
    r = np.arange(n)
    for m in np.unique(reach)[::-1]:
        sel = np.flatnonzero(reach == m)
        big = half + int(m)
        vals, _, _ = psf.stamps(x[sel], y[sel], big)
        oy = cy[sel] - half - (sy[sel] - big)
        ox = cx[sel] - half - (sx[sel] - big)
        rows = (oy[:, None] + r)[:, :, None]
        cols = (ox[:, None] + r)[:, None, :]
        out[sel] = vals[np.arange(sel.size)[:, None, None], rows, cols]
    return out


def _cutouts(padded: np.ndarray, pad: int, cx, cy, half: int) -> np.ndarray:
    """Stamps of half-size ``half`` centred on pixels ``(cx, cy)`` of an image padded by ``pad``."""
    r = np.arange(-half, half + 1)
    rows = (np.asarray(cy) + pad)[:, None] + r
    cols = (np.asarray(cx) + pad)[:, None] + r
    return padded[rows[:, :, None], cols[:, None, :]]


def _crop(psf: PSFModel, half: int) -> PSFModel:
    """The central ``2 half + 1`` elements of ``psf`` around its origin (zero-padded)."""
    oy, ox = psf.origin
    ny, nx = psf.array.shape
    out = np.zeros((2 * half + 1, 2 * half + 1))
    y0, y1 = max(0, oy - half), min(ny, oy + half + 1)
    x0, x1 = max(0, ox - half), min(nx, ox + half + 1)
    out[y0 - oy + half : y1 - oy + half, x0 - ox + half : x1 - ox + half] = psf.array[y0:y1, x0:x1]
    return PSFModel.from_array(out, psf.oversample, origin=(half, half), filter=psf.filter, source="cropped")


def _noise_map(image: np.ndarray, noise: Optional[np.ndarray], valid: np.ndarray, box: int):
    """Per-pixel sigma (inf where unusable) and its median level.

    Without a given ``noise``: :func:`sphot_core.stats.noise_map` of the usable pixels
    in boxes of ``box`` pixels (the map the engine itself passes).
    """
    sigma = noise_map(image, ~valid, box_size=box) if noise is None else np.asarray(noise, dtype=float)
    ok = valid & np.isfinite(sigma) & (sigma > 0)
    level = float(np.median(sigma[ok])) if ok.any() else float("nan")
    return np.where(ok, sigma, np.inf), level


# ---------------------------------------------------------------------- anchors


@attrs.frozen(eq=False)
class Anchors:
    """Sources measured by the calibrator's own photometry and the anchors among them.

    Attributes
    ----------
    x, y, flux, flux_err : ndarray
        Every fitted source (positions free within ``calib_xy_bounds`` of its peak).
    peak_x, peak_y : ndarray
        The detected peaks.
    free : ndarray of bool
        Sources whose position was fitted (S/N >= ``position_min_snr``).
    candidate : ndarray of bool
        Sources bright enough to be considered as anchors.
    anchor : ndarray of int
        Indices of the anchors, brightest first.
    neighbours : list of ndarray
        For each anchor, the indices of its neighbour columns.
    half : int
        Stamp half-size (pixels).
    counts : dict
        How many detections each cut removed (for the log and ``KernelFit.stats``).
    """

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    peak_x: np.ndarray
    peak_y: np.ndarray
    free: np.ndarray
    candidate: np.ndarray
    anchor: np.ndarray
    neighbours: List[np.ndarray]
    half: int
    counts: Dict[str, int]

    @property
    def snr(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.flux / self.flux_err


def _detect(image, weight, psf: PSFModel, threshold: float, exclude):
    """Peaks of the matched-filtered image: sub-pixel ``x, y``, flux estimate, S/N."""
    half = max(2, int(math.ceil(1.5 * psf.fwhm)))
    k = psf.grid_kernel
    c = k.shape[0] // 2
    half = min(half, c)
    k = k[c - half : c + half + 1, c - half : c + half + 1]
    k = k / k.sum()
    filled = np.where(weight > 0, image, 0.0)
    filt = signal.fftconvolve(filled * weight, k[::-1, ::-1], mode="same")
    info = signal.fftconvolve(weight, (k * k)[::-1, ::-1], mode="same")
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(info > 0, filt / np.sqrt(info), 0.0)
    size = max(3, 2 * int(round(0.5 * psf.fwhm)) + 1)
    peaks = (snr == ndimage.maximum_filter(snr, size=size)) & (snr > threshold) & (weight > 0)
    if exclude is not None:
        peaks &= ~exclude
    peaks[0, :] = peaks[-1, :] = peaks[:, 0] = peaks[:, -1] = False
    iy, ix = np.nonzero(peaks)
    # sub-pixel position: vertex of the parabola through the 3 samples along each axis
    f0 = filt[iy, ix]
    dx = _vertex(filt[iy, ix - 1], f0, filt[iy, ix + 1])
    dy = _vertex(filt[iy - 1, ix], f0, filt[iy + 1, ix])
    with np.errstate(divide="ignore", invalid="ignore"):
        flux = np.where(info[iy, ix] > 0, f0 / info[iy, ix], 0.0)
    order = np.argsort(-snr[iy, ix])
    return ix[order] + dx[order], iy[order] + dy[order], flux[order], snr[iy, ix][order]


def _vertex(a, b, c):
    den = a - 2.0 * b + c
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(den < 0, 0.5 * (a - c) / den, 0.0)
    return np.clip(d, -0.5, 0.5)


def _photometry(image, weight, psf: PSFModel, x, y, flux, x0, y0, free, *, half: int, bound: float, iterations: int):
    """Jacobi PSF photometry: flux, position and pedestal of every source on its stamp.

    Each iteration subtracts the current models of all *other* sources from a source's
    stamp and takes one Gauss-Newton step of ``flux * PSF(x, y) + pedestal`` from
    ``(x, y, flux)``. Positions of the sources marked ``free`` move at most
    ``_MAX_STEP`` per step and stay within ``bound`` of the detected peaks ``(x0, y0)``;
    the others keep their positions (faint detections, whose positions are noise).
    Stops when no free position moves by more than ``_PHOT_TOL``.
    """
    x = np.array(x, dtype=float)
    y = np.array(y, dtype=float)
    flux = np.clip(np.array(flux, dtype=float), 0.0, None)
    pad = half + int(math.ceil(bound)) + 2
    dpad = np.pad(np.where(weight > 0, image, 0.0), pad)
    wpad = np.pad(weight, pad)
    var = np.full(x.size, np.inf)
    for _ in range(iterations):
        cx = np.floor(x + 0.5).astype(int)
        cy = np.floor(y + 0.5).astype(int)
        fi = np.flatnonzero(free)
        grid = np.concatenate([x, x[fi] + _DXY, x[fi]]), np.concatenate([y, y[fi], y[fi] + _DXY])
        centres = np.concatenate([cx, cx[fi], cx[fi]]), np.concatenate([cy, cy[fi], cy[fi]])
        stack = _psf_on_grid(psf, grid[0], grid[1], centres[0], centres[1], half)
        p = stack[: x.size]
        px = np.zeros_like(p)
        py = np.zeros_like(p)
        px[fi] = (stack[x.size : x.size + fi.size] - p[fi]) / _DXY
        py[fi] = (stack[x.size + fi.size :] - p[fi]) / _DXY
        model = np.zeros(dpad.shape)
        add_stamps(model, p * flux[:, None, None], cx + pad, cy + pad)
        w = _cutouts(wpad, pad, cx, cy, half)
        target = _cutouts(dpad, pad, cx, cy, half) - _cutouts(model, pad, cx, cy, half) + flux[:, None, None] * p
        basis = np.stack([p, px, py, np.ones_like(p)], axis=1).reshape(x.size, 4, -1)
        wb = basis * w.reshape(x.size, 1, -1)
        normal = wb @ basis.transpose(0, 2, 1)
        rhs = wb @ target.reshape(x.size, -1, 1)
        fixed = ~free
        normal[fixed, 1, 1] = normal[fixed, 2, 2] = 1.0  # decoupled: zero position step
        sol, cov = _solve_batch(normal, rhs[..., 0])
        new_flux = np.clip(sol[:, 0], 0.0, None)
        with np.errstate(divide="ignore", invalid="ignore"):
            sx = np.where(free & (new_flux > 0), sol[:, 1] / new_flux, 0.0)
            sy = np.where(free & (new_flux > 0), sol[:, 2] / new_flux, 0.0)
        x_new = np.clip(x + np.clip(np.nan_to_num(sx), -_MAX_STEP, _MAX_STEP), x0 - bound, x0 + bound)
        y_new = np.clip(y + np.clip(np.nan_to_num(sy), -_MAX_STEP, _MAX_STEP), y0 - bound, y0 + bound)
        moved = max(np.abs(x_new - x).max(initial=0.0), np.abs(y_new - y).max(initial=0.0))
        x, y, flux, var = x_new, y_new, new_flux, cov[:, 0, 0]
        if moved < _PHOT_TOL:
            break
    at_bound = (np.abs(x - x0) >= bound - 1e-9) | (np.abs(y - y0) >= bound - 1e-9)
    return x, y, flux, np.sqrt(np.where(var > 0, var, np.inf)), at_bound


def _solve_batch(normal: np.ndarray, rhs: np.ndarray):
    """Solve stacked small normal equations; singular systems give zeros and inf variance."""
    det_ok = np.abs(np.linalg.det(normal)) > 0
    sol = np.zeros(rhs.shape)
    cov = np.full(normal.shape, np.inf)
    if det_ok.any():
        inv = np.linalg.inv(normal[det_ok])
        cov[det_ok] = inv
        sol[det_ok] = (inv @ rhs[det_ok][..., None])[..., 0]
    return sol, cov


def find_anchors(
    image: np.ndarray,
    weight: np.ndarray,
    psf: PSFModel,
    options: CalibrationOptions,
    *,
    exclude: Optional[np.ndarray] = None,
    start: Optional[Anchors] = None,
) -> Anchors:
    """Detect, measure (positions free) and select the calibration anchors.

    Parameters
    ----------
    image : ndarray
        Galaxy and sky removed, stars present (NaN allowed where ``weight`` is 0).
    weight : ndarray
        Inverse variance per pixel, 0 for unusable pixels.
    psf : PSFModel
        The PSF in use (detection filter and photometry model).
    options : CalibrationOptions
    exclude : ndarray of bool, optional
        Pixels where no source may be placed.
    start : Anchors, optional
        Sources of a previous pass: their fit is refined with ``psf`` instead of
        detecting from scratch (the residual detection rounds still run).
    """
    o = options
    half = max(o.kernel_fit_stamp_half_min, int(math.ceil(o.kernel_fit_stamp_half_in_sigmaeff * psf.sigma)))
    wing = _WingCriterion(psf, weight, half, o)
    if start is None:
        found = _initial_pool(image, weight, psf, o, half, wing, exclude)
        if found is None:
            empty = np.zeros(0)
            flags = empty.astype(bool)
            return Anchors(*(empty,) * 6, flags, flags, empty.astype(int), [], half, {"detected": 0})
        x0, y0, f, free, is_cand, counts = found
        px, py = x0, y0
    else:
        x0, y0, f, free, is_cand = start.peak_x, start.peak_y, start.flux, start.free, start.candidate
        px, py, counts = start.x, start.y, {"detected": start.counts["detected"]}
    for k in range(o.detection_rounds):
        px, py, f, pe, at_bound = _photometry(
            image, weight, psf, px, py, f, x0, y0, free,
            half=half, bound=o.calib_xy_bounds, iterations=o.photometry_iterations,
        )
        if k == o.detection_rounds - 1:
            break
        new = _detect_in_residual(image, weight, psf, (px, py, f), (x0[is_cand], y0[is_cand]), wing, o, exclude)
        if new[0].size == 0:
            break
        x0, y0 = np.concatenate([x0, new[0]]), np.concatenate([y0, new[1]])
        px, py, f = np.concatenate([px, new[0]]), np.concatenate([py, new[1]]), np.concatenate([f, new[2]])
        free = np.concatenate([free, new[3] >= o.position_min_snr])
        is_cand = np.concatenate([is_cand, np.zeros(new[0].size, bool)])
    counts["photometry"] = int(px.size)
    keep, neighbours = _select(image.shape, weight, px, py, f, pe, at_bound, is_cand, psf.fwhm, wing, o, counts)
    return Anchors(px, py, f, pe, x0, y0, free, is_cand, keep, neighbours, half, counts)


def _initial_pool(image, weight, psf, o, half, wing, exclude):
    """Detections that are anchor candidates or light a candidate's stamp (or None)."""
    x, y, f0, snr0 = _detect(image, weight, psf, o.detect_threshold, exclude)
    ny, nx = image.shape
    inside = (x >= half) & (x <= nx - 1 - half) & (y >= half) & (y <= ny - 1 - half)
    # candidates: a generous superset of the final anchors (detection S/N is a lower bound)
    cand = np.flatnonzero(inside & (snr0 >= 0.5 * o.anchor_min_snr))[: 3 * o.kernel_anchor_K]
    if cand.size == 0:
        return None
    is_cand = np.isin(np.arange(x.size), cand)
    pool = np.flatnonzero(wing.matrix(x, y, f0, x[cand], y[cand]).any(axis=0) | is_cand)
    return x[pool], y[pool], f0[pool], snr0[pool] >= o.position_min_snr, is_cand[pool], {"detected": int(x.size)}


def _detect_in_residual(image, weight, psf, sources, stamps, wing, o, exclude):
    """Detections on ``image - model(sources)`` that light a candidate stamp and are not
    within ``isolation_radius_in_fwhm`` FWHM of a known source (faint neighbours hidden
    in the wings of bright stars)."""
    x, y, f = sources
    resid = image - psf.render(image.shape, x, y, f, half=wing.half + int(math.ceil(wing.pad)))
    found = _detect(resid, weight, psf, o.detect_threshold, exclude)
    if found[0].size == 0:
        return found
    d = np.hypot(found[0][:, None] - x[None, :], found[1][:, None] - y[None, :]).min(axis=1)
    lights = wing.matrix(found[0], found[1], found[2], *stamps).any(axis=0)
    keep = (d >= o.isolation_radius_in_fwhm * psf.fwhm) & lights
    return tuple(a[keep] for a in found)


class _WingCriterion:
    """Which sources put light on a stamp: those within ``kernel_fit_neighbor_pad_pix``
    of the stamp box, and brighter ones whose PSF wing adds more than
    ``neighbor_wing_snr`` noise sigma to the nearest stamp pixel."""

    def __init__(self, psf: PSFModel, weight: np.ndarray, half: int, options: CalibrationOptions):
        gk = psf.grid_kernel
        c = gk.shape[0] // 2
        yy, xx = np.indices(gk.shape)
        r = np.floor(np.hypot(yy - c, xx - c)).astype(int).ravel()
        prof = np.zeros(r.max() + 2)
        np.maximum.at(prof, r, gk.ravel())
        #: largest unit-flux PSF value at or beyond each integer radius (image pixels)
        self.profile = np.maximum.accumulate(prof[::-1])[::-1]
        self.weight = weight
        self.half = half
        self.pad = options.kernel_fit_neighbor_pad_pix
        self.level = options.neighbor_wing_snr

    def box_distance(self, x, y, ax, ay) -> np.ndarray:
        """Distance (stamps x sources) from each source to each stamp centred on ``(ax, ay)``."""
        cx = np.floor(np.asarray(ax) + 0.5)[:, None]
        cy = np.floor(np.asarray(ay) + 0.5)[:, None]
        bx = np.clip(np.abs(np.asarray(x)[None, :] - cx) - self.half, 0.0, None)
        by = np.clip(np.abs(np.asarray(y)[None, :] - cy) - self.half, 0.0, None)
        return np.hypot(bx, by)

    def matrix(self, x, y, flux, ax, ay) -> np.ndarray:
        """Boolean (stamps x sources): the source contributes to the stamp."""
        dist = self.box_distance(x, y, ax, ay)
        ny, nx = self.weight.shape
        iy = np.clip(np.floor(np.asarray(ay) + 0.5).astype(int), 0, ny - 1)
        ix = np.clip(np.floor(np.asarray(ax) + 0.5).astype(int), 0, nx - 1)
        w = self.weight[iy, ix]
        sigma = np.where(w > 0, 1.0 / np.sqrt(np.where(w > 0, w, 1.0)), np.inf)[:, None]
        idx = np.minimum(dist.astype(int), self.profile.size - 1)
        return (dist <= self.pad) | (np.asarray(flux)[None, :] * self.profile[idx] > self.level * sigma)


def _select(shape, weight, x, y, flux, flux_err, at_bound, is_cand, fwhm, wing: _WingCriterion, o, counts):
    """Apply the anchor cuts; return anchor indices (brightest first) and neighbour lists."""
    ny, nx = shape
    half = wing.half
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(flux_err > 0, flux / flux_err, 0.0)
    inside = (x >= half) & (x <= nx - 1 - half) & (y >= half) & (y <= ny - 1 - half)
    ok = is_cand & inside & (flux > 0)
    cuts = {}
    cuts["low_snr"] = snr < o.anchor_min_snr
    cuts["position_at_bound"] = at_bound
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
    np.fill_diagonal(d, np.inf)
    cuts["blended"] = (d < o.isolation_radius_in_fwhm * fwhm).any(axis=1)
    on_stamp = wing.box_distance(x, y, x, y) <= wing.pad
    np.fill_diagonal(on_stamp, False)
    cuts["brighter_neighbour"] = (on_stamp & (flux[None, :] > o.isolation_flux_ratio * flux[:, None])).any(axis=1)
    r_nd = o.nodata_radius_in_fwhm * fwhm
    bad = ndimage.binary_dilation(weight <= 0, structure=_disk(r_nd)) if r_nd >= 1 else weight <= 0
    iy = np.floor(y + 0.5).astype(int).clip(0, ny - 1)
    ix = np.floor(x + 0.5).astype(int).clip(0, nx - 1)
    cuts["near_nodata"] = bad[iy, ix]
    for name, cut in cuts.items():
        counts[name] = int((ok & cut).sum())
        ok &= ~cut
    idx = np.flatnonzero(ok)
    idx = idx[np.argsort(-flux[idx])][: o.kernel_anchor_K]
    counts["anchors"] = int(idx.size)
    contributes = wing.matrix(x, y, flux, x[idx], y[idx]) & (flux > 0)[None, :]
    neighbours = []
    for row, a in zip(contributes, idx):
        row[a] = False
        nb = np.flatnonzero(row)
        neighbours.append(nb[np.argsort(-flux[nb])][: o.kernel_fit_max_neighbors])
    return idx, neighbours


def _disk(radius: float) -> np.ndarray:
    r = int(math.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx * xx + yy * yy <= radius * radius


# -------------------------------------------------------------------- objective


class _StampObjective:
    """The calibration loss of a PSF on the anchor stamps (fluxes solved non-negatively).

    Holds the data and weight stamps of the anchors and, for every (anchor, source)
    column, where that source lies relative to the stamp. ``evaluate(psf)`` solves each
    stamp for non-negative fluxes plus a free pedestal and returns the per-stamp
    weighted residual sums.
    """

    def __init__(self, image, weight, anchors: Anchors, which: Optional[Sequence[int]] = None):
        which = range(anchors.anchor.size) if which is None else which
        h = anchors.half
        self.half = h
        ids = [int(anchors.anchor[i]) for i in which]
        self.cx = np.floor(anchors.x[ids] + 0.5).astype(int)
        self.cy = np.floor(anchors.y[ids] + 0.5).astype(int)
        pad = h + 1
        self.data = _cutouts(np.pad(np.where(weight > 0, image, 0.0), pad), pad, self.cx, self.cy, h)
        self.weight = _cutouts(np.pad(weight, pad), pad, self.cx, self.cy, h)
        cols = [np.concatenate([[a], anchors.neighbours[i][anchors.neighbours[i] != a]]) for i, a in zip(which, ids)]
        self.ncols = np.array([c.size for c in cols])
        src = np.concatenate(cols)
        owner = np.repeat(np.arange(len(ids)), self.ncols)
        self.src_x = anchors.x[src]
        self.src_y = anchors.y[src]
        self.anchor_x = anchors.x[ids]
        self.anchor_y = anchors.y[ids]
        self.col_cx = self.cx[owner]
        self.col_cy = self.cy[owner]
        sx = np.floor(self.src_x + 0.5).astype(int)
        sy = np.floor(self.src_y + 0.5).astype(int)
        far = np.maximum(np.abs(self.col_cx - sx), np.abs(self.col_cy - sy)).max() if src.size else 0
        #: half-size (image pixels) of the PSF region the stamps use
        self.reach = h + int(far) + 1
        self.npix_per_stamp = (self.weight > 0).sum(axis=(1, 2))
        self.npix = int(self.npix_per_stamp.sum())

    @property
    def n(self) -> int:
        return self.cx.size

    def crop_half(self, oversample: int, kernel_half: int) -> int:
        """Elements of the library needed around its origin for a kernel of ``kernel_half``."""
        return (self.reach + 1) * oversample + kernel_half + 4

    def evaluate(self, psf: PSFModel):
        """Per-stamp weighted residual sums, anchor signals and residual stamps.

        The *signal* of a stamp is the weighted sum of squares of the anchor's fitted
        model (its squared S/N).

        Besides the non-negative source columns, each stamp has the derivatives of the
        anchor's PSF with respect to x and y as free-sign columns: the anchor position
        stays free (to first order) for every trial kernel, so position errors of the
        photometry made with the previous PSF cannot pass for a wider kernel.
        """
        h = self.half
        cols = _psf_on_grid(psf, self.src_x, self.src_y, self.col_cx, self.col_cy, h)
        shifted = _psf_on_grid(
            psf,
            np.concatenate([self.anchor_x + _DXY, self.anchor_x]),
            np.concatenate([self.anchor_y, self.anchor_y + _DXY]),
            np.tile(self.cx, 2),
            np.tile(self.cy, 2),
            h,
        )
        first = np.concatenate([[0], np.cumsum(self.ncols)[:-1]])
        dx, dy = np.split((shifted - np.tile(cols[first], (2, 1, 1))) / _DXY, 2)
        chi2 = np.zeros(self.n)
        signal = np.zeros(self.n)
        resid = np.zeros_like(self.data)
        for a in range(self.n):
            start, stop = first[a], first[a] + self.ncols[a]
            design = np.concatenate([cols[start:stop], dx[a : a + 1], -dx[a : a + 1], dy[a : a + 1], -dy[a : a + 1]])
            f, _, r = _solve_stamp(self.data[a], self.weight[a], design)
            signal[a] = float((self.weight[a] * (f[0] * cols[start]) ** 2).sum())
            resid[a] = r
            chi2[a] = float((self.weight[a] * r * r).sum())
        return chi2, signal, resid

    def outliers(self, chi2: np.ndarray, signal: np.ndarray, resid: np.ndarray, clip: float) -> np.ndarray:
        """Stamps whose residual is not explained by noise plus the typical mismatch.

        The noise of each stamp is re-measured as the robust (MAD) sigma of its own
        residual, so a noise map that is off in places does not make stamps look bad
        or good; ``chi2`` and the anchor signal ``S`` are rescaled to it. With a PSF
        wrong by the same fraction ``rho`` of the signal for every star, ``chi2`` then
        follows a non-central chi-square of mean ``n + rho^2 S`` and variance
        ``2 n + 4 rho^2 S``; ``rho^2`` is the median of ``(chi2 - n) / S`` over the
        stamps, and a stamp is an outlier (an unresolved blend, a galaxy, a cosmic ray)
        when its ``chi2`` exceeds that mean by ``clip`` standard deviations.
        """
        n = self.npix_per_stamp
        scale = np.ones(self.n)
        for a in range(self.n):
            v = self.weight[a] > 0
            local = robust_sigma(resid[a][v])
            if local > 0:
                scale[a] = 1.0 / (local**2 * float(np.mean(self.weight[a][v])))
        chi2, signal = chi2 * scale, signal * scale
        with np.errstate(divide="ignore", invalid="ignore"):
            rho2 = max(float(np.nanmedian((chi2 - n) / signal)), 0.0)
        lam = rho2 * signal
        return chi2 > n + lam + clip * np.sqrt(2.0 * n + 4.0 * lam)

    def loss(self, psf: PSFModel) -> float:
        chi2, _, _ = self.evaluate(psf)
        return float(chi2.sum() / max(self.npix, 1))


def _solve_stamp(data, weight, cols):
    """Non-negative fluxes and a free pedestal minimising ``sum w (d - A f - c)^2``.

    The pedestal is eliminated exactly by projecting the weighted system orthogonally
    to the (weighted) constant; the fluxes then solve a plain NNLS problem.
    """
    sw = np.sqrt(weight).ravel()
    d = sw * data.ravel()
    a = cols.reshape(cols.shape[0], -1).T * sw[:, None]
    uu = float(sw @ sw)
    if uu > 0:
        d_p = d - sw * (sw @ d) / uu
        a_p = a - np.outer(sw, sw @ a) / uu
    else:
        d_p, a_p = d, a
    f, _ = optimize.nnls(a_p, d_p)
    ped = float(sw @ (d - a @ f)) / uu if uu > 0 else 0.0
    r = data - np.tensordot(f, cols, axes=1) - ped
    return f, ped, np.where(weight > 0, r, 0.0)


# ------------------------------------------------------------------ the search


class _KernelSearch:
    """Objective over kernel parameters in the unit cube (linear or log per parameter)."""

    def __init__(self, library: PSFModel, family: KernelFamily, objective: _StampObjective):
        self.library = library
        self.family = family
        self.objective = objective
        self.params = family.parameters()
        self.nfev = 0
        self._crops: Dict[int, PSFModel] = {}

    def to_params(self, u) -> Dict[str, float]:
        out = {}
        for p, ui in zip(self.params, np.atleast_1d(u)):
            ui = min(max(float(ui), 0.0), 1.0)
            if p.scale == "log" and p.lower > 0:
                out[p.name] = float(math.exp(math.log(p.lower) + ui * (math.log(p.upper) - math.log(p.lower))))
            else:
                out[p.name] = p.lower + ui * (p.upper - p.lower)
        return out

    def to_unit(self, params: Mapping[str, float]) -> np.ndarray:
        u = []
        for p in self.params:
            v = float(params.get(p.name, p.start))
            if p.scale == "log" and p.lower > 0:
                u.append((math.log(max(v, p.lower)) - math.log(p.lower)) / (math.log(p.upper) - math.log(p.lower)))
            else:
                u.append((v - p.lower) / (p.upper - p.lower) if p.upper > p.lower else 0.0)
        return np.clip(np.array(u), 0.0, 1.0)

    def psf(self, params: Mapping[str, float]) -> PSFModel:
        """``library (*) K(params)`` on the cropped region the stamps need."""
        k = self.family.render(params, self.library.oversample)
        c = self.objective.crop_half(self.library.oversample, k.shape[0] // 2)
        if c not in self._crops:
            self._crops[c] = _crop(self.library, c)
        base = self._crops[c]
        return base if k.size == 1 else base.convolved(k, source="trial")

    def loss_at(self, params: Mapping[str, float]) -> float:
        self.nfev += 1
        return self.objective.loss(self.psf(params))

    def residuals_at(self, params: Mapping[str, float]) -> np.ndarray:
        """Weighted residuals of all stamps; their sum of squares is the loss."""
        self.nfev += 1
        _, _, resid = self.objective.evaluate(self.psf(params))
        return (np.sqrt(self.objective.weight) * resid).ravel() / math.sqrt(max(self.objective.npix, 1))

    def minimise(self, start: Mapping[str, float], xtol: float, max_evaluations: int, local: bool = False):
        """Find the best parameters: bounded Brent for one parameter, bounded
        trust-region least squares (finite-difference Jacobian) for several; both work
        on the unit cube of the parameter ranges. ``local``: ``start`` is already close
        (a later pass), so Brent first searches within 0.05 of it and widens to the
        whole range only if the minimum lies on that bracket's edge."""
        if len(self.params) == 1:
            u0 = float(self.to_unit(start)[0])
            brackets = [(max(0.0, u0 - 0.05), min(1.0, u0 + 0.05))] if local else []
            for lo, hi in brackets + [(0.0, 1.0)]:
                res = optimize.minimize_scalar(
                    lambda u: self.loss_at(self.to_params(u)),
                    bounds=(lo, hi),
                    method="bounded",
                    options={"xatol": xtol, "maxiter": max_evaluations},
                )
                inner_edge = (res.x - lo < 2 * xtol and lo > 0) or (hi - res.x < 2 * xtol and hi < 1)
                if not inner_edge:
                    break
            return self.to_params(res.x), float(res.fun), bool(res.success), str(res.message)
        res = optimize.least_squares(
            lambda u: self.residuals_at(self.to_params(u)),
            self.to_unit(start),
            bounds=(0.0, 1.0),
            method="trf",
            diff_step=1e-4,
            xtol=xtol,
            ftol=1e-8,
            max_nfev=max_evaluations,
        )
        return self.to_params(res.x), float(2.0 * res.cost), bool(res.success), str(res.message)


# ----------------------------------------------------------------- calibrators


class _Calibrator(KernelCalibrator):
    """Shared pipeline; subclasses implement :meth:`_fit_params`."""

    Options = CalibrationOptions

    def calibrate(
        self,
        image: np.ndarray,
        noise: Optional[np.ndarray],
        library_psf: PSFModel,
        family: KernelFamily,
        *,
        mask: Optional[np.ndarray] = None,
        exclude: Optional[np.ndarray] = None,
        previous: Optional[KernelFit] = None,
    ) -> KernelFit:
        t0 = time.perf_counter()
        image = np.asarray(image, dtype=float)
        _check_shapes(image, noise=noise, mask=mask, exclude=exclude)
        valid = np.isfinite(image)
        if mask is not None:
            valid &= ~np.asarray(mask, dtype=bool)
        sigma, level = _noise_map(image, noise, valid, self.options.noise_box)
        weight = 1.0 / sigma**2
        current = previous.psf if previous is not None else library_psf
        excl = None if exclude is None else np.asarray(exclude, dtype=bool)
        fam = getattr(family, "name", "") or type(family).__name__
        start = previous.params if previous is not None and previous.family == fam else family.start()
        stats: Dict[str, Any] = {"noise_level": level}
        result = None
        phot_psf = current
        nfev = 0
        anchors = None
        for k in range(self.options.passes):
            anchors = find_anchors(image, weight, phot_psf, self.options, exclude=excl, start=anchors)
            if anchors.anchor.size < self.options.min_anchors:
                break
            objective = _StampObjective(image, weight, anchors)
            search = _KernelSearch(library_psf, family, objective)
            params, ok, message = self._fit_params(search, image, weight, anchors, start, k > 0, stats)
            nfev += search.nfev
            evaluated = None  # objective.evaluate at the final params, once computed
            if self.options.anchor_clip > 0 and k == self.options.passes - 1:
                evaluated = objective.evaluate(search.psf(params))
                bad = objective.outliers(*evaluated, self.options.anchor_clip)
                stats["outliers"] = stats.get("outliers", 0) + int(bad.sum())
                if bad.any() and (~bad).sum() >= self.options.min_anchors:
                    anchors = _drop_anchors(anchors, bad)
                    objective = _StampObjective(image, weight, anchors)
                    search = _KernelSearch(library_psf, family, objective)
                    params, ok, message = self._fit_params(search, image, weight, anchors, params, True, stats)
                    nfev += search.nfev
                    evaluated = None
            result = (anchors, objective, search, params, ok, message, evaluated)
            phot_psf = _calibrated_psf(library_psf, family, params, fam)
            start = params
            stats[f"pass{k + 1}_params"] = dict(params)
        if result is None:
            n = int(anchors.anchor.size)
            stats.update(anchors.counts)
            msg = f"only {n} usable anchors (need {self.options.min_anchors}); PSF unchanged"
            log.info("kernel calibration (%s): %s", fam, msg)
            return _failed(fam, family, library_psf, previous, n, msg, stats)
        anchors, objective, search, params, ok, message, evaluated = result
        n = int(anchors.anchor.size)
        chi_before, _, res_before = objective.evaluate(_crop(current, objective.crop_half(current.oversample, 0)))
        loss_before = float(chi_before.sum() / objective.npix)
        chi_after, _, res_after = evaluated if evaluated is not None else objective.evaluate(search.psf(params))
        loss = float(chi_after.sum() / objective.npix)
        psf = phot_psf  # library (*) K of the last successful pass
        stats.update(anchors.counts)
        stats.update(
            stamp_half=anchors.half,
            nfev=nfev,
            seconds=time.perf_counter() - t0,
            fwhm_before=current.fwhm,
            fwhm_after=psf.fwhm,
            rms_before=_rms(res_before, objective.weight),
            rms_after=_rms(res_after, objective.weight),
            anchor_x=anchors.x[anchors.anchor],
            anchor_y=anchors.y[anchors.anchor],
            anchor_flux=anchors.flux[anchors.anchor],
            anchor_snr=anchors.snr[anchors.anchor],
            anchor_chi2=chi_after,
            at_bound=_at_bounds(family, params),
        )
        log.info(
            "kernel calibration (%s, %s): %s from %d anchors, loss %.4g -> %.4g, FWHM %.3f -> %.3f px (%.2f s)",
            self.name,
            fam,
            ", ".join(f"{k}={v:.4g}" for k, v in params.items()),
            n,
            loss_before,
            loss,
            current.fwhm,
            psf.fwhm,
            stats["seconds"],
        )
        return KernelFit(fam, params, psf, loss, loss_before, n, ok, message, stats)

    def _fit_params(self, search: _KernelSearch, image, weight, anchors: Anchors, start, local: bool, stats):
        """``(params, success, message)`` on the anchors of one pass."""
        raise NotImplementedError


class MultiSourceCalibrator(_Calibrator):
    """One kernel for all anchors: minimise the summed stamp loss over its parameters."""

    name = "multi_source"

    def _fit_params(self, search, image, weight, anchors, start, local, stats):
        o = self.options
        params, _, ok, message = search.minimise(start, o.xtol, o.max_evaluations, local)
        return params, ok, message


class SingleSourceCalibrator(_Calibrator):
    """A bounded kernel fit per anchor; parameters combined by S/N^2-weighted medians."""

    name = "single_source"

    def _fit_params(self, search, image, weight, anchors, start, local, stats):
        o = self.options
        per_anchor: List[Dict[str, float]] = []
        for i in range(anchors.anchor.size):
            one = _KernelSearch(search.library, search.family, _StampObjective(image, weight, anchors, [i]))
            params, _, _, _ = one.minimise(start, o.xtol, o.max_evaluations, local)
            per_anchor.append(params)
            search.nfev += one.nfev
        snr2 = np.nan_to_num(anchors.snr[anchors.anchor] ** 2)
        combined = {
            p.name: _weighted_median(np.array([q[p.name] for q in per_anchor]), snr2) for p in search.params
        }
        stats["per_anchor_params"] = {p.name: np.array([q[p.name] for q in per_anchor]) for p in search.params}
        return combined, True, f"weighted median of {len(per_anchor)} per-anchor fits"


def _drop_anchors(anchors: Anchors, bad: np.ndarray) -> Anchors:
    """``anchors`` without the anchors flagged ``bad``; they stay neighbour columns of
    the others (their light is still fitted). Applied after the last pass only (the
    kernel is then refitted on the remaining anchors), so nothing else changes."""
    neighbours = [nb for nb, b in zip(anchors.neighbours, bad) if not b]
    counts = dict(anchors.counts, anchors=int((~bad).sum()))
    return attrs.evolve(anchors, anchor=anchors.anchor[~bad], neighbours=neighbours, counts=counts)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    v, w = values[order], weights[order]
    if not w.sum() > 0:
        return float(np.median(values))
    cw = np.cumsum(w)
    return float(v[np.searchsorted(cw, 0.5 * cw[-1])])


def _calibrated_psf(library: PSFModel, family: KernelFamily, params, fam: str) -> PSFModel:
    k = family.render(params, library.oversample)
    if k.size == 1:
        return library
    return library.convolved(k, source=f"{library.source} (*) {fam} kernel")


def _rms(resid: np.ndarray, weight: np.ndarray) -> float:
    v = weight > 0
    return float(np.sqrt(np.mean(resid[v] ** 2))) if v.any() else float("nan")


def _at_bounds(family: KernelFamily, params: Mapping[str, float], tol: float = 1e-3) -> List[str]:
    """Names of parameters within ``tol`` of a bound (as a fraction of their range)."""
    out = []
    for p in family.parameters():
        span = p.upper - p.lower
        v = params[p.name]
        if span > 0 and (v - p.lower < tol * span or p.upper - v < tol * span):
            out.append(p.name)
    return out


def _failed(fam, family, library, previous, n, message, stats) -> KernelFit:
    """A failed fit that keeps the PSF in use (params: previous, identity or none)."""
    if previous is not None:
        params, psf = dict(previous.params), previous.psf
    else:
        params, psf = dict(family.identity() or {}), library
    return KernelFit(fam, params, psf, float("nan"), float("nan"), n, False, message, stats)


def _check_shapes(image: np.ndarray, **arrays) -> None:
    if image.ndim != 2:
        raise InputError(f"kernel calibration: image must be 2-D, got shape {image.shape}")
    for name, a in arrays.items():
        if a is not None and np.shape(a) != image.shape:
            raise InputError(f"kernel calibration: {name} has shape {np.shape(a)}, image has {image.shape}")


SPECS = [
    StrategySpec(
        name="multi_source",
        factory=MultiSourceCalibrator,
        options=CalibrationOptions,
        description="one kernel for all anchors; fluxes solved non-negatively on stamps (default)",
    ),
    StrategySpec(
        name="single_source",
        factory=SingleSourceCalibrator,
        options=CalibrationOptions,
        description="bounded kernel fit per anchor, combined by S/N-weighted medians",
    ),
]
