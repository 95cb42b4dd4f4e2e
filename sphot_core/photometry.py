"""Point-source photometry machinery shared by the point-source, refit and sky plugins.

Everything here works on a 2-D image (galaxy and sky already removed, NaN = no data),
a per-pixel noise map and a :class:`~sphot_core.psf.PSFModel`, and follows the PSF
convention of :mod:`sphot_core.psf`: pixel ``(0, 0)`` has its centre at ``(0.0, 0.0)``,
arrays are indexed ``[y, x]`` and ``flux`` is the *total* light of a source.

The pieces
----------
* **Stamp sizes** (:func:`stamp_halves`): every source gets its own square stamp, large
  enough that the PSF light outside it is below ``tolerance`` x the local noise in
  every pixel (``flux * max(PSF outside the stamp) <= tolerance * sigma``). Faint
  sources get small stamps, bright ones the whole PSF, so the sparse design stays
  small. The light beyond the stamps is not dropped: :func:`render_wings` adds it with
  one FFT convolution (sources at their nearest pixel centre; per pixel the error
  stays below ``tolerance`` sigma), so every model holds all the light of its sources
  (:func:`model_image`), and the flux solves subtract the wings of the current fluxes
  before solving (:func:`solve_fluxes` with ``wings=True``).
* **Sparse design** (:class:`PixelSystem`, :func:`design`): one column per source (its
  unit-flux stamp from :meth:`PSFModel.stamps`) over the usable pixels, weighted by
  ``1/sigma``; derivative columns for positions by central differences.
* **Non-negative joint fluxes** (:func:`nnls_gram`, :func:`solve_fluxes`): block
  principal pivoting on the sparse normal equations ``G f = b`` with ``G = A^T W A``;
  flux errors from the diagonal of the inverse of the final ``G`` restricted to the
  sources with positive flux (:func:`inverse_diagonal`).
* **Joint position and flux fit** (:func:`fit_positions`): Gauss-Newton on all sources
  at once, in the linear parametrisation ``flux, flux*dx, flux*dy`` (one sparse
  ``3N x 3N`` solve per iteration), shifts bounded around anchor positions, fluxes
  re-solved non-negatively after every step.
* **Detection** (:func:`detect`, :func:`find_leftover_peaks`) with photutils
  ``DAOStarFinder`` (matched-filter width = ``psf.fwhm`` of the PSF passed in) or
  ``find_peaks`` on a PSF-matched S/N map; KD-tree de-duplication (:func:`dedup`).
* **Diagnostics**: Cramer-Rao bounds (:func:`cramer_rao`), ``qfit``/``cfit``
  (:func:`box_diagnostics`), SPREAD_MODEL and its error (:func:`spread_model`), the
  quality cuts (:func:`quality_cuts`) and the final record (:func:`finalize`).
"""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any, Dict, Optional, Sequence, Tuple

import attrs
import numpy as np
from scipy import signal, sparse
from scipy.sparse import linalg as splinalg
from scipy.spatial import cKDTree

from .data import SourceTable
from .errors import DegenerateCutoutError, InputError
from .flags import SOURCE_FLAGS
from .psf import PSFModel, add_stamps
from .stages import PointSourceResult
from .stats import background_sigma, clipped_stats, noise_map

__all__ = [
    "DEFAULT_STAMP_TOLERANCE",
    "StampOptions",
    "FittedOptions",
    "PixelSystem",
    "FitInputs",
    "fit_inputs",
    "CachedPSF",
    "usable_pixels",
    "prepare_noise",
    "pixel_value",
    "box_usable",
    "fit_half_size",
    "stamp_halves",
    "render_sources",
    "render_table",
    "render_wings",
    "model_image",
    "noise_at",
    "design",
    "nnls_gram",
    "inverse_diagonal",
    "FluxSolution",
    "solve_fluxes",
    "fit_positions",
    "cramer_rao",
    "debias_flux",
    "detection_image",
    "detect",
    "find_leftover_peaks",
    "dedup",
    "box_diagnostics",
    "spread_model",
    "spread_psf",
    "CutSettings",
    "CUT_NAMES",
    "quality_cuts",
    "finalize",
    "match_sources",
    "simulate_star_field",
]

log = logging.getLogger(__name__)

#: default ``tolerance`` of :func:`stamp_halves` (fraction of the local noise sigma)
DEFAULT_STAMP_TOLERANCE = 0.03
#: step of the central differences giving derivative stamps (image pixels)
_DERIV_STEP = 0.02
#: relative ridge added to the diagonal of normal matrices (duplicates stay solvable)
_RIDGE = 1e-10


# ---------------------------------------------------------------------- options


@attrs.frozen
class StampOptions:
    """Options shared by every point-source fitter and refit: the stamp rule and the fit box.

    Attributes
    ----------
    stamp_tolerance : float
        Per-source stamp rule: PSF wing pixels brighter than this fraction of the noise
        are inside the stamp (:func:`stamp_halves`).
    fit_box_fwhm : float
        Half-size of the fit box in PSF FWHM (at least 2 px): position derivatives,
        quality cuts, ``qfit``/``cfit`` (:func:`fit_half_size`).
    """

    stamp_tolerance: float = attrs.field(
        default=DEFAULT_STAMP_TOLERANCE,
        validator=attrs.validators.gt(0),
        metadata={"help": "Stamp rule: PSF wing pixels brighter than this fraction of the noise are in the stamp."},
    )
    fit_box_fwhm: float = attrs.field(
        default=1.0,
        validator=attrs.validators.gt(0),
        metadata={"help": "Half-size of the fit box in PSF FWHM (at least 2 px)."},
    )


@attrs.frozen
class FittedOptions(StampOptions):
    """:class:`StampOptions` of the fitters whose sources have positions fitted on the image.

    Attributes
    ----------
    flux_bias_correction : bool
        Correct the fluxes for the bias of positions fitted on the same image
        (:func:`debias_flux`).
    """

    flux_bias_correction: bool = attrs.field(
        default=True,
        metadata={"help": "Correct the fluxes for the bias of positions fitted on the same image."},
    )


# ------------------------------------------------------------------------- pixels


def usable_pixels(
    image: np.ndarray, mask: Optional[np.ndarray] = None, noise: Optional[np.ndarray] = None
) -> np.ndarray:
    """Pixels that may be used in a fit: finite data, not masked, finite positive noise."""
    valid = np.isfinite(image)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != image.shape:
            raise InputError(f"mask shape {mask.shape} differs from the image shape {image.shape}")
        valid &= ~mask
    if noise is not None:
        valid &= np.isfinite(noise) & (noise > 0)
    return valid


def prepare_noise(image: np.ndarray, noise, valid: np.ndarray, box_size: int = 32) -> np.ndarray:
    """The per-pixel noise map to use: ``noise`` if given (scalar or array), else estimated.

    An estimate comes from :func:`sphot_core.stats.noise_map` on the usable pixels.

    Raises
    ------
    InputError
        ``noise`` has the wrong shape, or no usable pixel is left to estimate it from.
    """
    if noise is None:
        if np.count_nonzero(valid) < 10:
            raise InputError("fewer than 10 usable pixels: cannot estimate the noise")
        return noise_map(image, ~valid, box_size=box_size)
    arr = np.asarray(noise, dtype=float)
    if arr.ndim == 0:
        return np.full(image.shape, float(arr))
    if arr.shape != image.shape:
        raise InputError(f"noise map shape {arr.shape} differs from the image shape {image.shape}")
    return arr


def _nearest(x, y) -> Tuple[np.ndarray, np.ndarray]:
    return np.floor(np.asarray(x, float) + 0.5).astype(int), np.floor(np.asarray(y, float) + 0.5).astype(int)


def pixel_value(array: np.ndarray, x, y, fill=False) -> np.ndarray:
    """Value of ``array`` at the pixel nearest to each position (``fill`` outside the array)."""
    ix, iy = _nearest(x, y)
    ny, nx = array.shape
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    out = np.full(ix.shape, fill, dtype=array.dtype)
    out[inside] = array[iy[inside], ix[inside]]
    return out


def box_usable(valid: np.ndarray, x, y, half: int) -> np.ndarray:
    """True where no pixel of the ``2 half + 1`` box around a position is NaN or masked.

    Pixels beyond the image border do not count (sources on the border are normal).
    """
    ix, iy = _nearest(np.atleast_1d(x), np.atleast_1d(y))
    return _window(valid, ix, iy, int(half), True).all(axis=(1, 2))


def _window(array: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int, fill) -> np.ndarray:
    """``(n, 2 half + 1, 2 half + 1)`` cut-outs of ``array`` centred on pixels ``(ix, iy)``."""
    ny, nx = array.shape
    k = np.arange(-half, half + 1)
    rows = iy[:, None] + k[None, :]
    cols = ix[:, None] + k[None, :]
    rin = (rows >= 0) & (rows < ny)
    cin = (cols >= 0) & (cols < nx)
    out = array[np.clip(rows, 0, ny - 1)[:, :, None], np.clip(cols, 0, nx - 1)[:, None, :]]
    out = np.array(out, copy=True)
    out[~(rin[:, :, None] & cin[:, None, :])] = fill
    return out


class CachedPSF:
    """A :class:`~sphot_core.psf.PSFModel` whose unit-flux stamps are memoised.

    ``stamps(x, y, half)`` returns the same values as the wrapped model's, computed once
    per ``(x, y, half)``: a fit renders, designs and diagnoses the same sources many
    times. Every other attribute is the wrapped model's. Wrap a PSF for the duration
    of one fit; the returned arrays must not be modified.
    """

    def __init__(self, psf):
        self.model = getattr(psf, "model", psf)
        self._store: Dict[int, Dict[Tuple[float, float], Tuple[np.ndarray, int, int]]] = {}

    def __getattr__(self, name):
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return f"CachedPSF({self.model!r})"

    def stamps(self, x, y, half: int):
        """Cached :meth:`PSFModel.stamps`."""
        x = np.atleast_1d(np.asarray(x, dtype=float))
        y = np.atleast_1d(np.asarray(y, dtype=float))
        half = int(half)
        store = self._store.setdefault(half, {})
        keys = list(zip(x.tolist(), y.tolist()))
        miss = [i for i, k in enumerate(keys) if k not in store]
        if miss:
            vals, ix, iy = self.model.stamps(x[miss], y[miss], half)
            for j, i in enumerate(miss):
                store[keys[i]] = (vals[j], int(ix[j]), int(iy[j]))
        if not keys:
            return np.zeros((0, 2 * half + 1, 2 * half + 1)), np.zeros(0, dtype=int), np.zeros(0, dtype=int)
        entries = [store[k] for k in keys]
        return (
            np.stack([e[0] for e in entries]),
            np.array([e[1] for e in entries], dtype=int),
            np.array([e[2] for e in entries], dtype=int),
        )


def _model(psf) -> PSFModel:
    """The :class:`PSFModel` behind a possibly cached PSF."""
    return getattr(psf, "model", psf)


@attrs.define(eq=False)
class PixelSystem:
    """The usable pixels of one image, indexed for sparse designs.

    Attributes
    ----------
    shape : tuple
    valid : ndarray of bool
        Usable pixels.
    index : ndarray of int
        Position of each usable pixel in the compressed vectors, -1 elsewhere.
    noise : ndarray
        Full per-pixel noise map (1 sigma).
    inv_sigma : ndarray
        ``1/sigma`` of the usable pixels (compressed).
    data : ndarray
        ``image/sigma`` of the usable pixels (compressed).
    """

    shape: Tuple[int, int]
    valid: np.ndarray
    index: np.ndarray
    noise: np.ndarray
    inv_sigma: np.ndarray
    data: np.ndarray

    @classmethod
    def build(cls, image: np.ndarray, noise: np.ndarray, valid: np.ndarray) -> "PixelSystem":
        valid = valid & np.isfinite(image) & np.isfinite(noise) & (noise > 0)
        index = np.full(image.shape, -1, dtype=np.int64)
        index[valid] = np.arange(np.count_nonzero(valid))
        inv = 1.0 / noise[valid]
        return cls(image.shape, valid, index, noise, inv, image[valid] * inv)

    def with_image(self, image: np.ndarray) -> "PixelSystem":
        """Same pixels and noise, other data (e.g. a residual)."""
        return attrs.evolve(self, data=image[self.valid] * self.inv_sigma)

    @property
    def size(self) -> int:
        return self.inv_sigma.size


@attrs.frozen(eq=False)
class FitInputs:
    """The checked inputs of a point-source fit (see :func:`fit_inputs`).

    Attributes
    ----------
    image : ndarray
        The 2-D image (float).
    system : PixelSystem
        Usable pixels (finite data, not masked, finite positive noise) and the noise map.
    exclude : ndarray of bool
        Pixels where no new source may be placed (all False when none was given).
    """

    image: np.ndarray
    system: PixelSystem
    exclude: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        return self.system.valid

    @property
    def noise(self) -> np.ndarray:
        return self.system.noise


def fit_inputs(
    image,
    noise,
    mask=None,
    exclude=None,
    *,
    where: str,
    noise_box_size: int = 32,
    require_pixels: bool = False,
) -> FitInputs:
    """Check the inputs of a point-source fit and index its usable pixels.

    The usable pixels (:func:`usable_pixels`) give the noise map (:func:`prepare_noise`,
    estimated in boxes of ``noise_box_size`` when ``noise`` is None), then the pixels
    with a finite positive noise form the :class:`PixelSystem`.

    Parameters
    ----------
    image : array_like
        2-D image, NaN = no data.
    noise : None, float or ndarray
    mask, exclude : ndarray of bool, optional
        Pixels not to use; pixels where no new source may be placed. Both must have the
        image's shape.
    where : str
        Who is asking (starts the error messages).
    noise_box_size : int
        Box size (px) of an estimated noise map.
    require_pixels : bool
        Raise :class:`~sphot_core.errors.DegenerateCutoutError` when no pixel is usable.

    Raises
    ------
    InputError
        The image is not 2-D, or ``mask``, ``exclude`` or ``noise`` has the wrong shape.
    """
    img = np.asarray(image, dtype=float)
    if img.ndim != 2:
        raise InputError(f"{where}: image must be 2-D, got shape {img.shape}")
    valid = usable_pixels(img, mask)
    if require_pixels and not valid.any():
        raise DegenerateCutoutError(f"{where}: the image has no usable pixel (all NaN or masked)")
    if exclude is None:
        excl = np.zeros(img.shape, dtype=bool)
    else:
        excl = np.asarray(exclude, dtype=bool)
        if excl.shape != img.shape:
            raise InputError(f"{where}: exclude shape {excl.shape} differs from the image shape {img.shape}")
    noise_arr = prepare_noise(img, noise, valid, noise_box_size)
    return FitInputs(img, PixelSystem.build(img, noise_arr, valid), excl)


# ------------------------------------------------------------------ stamp sizes

_WINGS: "weakref.WeakKeyDictionary[PSFModel, Tuple[np.ndarray, np.ndarray]]" = weakref.WeakKeyDictionary()


def _wing_profile(psf: PSFModel) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted Chebyshev distances (px) of the PSF elements and the largest value beyond each."""
    psf = _model(psf)
    prof = _WINGS.get(psf)
    if prof is None:
        a = np.abs(psf.array)
        yy, xx = np.indices(a.shape)
        d = np.maximum(np.abs(yy - psf.origin[0]), np.abs(xx - psf.origin[1])).ravel() / psf.oversample
        order = np.argsort(d)[::-1]
        beyond = np.maximum.accumulate(a.ravel()[order])[::-1]
        prof = (d[order][::-1], beyond)
        _WINGS[psf] = prof
    return prof


def fit_half_size(psf: PSFModel, fwhm_factor: float = 1.0) -> int:
    """Half-size (px) of the fit box of a source: ``max(2, ceil(fwhm_factor * FWHM))``."""
    return int(max(2, np.ceil(fwhm_factor * psf.fwhm)))


def _half_ladder(minimum: int, maximum: int) -> np.ndarray:
    """The allowed stamp half-sizes (about 12 % apart, so few distinct stamp shapes)."""
    if maximum <= minimum:
        return np.array([minimum])
    n = int(np.ceil(np.log(maximum / minimum) / np.log(1.12))) + 1
    return np.unique(np.ceil(np.geomspace(minimum, maximum, n)).astype(int))


def stamp_halves(
    psf: PSFModel, flux, sigma, tolerance: float = DEFAULT_STAMP_TOLERANCE, minimum: int = 2
) -> np.ndarray:
    """Per-source stamp half-sizes holding every PSF wing pixel brighter than ``tolerance * sigma``.

    The half-size ``h`` of a source of total flux ``F`` in noise ``sigma`` is the
    smallest allowed value such that ``F * max(|PSF|) <= tolerance * sigma`` over all
    pixels outside the stamp (at least ``h + 0.5`` px from the source along x or y,
    whatever its sub-pixel phase), rounded up on a ladder of about 12 % steps
    and capped at the PSF's half extent. Inside the stamp the PSF is exact (cubic
    B-spline at the source's sub-pixel position); outside, every pixel is below
    ``tolerance`` sigma and :func:`render_wings` supplies it approximately.

    Parameters
    ----------
    psf : PSFModel
    flux, sigma : array_like
        Source fluxes (non-positive values get the minimum) and the noise at each.
    tolerance : float
        Largest omitted wing level per pixel, in units of ``sigma``.
    minimum : int
        Smallest half-size (the fit box).

    Returns
    -------
    ndarray of int
    """
    flux = np.atleast_1d(np.asarray(flux, dtype=float))
    sigma = np.broadcast_to(np.asarray(sigma, dtype=float), flux.shape)
    hmax = max(int(minimum), psf.half_extent + 1)
    ladder = _half_ladder(int(minimum), hmax)
    dist, beyond = _wing_profile(psf)
    # pixels outside a stamp of half-size h are at least h + 0.5 px from the source
    i = np.searchsorted(dist, ladder + 0.5 - 1e-9, side="left")
    level = np.where(i < dist.size, beyond[np.minimum(i, dist.size - 1)], 0.0)  # non-increasing
    with np.errstate(divide="ignore", invalid="ignore"):
        allowed = np.where(flux > 0, tolerance * sigma / flux, np.inf)
    # first ladder entry whose omitted level is allowed
    j = np.searchsorted(-level, -np.nan_to_num(allowed, nan=np.inf), side="left")
    return ladder[np.minimum(j, ladder.size - 1)]


# ------------------------------------------------------------------- rendering


def _stamp_values(psf: PSFModel, x, y, half: int, ix, iy) -> np.ndarray:
    """Unit-flux stamps of half-size ``half`` centred on given pixels ``(ix, iy)``.

    ``(ix, iy)`` may differ by one pixel from the pixel nearest to ``(x, y)`` (shifted
    sources keep the stamp frame of the unshifted one).
    """
    vals, jx, jy = _model(psf).stamps(x, y, half + 1)
    oy = 1 + iy - jy
    ox = 1 + ix - jx
    k = np.arange(2 * half + 1)
    n = np.arange(vals.shape[0])[:, None, None]
    return vals[n, (oy[:, None] + k)[:, :, None], (ox[:, None] + k)[:, None, :]]


def _stamps(psf: PSFModel, x, y, half: int, derivative: Optional[str] = None):
    """Stamps (or their derivative wrt the source ``x``/``y``) and their centre pixels."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ix, iy = _nearest(x, y)
    if derivative is None:
        vals, jx, jy = psf.stamps(x, y, half)
        return vals, jx, jy
    h = _DERIV_STEP
    if derivative == "x":
        plus = _stamp_values(psf, x + h, y, half, ix, iy)
        minus = _stamp_values(psf, x - h, y, half, ix, iy)
    elif derivative == "y":
        plus = _stamp_values(psf, x, y + h, half, ix, iy)
        minus = _stamp_values(psf, x, y - h, half, ix, iy)
    else:
        raise ValueError(f"derivative must be None, 'x' or 'y', got {derivative!r}")
    return (plus - minus) / (2.0 * h), ix, iy


def _groups(halves: np.ndarray):
    for h in np.unique(halves):
        yield int(h), np.flatnonzero(halves == h)


def render_sources(shape, psf: PSFModel, x, y, flux, halves) -> np.ndarray:
    """Image of point sources, each on its own stamp half-size (see :func:`stamp_halves`)."""
    img = np.zeros(shape)
    x = np.atleast_1d(np.asarray(x, dtype=float))
    flux = np.atleast_1d(np.asarray(flux, dtype=float))
    halves = np.broadcast_to(np.asarray(halves, dtype=int), x.shape)
    y = np.atleast_1d(np.asarray(y, dtype=float))
    for h, idx in _groups(halves):
        vals, ix, iy = psf.stamps(x[idx], y[idx], h)
        add_stamps(img, vals * flux[idx][:, None, None], ix, iy)
    return img


def render_wings(shape, psf, x, y, flux, halves) -> np.ndarray:
    """The light of point sources *outside* their stamps (complement of :func:`render_sources`).

    One FFT convolution of the fluxes, placed at each source's nearest pixel, with the
    PSF on the image grid, minus the central ``2 h + 1`` square of that kernel at each
    source: exactly the region a stamp covers is left out, the rest is the PSF wing
    with the sub-pixel offset neglected. The total light is right; per pixel the error
    stays below the stamp tolerance (worst case measured on the six survey PSFs: 0.8 x
    ``tolerance`` sigma next to the stamp edge, falling off outwards).
    """
    ny, nx = shape
    x = np.atleast_1d(np.asarray(x, dtype=float))
    flux = np.atleast_1d(np.asarray(flux, dtype=float))
    halves = np.broadcast_to(np.asarray(halves, dtype=int), x.shape)
    ix, iy = _nearest(x, np.atleast_1d(np.asarray(y, dtype=float)))
    ok = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny) & (flux != 0)
    out = np.zeros(shape)
    if not ok.any():
        return out
    kernel = _model(psf).grid_kernel
    c = kernel.shape[0] // 2
    points = np.zeros(shape)
    np.add.at(points, (iy[ok], ix[ok]), flux[ok])
    out += signal.fftconvolve(points, kernel, mode="same")
    for h, idx in _groups(halves):
        idx = idx[ok[idx]]
        if not idx.size:
            continue
        hc = min(h, c)
        core = kernel[c - hc : c + hc + 1, c - hc : c + hc + 1]
        add_stamps(out, -core[None, :, :] * flux[idx][:, None, None], ix[idx], iy[idx])
    return out


def model_image(shape, psf, x, y, flux, halves) -> np.ndarray:
    """All the light of point sources: their stamps (:func:`render_sources`) plus wings (:func:`render_wings`)."""
    return render_sources(shape, psf, x, y, flux, halves) + render_wings(shape, psf, x, y, flux, halves)


def noise_at(noise: np.ndarray, valid: np.ndarray, x, y) -> np.ndarray:
    """Noise at the pixel nearest to each source (median of the usable pixels where not finite)."""
    sig = pixel_value(noise, x, y, fill=np.nan)
    bad = ~(np.isfinite(sig) & (sig > 0))
    if bad.any():
        sig[bad] = np.nanmedian(np.where(valid, noise, np.nan))
    return sig


def render_table(
    shape, psf, x, y, flux, noise: np.ndarray, valid: np.ndarray, *, tolerance: float, fit_half: int
) -> np.ndarray:
    """The model image of a source table: stamps sized by the stamp rule, plus their wings.

    Every fitter's ``model`` is exactly this image of its table, with the noise map and
    the ``stamp_tolerance`` / fit box it used: :func:`render_sources` with half-sizes
    ``stamp_halves(psf, flux, noise_at(...), tolerance, fit_half)`` plus
    :func:`render_wings` (the light beyond the stamps), so the model holds all the
    light of every source.
    """
    halves = stamp_halves(psf, flux, noise_at(noise, valid, x, y), tolerance, fit_half)
    return model_image(shape, psf, x, y, flux, halves)


# --------------------------------------------------------------------- design


def design(psf: PSFModel, x, y, halves, system: PixelSystem, derivative: Optional[str] = None) -> sparse.csc_matrix:
    """Sparse ``(n_usable_pixels, n_sources)`` design weighted by ``1/sigma``.

    Column ``i`` is the unit-flux stamp of source ``i`` (half-size ``halves[i]``) on the
    usable pixels, or its derivative with respect to the source's ``x``/``y``.
    """
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    halves = np.broadcast_to(np.asarray(halves, dtype=int), x.shape)
    rows, cols, data = [], [], []
    for h, idx in _groups(halves):
        vals, ix, iy = _stamps(psf, x[idx], y[idx], h, derivative)
        pix = _window(system.index, ix, iy, h, -1)
        keep = pix >= 0
        r = pix[keep]
        rows.append(r)
        cols.append(np.broadcast_to(idx[:, None, None], pix.shape)[keep])
        data.append(vals[keep] * system.inv_sigma[r])
    if not rows:
        return sparse.csc_matrix((system.size, x.size))
    return sparse.csc_matrix(
        (np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))), shape=(system.size, x.size)
    )


def _regularised(G) -> sparse.csc_matrix:
    d = G.diagonal()
    scale = d.max() if d.size else 1.0
    return (G + sparse.diags(_RIDGE * np.maximum(d, scale * 1e-6))).tocsc()


def _factor(G):
    """Sparse LU of a (regularised) normal matrix."""
    return splinalg.splu(sparse.csc_matrix(G), permc_spec="MMD_AT_PLUS_A")


# ----------------------------------------------------------------------- NNLS


def nnls_gram(
    G, b, x0: Optional[np.ndarray] = None, max_iter: Optional[int] = None, signed: Optional[np.ndarray] = None
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Minimise ``1/2 f^T G f - b^T f`` subject to ``f >= 0`` (non-negative least squares).

    Block principal pivoting (Kim & Park 2011, "Fast nonnegative matrix factorization")
    on the normal equations: the free set is solved exactly with a sparse LU, all
    variables violating the optimality conditions are exchanged at once, with the
    finite single-exchange backup rule when the number of violations stops falling.

    Parameters
    ----------
    G : sparse or dense symmetric positive (semi-)definite matrix
    b : ndarray
    x0 : ndarray, optional
        Warm start; its positive entries form the first free set (default: all free).
    max_iter : int, optional
        Cap on exchanges (default ``10 n + 50``).
    signed : ndarray of bool, optional
        Variables without the sign constraint (e.g. a sky offset): always free.

    Returns
    -------
    f : ndarray
        Non-negative solution.
    info : dict
        ``iterations``, ``converged``.
    """
    G = _regularised(sparse.csc_matrix(G))
    b = np.asarray(b, dtype=float)
    n = b.size
    if n == 0:
        return np.zeros(0), {"iterations": 0, "converged": True}
    unbounded = np.zeros(n, dtype=bool) if signed is None else np.asarray(signed, dtype=bool)
    free = np.ones(n, dtype=bool) if x0 is None else (np.asarray(x0) > 0) | unbounded
    max_iter = 10 * n + 50 if max_iter is None else max_iter
    tol = 1e-10 * max(np.abs(b).max(), np.finfo(float).tiny)

    def solve(free):
        f = np.zeros(n)
        idx = np.flatnonzero(free)
        if idx.size:
            f[idx] = _factor(G[idx][:, idx]).solve(b[idx])
        grad = G @ f - b
        return f, grad

    f, grad = solve(free)
    best, budget, it, converged = n + 1, 3, 0, False
    for it in range(1, max_iter + 1):
        bad = ((free & (f < 0)) | (~free & (grad < -tol))) & ~unbounded
        nbad = int(np.count_nonzero(bad))
        if nbad == 0:
            converged = True
            break
        if nbad < best:
            best, budget = nbad, 3
            flip = bad
        elif budget > 0:
            budget -= 1
            flip = bad
        else:
            flip = np.zeros(n, dtype=bool)
            flip[np.flatnonzero(bad).max()] = True
        free ^= flip
        f, grad = solve(free)
    if not converged:
        log.warning("non-negative flux solve stopped after %d exchanges without meeting the optimality test", it)
    # values at rounding level are zeros that the exact solve did not land on
    f[(f < 1e-10 * max(f[~unbounded].max(initial=0.0), 0.0)) & ~unbounded] = 0.0
    return f, {"iterations": it, "converged": converged}


def inverse_diagonal(G, block: int = 256) -> np.ndarray:
    """Diagonal of ``G^{-1}`` for a sparse symmetric positive definite ``G`` (NaN if singular)."""
    G = sparse.csc_matrix(G)
    n = G.shape[0]
    out = np.full(n, np.nan)
    if n == 0:
        return out
    try:
        lu = _factor(_regularised(G))
    except RuntimeError:
        return out
    for start in range(0, n, block):
        stop = min(n, start + block)
        rhs = np.zeros((n, stop - start))
        rhs[np.arange(start, stop), np.arange(stop - start)] = 1.0
        sol = lu.solve(rhs)
        out[start:stop] = sol[np.arange(start, stop), np.arange(stop - start)]
    out[~(out > 0)] = np.nan
    return out


@attrs.frozen(eq=False)
class FluxSolution:
    """Joint non-negative fluxes on fixed positions.

    Attributes
    ----------
    flux : ndarray
        Fluxes (>= 0).
    halves : ndarray of int
        Stamp half-size of each source in the final design.
    design : sparse matrix
        The final design ``A`` (weighted by ``1/sigma``).
    gram : sparse matrix
        The final normal matrix ``A^T A``.
    info : dict
        Solver diagnostics (``iterations``, ``converged``, ``rebuilds``, ``solves``).
    """

    flux: np.ndarray
    halves: np.ndarray
    design: Any
    gram: Any
    info: Dict[str, Any]
    extra_flux: np.ndarray = attrs.field(factory=lambda: np.zeros(0))

    def _errors(self, all_sources: bool) -> np.ndarray:
        """Errors of every column (sources, then extra components) from the normal matrix."""
        coef = np.r_[self.flux, self.extra_flux]
        err = np.full(coef.size, np.nan)
        if coef.size == 0:
            return err
        sel = np.ones(coef.size, dtype=bool) if all_sources else coef != 0
        idx = np.flatnonzero(sel & (self.gram.diagonal() > 0))
        if idx.size:
            err[idx] = np.sqrt(inverse_diagonal(self.gram[idx][:, idx]))
        return err

    def flux_errors(self, all_sources: bool = False) -> np.ndarray:
        """1-sigma flux errors from the final normal matrix.

        By default from the matrix restricted to the sources with positive flux (the
        design of the sources that remain; NaN for zero-flux sources). With
        ``all_sources`` from the full matrix, for every source (forced photometry: the
        error of the unconstrained linear estimate). Extra components solved with the
        sources (``solve_fluxes(extra=...)``) are part of the matrix, so the errors
        include their covariance.
        """
        return self._errors(all_sources)[: self.flux.size]

    def extra_errors(self) -> np.ndarray:
        """1-sigma errors of the extra components' coefficients (NaN where exactly zero)."""
        return self._errors(False)[self.flux.size :]


def solve_fluxes(
    system: PixelSystem,
    psf,
    x,
    y,
    flux_guess,
    *,
    tolerance: float = DEFAULT_STAMP_TOLERANCE,
    minimum_half: int = 2,
    fixed_halves: Optional[np.ndarray] = None,
    wings: bool = False,
    extra: Optional[np.ndarray] = None,
    extra_signed: Optional[Sequence[bool]] = None,
) -> FluxSolution:
    """All fluxes at fixed positions, jointly and non-negatively, on per-source stamps.

    The stamps are sized by :func:`stamp_halves` from ``flux_guess`` (or fixed with
    ``fixed_halves``); if a solved flux needs a larger stamp than its guess gave, the
    design is rebuilt once with the larger stamps and solved again. With ``wings`` the
    light beyond the stamps (:func:`render_wings` of the current fluxes, starting from
    ``flux_guess``) is subtracted from the data and the solve repeated until the fluxes
    change by less than 1 % of their errors (at most 4 solves). Errors are computed on
    demand (:meth:`FluxSolution.flux_errors`).

    Parameters
    ----------
    system : PixelSystem
        Usable pixels, noise and data.
    psf : PSFModel or CachedPSF
    x, y, flux_guess : array_like
    tolerance, minimum_half : float, int
        Stamp rule (:func:`stamp_halves`).
    fixed_halves : ndarray, optional
        Use these half-sizes instead of the rule.
    extra : ndarray, optional
        ``(k, ny, nx)`` images of fixed-shape components (e.g. the galaxy model) whose
        non-negative coefficients are solved together with the fluxes
        (:attr:`FluxSolution.extra_flux`: the factor each image is scaled by). Their
        columns are dense; the normal matrix keeps one dense row and column each.
    extra_signed : sequence of bool, optional
        Per extra component: its coefficient may be negative (a sky correction).
    """
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    n = x.size
    dense = None
    if extra is not None:
        ex = np.asarray(extra, dtype=float)
        if ex.ndim != 3 or ex.shape[1:] != system.shape:
            raise InputError(f"solve_fluxes: extra must have shape (k, {system.shape[0]}, {system.shape[1]}), got {ex.shape}")
        dense = sparse.csc_matrix(np.nan_to_num(ex[:, system.valid].T) * system.inv_sigma[:, None])
    if n == 0 and dense is None:
        empty = sparse.csc_matrix((system.size, 0))
        info = {"iterations": 0, "converged": True}
        return FluxSolution(np.zeros(0), np.zeros(0, dtype=int), empty, sparse.csc_matrix((0, 0)), info)
    sig = noise_at(system.noise, system.valid, x, y)

    def halves_for(f):
        if fixed_halves is not None:
            return np.broadcast_to(np.asarray(fixed_halves, dtype=int), x.shape).copy()
        return stamp_halves(psf, f, sig, tolerance, minimum_half)

    f = np.nan_to_num(np.broadcast_to(np.asarray(flux_guess, dtype=float), x.shape).copy())
    k = 0 if dense is None else dense.shape[1]
    coef = np.r_[f, np.ones(k)]
    halves = halves_for(f)
    rebuilds = solves = 0
    A = G = None
    while True:
        if A is None:
            A = design(psf, x, y, halves, system)
            if dense is not None:
                A = sparse.hstack([A, dense]).tocsc()
            G = (A.T @ A).tocsc()
        data = system.data
        if wings and np.any(f > 0):
            w = render_wings(system.shape, psf, x, y, np.clip(f, 0, None), halves)
            data = data - w[system.valid] * system.inv_sigma
        previous = f
        signed = None if extra_signed is None else np.r_[np.zeros(n, dtype=bool), np.asarray(extra_signed, dtype=bool)]
        coef, info = nnls_gram(G, A.T @ data, x0=coef if np.any(coef > 0) else None, signed=signed)
        f = coef[:n]
        solves += 1
        need = halves_for(f)
        if rebuilds < 1 and np.any(need > halves):
            halves = np.maximum(halves, need)
            rebuilds += 1
            A = None
            continue
        if not wings or solves >= 4:
            break
        scale = np.sqrt(1.0 / np.maximum(G.diagonal()[:n], np.finfo(float).tiny))
        if np.all(np.abs(f - previous) <= 0.01 * scale):
            break
    return FluxSolution(f, halves, A, G, dict(info, rebuilds=rebuilds, solves=solves), extra_flux=coef[n:])


# ------------------------------------------------------------------ positions


def fit_positions(
    system: PixelSystem,
    psf: PSFModel,
    x,
    y,
    flux,
    *,
    anchor_x=None,
    anchor_y=None,
    bound: float = 1.0,
    core_half: int = 2,
    halves=None,
    tolerance: float = DEFAULT_STAMP_TOLERANCE,
    iterations: int = 3,
    max_step: float = 0.5,
    tol: float = 1e-3,
    wings: bool = False,
) -> Dict[str, Any]:
    """Joint least-squares fit of positions and fluxes of all sources (bounded shifts).

    Gauss-Newton in the linear parametrisation ``(f_i, f_i dx_i, f_i dy_i)``: the flux
    columns are the sources' stamps (``halves``, or the stamp rule), the position columns
    the derivative stamps on the fit box (``core_half``); the ``3N x 3N`` normal matrix
    is solved at once, so blended sources move together. Each step is limited to
    ``max_step`` px and the total shift to ``bound`` px around the anchors (default: the
    starting positions); a source whose step is below ``tol`` px keeps its position;
    the loop ends when all do. After each step the fluxes are re-solved non-negatively
    (:func:`solve_fluxes`; with ``wings`` the final solve also models the light beyond
    the stamps). Sources with zero flux keep their position.

    Returns
    -------
    dict
        ``x, y, flux, halves, solution`` (the final :class:`FluxSolution`, for errors),
        ``at_bound`` (bool array: the shift ended on its bound), ``iterations``,
        ``max_shift`` (px, last step).
    """
    x = np.array(x, dtype=float, ndmin=1)
    y = np.array(y, dtype=float, ndmin=1)
    ax = x.copy() if anchor_x is None else np.asarray(anchor_x, dtype=float)
    ay = y.copy() if anchor_y is None else np.asarray(anchor_y, dtype=float)
    kw = dict(tolerance=tolerance, minimum_half=core_half, fixed_halves=halves)
    sol = solve_fluxes(system, psf, x, y, flux, **kw)
    n = x.size
    step = 0.0
    it = 0
    for it in range(1, iterations + 1):
        if bound <= 0 or n == 0:
            it = 0
            break
        A = sol.design
        Dx = design(psf, x, y, core_half, system, derivative="x")
        Dy = design(psf, x, y, core_half, system, derivative="y")
        J = sparse.hstack([A, Dx, Dy], format="csc")
        H = _regularised((J.T @ J).tocsc())
        try:
            u = _factor(H).solve(J.T @ system.data)
        except RuntimeError:
            log.warning("position fit: singular normal matrix; positions kept")
            break
        fnew, a, b = u[:n], u[n : 2 * n], u[2 * n :]
        ok = (fnew > 0) & (sol.flux > 0)
        dx = np.where(ok, a / np.where(ok, fnew, 1.0), 0.0)
        dy = np.where(ok, b / np.where(ok, fnew, 1.0), 0.0)
        scale = np.maximum(1.0, np.hypot(dx, dy) / max_step)
        nx_ = np.clip(x + dx / scale, ax - bound, ax + bound)
        ny_ = np.clip(y + dy / scale, ay - bound, ay + bound)
        moved = np.hypot(nx_ - x, ny_ - y)
        # converged sources keep their exact position (and their cached stamps)
        frozen = moved < tol
        nx_[frozen], ny_[frozen] = x[frozen], y[frozen]
        step = float(moved.max()) if n else 0.0
        x, y = nx_, ny_
        sol = solve_fluxes(system, psf, x, y, sol.flux, **kw)
        if step < tol:
            break
    if wings:
        sol = solve_fluxes(system, psf, x, y, sol.flux, wings=True, **kw)
    at_bound = (bound > 0) & ((np.abs(x - ax) >= bound * (1 - 1e-9)) | (np.abs(y - ay) >= bound * (1 - 1e-9)))
    return {
        "x": x,
        "y": y,
        "flux": sol.flux,
        "halves": sol.halves,
        "solution": sol,
        "at_bound": at_bound,
        "iterations": it,
        "max_shift": step,
    }


# ---------------------------------------------------------------- Cramer-Rao


def _fisher(
    psf, x, y, flux, noise: np.ndarray, valid: np.ndarray, halves, core_half: Optional[int] = None
) -> np.ndarray:
    """Per-source Fisher matrices ``(n, 3, 3)`` of ``(flux, x, y)`` (neighbours known).

    The flux term uses the whole stamp (``halves``); the position terms use the stamp
    limited to ``core_half`` (the fit box where positions are fitted; ``None`` = whole).
    """
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    flux = np.broadcast_to(np.asarray(flux, dtype=float), x.shape)
    halves = np.broadcast_to(np.asarray(halves, dtype=int), x.shape)
    ivar = np.where(valid & np.isfinite(noise) & (noise > 0), 1.0 / np.where(noise > 0, noise, 1.0) ** 2, 0.0)
    fisher = np.zeros((x.size, 3, 3))
    for h, idx in _groups(halves):
        p, ix, iy = _stamps(psf, x[idx], y[idx], h)
        fisher[idx, 0, 0] = np.einsum("nij,nij,nij->n", _window(ivar, ix, iy, h, 0.0), p, p)
        hc = h if core_half is None else min(h, int(core_half))
        p, ix, iy = _stamps(psf, x[idx], y[idx], hc)
        px, _, _ = _stamps(psf, x[idx], y[idx], hc, "x")
        py, _, _ = _stamps(psf, x[idx], y[idx], hc, "y")
        w = _window(ivar, ix, iy, hc, 0.0)
        f = flux[idx][:, None, None]
        cols = [p, f * px, f * py]
        for a in range(3):
            for b in range(max(a, 1), 3):
                fisher[idx, a, b] = fisher[idx, b, a] = np.einsum("nij,nij,nij->n", w, cols[a], cols[b])
    return fisher


def _bounds(fisher: np.ndarray, flux: np.ndarray) -> Tuple[np.ndarray, ...]:
    n = fisher.shape[0]
    sf = np.full(n, np.nan)
    sx = np.full(n, np.nan)
    sy = np.full(n, np.nan)
    full = (flux > 0) & (np.linalg.det(fisher) > 0) if n else np.zeros(0, dtype=bool)
    if full.any():
        cov = np.linalg.inv(fisher[full])
        sf[full] = np.sqrt(cov[:, 0, 0])
        sx[full] = np.sqrt(cov[:, 1, 1])
        sy[full] = np.sqrt(cov[:, 2, 2])
    only = ~full & (fisher[:, 0, 0] > 0)
    sf[only] = 1.0 / np.sqrt(fisher[only, 0, 0])
    return sf, sx, sy


def cramer_rao(
    psf, x, y, flux, noise: np.ndarray, valid: np.ndarray, halves, core_half: Optional[int] = None
) -> Tuple[np.ndarray, ...]:
    """Cramer-Rao bounds of ``(flux, x, y)`` for each source as if it were isolated.

    The Fisher matrix of one source with Gaussian pixel noise ``noise`` over the usable
    pixels of its stamp (half-size ``halves``) for the parameters flux and position;
    neighbours are taken as known. With ``core_half`` the position terms use only the
    central ``2 core_half + 1`` square (the fit box); ``None`` gives the full bound. For
    a source with non-positive flux only the flux bound (position known) is given and
    the position bounds are NaN.

    Returns
    -------
    sigma_flux, sigma_x, sigma_y : ndarray
    """
    flux = np.atleast_1d(np.asarray(flux, dtype=float))
    fisher = _fisher(psf, x, y, flux, noise, valid, halves, core_half)
    return _bounds(fisher, np.broadcast_to(flux, np.shape(np.atleast_1d(x))))


def debias_flux(flux, sigma_flux) -> np.ndarray:
    """Remove the second-order bias of a flux fitted together with its position.

    When position and flux are fitted to the same data, the position follows the noise
    towards higher flux: to second order ``E[f] = F + sigma_F**2 / F`` (white noise,
    ``sigma_F`` the flux error at known position; derivation in
    ``docs/point_sources.rst``). This returns ``f - sigma_F**2 / f``, limited to a
    reduction of 25 % (reached at S/N 2, where the expansion no longer holds).
    """
    f = np.asarray(flux, dtype=float)
    s = np.asarray(sigma_flux, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where((f > 0) & np.isfinite(s), np.maximum(0.75, 1.0 - (s / f) ** 2), 1.0)
    return f * factor


# ------------------------------------------------------------------ detection


def _filled(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return np.where(valid, image, 0.0)


def _matched_filter(snr_image: np.ndarray, psf: PSFModel, half: int) -> np.ndarray:
    """PSF-matched filter of an S/N image, scaled to unit noise for white noise."""
    k = psf.grid_kernel
    c = k.shape[0] // 2
    h = min(half, c)
    k = k[c - h : c + h + 1, c - h : c + h + 1]
    return signal.fftconvolve(snr_image, k[::-1, ::-1], mode="same") / np.sqrt(np.sum(k**2))


def _refine_peak(img: np.ndarray, px: np.ndarray, py: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Sub-pixel peak positions by a parabola through the 3 pixels along each axis."""
    ny, nx = img.shape
    xs = px.astype(float)
    ys = py.astype(float)
    inner_x = (px > 0) & (px < nx - 1)
    inner_y = (py > 0) & (py < ny - 1)
    for inner, delta, arr in ((inner_x, (0, 1), xs), (inner_y, (1, 0), ys)):
        i = np.flatnonzero(inner)
        if not i.size:
            continue
        yc, xc = py[i], px[i]
        lo = img[yc - delta[0], xc - delta[1]]
        mid = img[yc, xc]
        hi = img[yc + delta[0], xc + delta[1]]
        den = lo - 2 * mid + hi
        with np.errstate(divide="ignore", invalid="ignore"):
            off = np.where(den < 0, 0.5 * (lo - hi) / den, 0.0)
        arr[i] += np.clip(np.nan_to_num(off), -0.5, 0.5)
    return xs, ys


def _recentre(mf: np.ndarray, x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Move positions to the highest matched-filter pixel within 1 px, refined to sub-pixel."""
    ny, nx = mf.shape
    ix, iy = _nearest(x, y)
    ix = np.clip(ix, 0, nx - 1)
    iy = np.clip(iy, 0, ny - 1)
    win = _window(mf, ix, iy, 1, -np.inf)
    k = win.reshape(win.shape[0], -1).argmax(axis=1)
    px = np.clip(ix + k % 3 - 1, 0, nx - 1)
    py = np.clip(iy + k // 3 - 1, 0, ny - 1)
    return _refine_peak(mf, px, py)


def detection_image(image: np.ndarray, noise: np.ndarray, valid: np.ndarray, psf: PSFModel, method: str) -> np.ndarray:
    """The image thresholded by :func:`detect`: ``image/noise`` ("dao") or its PSF-matched filter ("peaks")."""
    z = _filled(image / np.where(valid, noise, 1.0), valid)
    if method == "dao":
        return z
    if method == "peaks":
        return _matched_filter(z, psf, fit_half_size(psf, 1.5))
    raise ValueError(f"detector must be 'dao' or 'peaks', got {method!r}")


def detect(
    stat: np.ndarray,
    valid: np.ndarray,
    psf: PSFModel,
    threshold: float,
    *,
    method: str = "dao",
    finder_kwargs: Optional[Dict[str, Any]] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detect point sources above ``threshold`` in a detection image (:func:`detection_image`).

    ``"dao"``: photutils ``DAOStarFinder`` with ``fwhm = psf.fwhm`` (the width of the PSF
    passed in, so the matched filter follows the calibrated PSF) and ``finder_kwargs``;
    its centroids (fitted Gaussian marginals, off by up to a pixel for undersampled
    PSFs) are then moved to the peak of the image filtered with the PSF itself within
    1 px. ``"peaks"``: photutils ``find_peaks`` (3 x 3 box) on the PSF-matched S/N map.
    Both refine the matched-filter peak to sub-pixel precision with parabolas.
    Detections on unusable pixels are dropped.

    Returns
    -------
    x, y : ndarray
        Positions (px).
    strength : ndarray
        Detection strength for ordering (DAO ``peak`` or matched-filter S/N).
    """
    from photutils.detection import DAOStarFinder, find_peaks

    empty = (np.zeros(0), np.zeros(0), np.zeros(0))
    if not valid.any():
        return empty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "dao":
            kwargs = dict(finder_kwargs or {})
            for key in ("roundness_range", "sharpness_range"):
                if key in kwargs and kwargs[key] is not None:
                    kwargs[key] = tuple(kwargs[key])
            try:
                finder = DAOStarFinder(threshold=threshold, fwhm=psf.fwhm, **kwargs)
            except TypeError as exc:
                raise InputError(f"finder_kwargs: {exc}") from None
            table = finder.find_stars(stat, mask=~valid)
            if table is None or len(table) == 0:
                return empty
            xc = "x_centroid" if "x_centroid" in table.colnames else "xcentroid"
            yc = "y_centroid" if "y_centroid" in table.colnames else "ycentroid"
            x = np.asarray(table[xc], dtype=float)
            y = np.asarray(table[yc], dtype=float)
            strength = np.asarray(table["peak"], dtype=float)
            fin = np.isfinite(x) & np.isfinite(y)
            x, y, strength = x[fin], y[fin], strength[fin]
            x, y = _recentre(_matched_filter(stat, psf, fit_half_size(psf, 1.5)), x, y)
        elif method == "peaks":
            table = find_peaks(stat, threshold, box_size=3, mask=~valid)
            if table is None or len(table) == 0:
                return empty
            px = np.asarray(table["x_peak"], dtype=int)
            py = np.asarray(table["y_peak"], dtype=int)
            x, y = _refine_peak(stat, px, py)
            strength = stat[py, px]
        else:
            raise ValueError(f"detector must be 'dao' or 'peaks', got {method!r}")
    ok = np.isfinite(x) & np.isfinite(y) & pixel_value(valid, x, y, fill=False)
    return x[ok], y[ok], strength[ok]


def find_leftover_peaks(
    residual: np.ndarray, noise: np.ndarray, valid: np.ndarray, k_sigma: float, box_size: int = 3
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Peaks of ``residual/noise`` above ``k_sigma`` x its background sigma (photutils ``find_peaks``).

    A peak counts only if no pixel of its ``box_size`` box is NaN or masked: next to a
    no-data region a rising edge (light of a source hidden there) is not a maximum.
    Returns peak positions refined to sub-pixel precision and their S/N.
    """
    from photutils.detection import find_peaks

    z = _filled(residual / np.where(valid, noise, 1.0), valid)
    s = background_sigma(z, ~valid)
    if not s > 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = find_peaks(z, k_sigma * s, box_size=int(box_size), mask=~valid)
    if table is None or len(table) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    px = np.asarray(table["x_peak"], dtype=int)
    py = np.asarray(table["y_peak"], dtype=int)
    whole = box_usable(valid, px, py, int(box_size) // 2)
    px, py = px[whole], py[whole]
    x, y = _refine_peak(z, px, py)
    return x, y, z[py, px] / s


def dedup(x, y, strength, ref_x=None, ref_y=None, radius: float = 1.0) -> np.ndarray:
    """Keep-mask of new positions: none within ``radius`` of a reference or of a stronger kept one.

    KD-tree queries; among the new positions the stronger (``strength``) wins.
    """
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    keep = np.ones(x.size, dtype=bool)
    if x.size == 0 or radius <= 0:
        return keep
    pts = np.c_[x, y]
    if ref_x is not None and np.size(ref_x):
        d, _ = cKDTree(np.c_[ref_x, ref_y]).query(pts, distance_upper_bound=radius)
        keep &= ~(d <= radius)
    tree = cKDTree(pts)
    order = np.argsort(-np.asarray(strength, dtype=float), kind="stable")
    taken = np.zeros(x.size, dtype=bool)
    for i in order:
        if not keep[i]:
            continue
        near = tree.query_ball_point(pts[i], radius)
        if any(taken[j] for j in near if j != i):
            keep[i] = False
        else:
            taken[i] = True
    return keep


# ------------------------------------------------------------------ diagnostics


def box_diagnostics(residual, noise, valid, x, y, flux, half: int) -> Dict[str, np.ndarray]:
    """Fit-quality numbers of each source on its fit box of the residual image.

    Returns
    -------
    dict of ndarray
        ``qfit`` = sum |residual| / flux over the usable box pixels and ``cfit`` =
        residual at the central pixel / flux (photutils definitions); ``z_centre`` =
        central residual / noise; ``chi`` = RMS of residual / noise over the box;
        ``n_pixels`` usable pixels in the box.
    """
    x = np.atleast_1d(np.asarray(x, dtype=float))
    flux = np.broadcast_to(np.asarray(flux, dtype=float), x.shape)
    ix, iy = _nearest(x, y)
    z = np.where(valid, residual / np.where(valid, noise, 1.0), 0.0)
    r = np.where(valid, residual, 0.0)
    rw = _window(r, ix, iy, half, 0.0)
    zw = _window(z, ix, iy, half, 0.0)
    vw = _window(valid, ix, iy, half, False)
    npix = vw.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        qfit = np.abs(rw).sum(axis=(1, 2)) / flux
        cfit = np.where(vw[:, half, half], rw[:, half, half] / flux, np.nan)
        zc = np.where(vw[:, half, half], zw[:, half, half], np.nan)
        chi = np.sqrt((zw**2).sum(axis=(1, 2)) / npix)
    return {"qfit": qfit, "cfit": cfit, "z_centre": zc, "chi": chi, "n_pixels": npix}


_SPREAD: "weakref.WeakKeyDictionary[PSFModel, PSFModel]" = weakref.WeakKeyDictionary()


def _exponential_kernel(scale: float, supersample: int = 9) -> np.ndarray:
    """Circular exponential ``exp(-r/scale)`` integrated over grid elements, odd, unit sum."""
    half = max(1, int(np.ceil(12.0 * scale)))
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    axis = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel()
    r = np.hypot(axis[:, None], axis[None, :])
    fine = np.exp(-r / scale)
    n = 2 * half + 1
    k = fine.reshape(n, supersample, n, supersample).sum(axis=(1, 3))
    return k / k.sum()


def spread_psf(psf: PSFModel) -> PSFModel:
    """The PSF convolved with a circular exponential of scale length ``FWHM/16`` (cached)."""
    psf = _model(psf)
    g = _SPREAD.get(psf)
    if g is None:
        scale = psf.fwhm * psf.oversample / 16.0
        g = psf.convolved(_exponential_kernel(scale), source=f"{psf.source} (x) exp(FWHM/16)")
        _SPREAD[psf] = g
    return g


def spread_model(residual, noise, valid, psf: PSFModel, x, y, flux, half: int) -> Tuple[np.ndarray, np.ndarray]:
    """SExtractor's SPREAD_MODEL and its error for each source.

    With ``p`` the image around the source (the residual plus the source's own model,
    i.e. its neighbours removed), ``phi`` the unit-flux PSF at the source position,
    ``G`` the PSF convolved with a circular exponential of scale length FWHM/16 (unit
    flux, same position) and ``W`` = 1 on usable pixels, 0 elsewhere, over a square of
    half-size ``half``::

        spread_model = (G.W.p)/(phi.W.p) - (G.W.phi)/(phi.W.phi)

    It is 0 for a point source, positive for extended and negative for sharper sources.
    Its error propagates independent pixel noise of variance ``V = noise**2`` to first
    order: with ``a = G.W.p`` and ``b = phi.W.p`` the gradient with respect to pixel
    ``k`` is ``W_k (G_k b - phi_k a) / b**2``, so::

        spread_model_err = sqrt(sum_k W_k V_k (G_k b - phi_k a)**2) / b**2

    Both are NaN where ``phi.W.p <= 0``.
    """
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    flux = np.broadcast_to(np.asarray(flux, dtype=float), x.shape)
    if x.size == 0:
        return np.zeros(0), np.zeros(0)
    phi, ix, iy = psf.stamps(x, y, half)
    g, _, _ = spread_psf(psf).stamps(x, y, half)  # same positions, so the same stamp frame
    w = _window(valid, ix, iy, half, False).astype(float)
    var = _window(np.where(valid, noise, 0.0) ** 2, ix, iy, half, 0.0)
    p = _window(np.where(valid, residual, 0.0), ix, iy, half, 0.0) + flux[:, None, None] * phi
    a = np.einsum("nij,nij,nij->n", w, g, p)
    b = np.einsum("nij,nij,nij->n", w, phi, p)
    c = np.einsum("nij,nij,nij->n", w, g, phi)
    d = np.einsum("nij,nij,nij->n", w, phi, phi)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = a / b - c / d
        grad = g * b[:, None, None] - phi * a[:, None, None]
        err = np.sqrt(np.einsum("nij,nij,nij->n", w, var, grad**2)) / b**2
    bad = ~(b > 0) | ~(d > 0)
    s[bad] = np.nan
    err[bad] = np.nan
    return s, err


# ----------------------------------------------------------------------- cuts


@attrs.frozen
class CutSettings:
    """Quality-cut thresholds (the ``cuts_*`` options of ``[psf.ladder]``).

    Attributes
    ----------
    pos_err_max : float
        Largest ``x_err``/``y_err`` (px).
    res_cen_sigma : float
        ``N`` of the central-residual cut (noise units).
    cfit_sigma : float
        ``N`` of the one-sided sigma clip of ``cfit``.
    drift_factor : float
        Largest drift from the detected position, in units of the median drift.
    snr_min : float
        Smallest ``flux / flux_err``.
    drift_floor : float
        Smallest median drift used (px), so that near-zero medians do not reject all.
    """

    pos_err_max: float = 2.0
    res_cen_sigma: float = 3.0
    cfit_sigma: float = 3.0
    drift_factor: float = 3.0
    snr_min: float = 1.0
    drift_floor: float = 0.05


CUT_NAMES = ("pos_err", "res_cen", "cfit", "drift", "snr")


def quality_cuts(values: Dict[str, np.ndarray], settings: CutSettings) -> Tuple[np.ndarray, Dict[str, int]]:
    """Apply the quality cuts to a set of freshly fitted sources.

    ``values`` holds arrays ``x_err, y_err, z_centre, chi, cfit, drift, flux, flux_err``.
    A source is rejected by

    * ``pos_err``: ``x_err`` or ``y_err`` > ``pos_err_max`` (or not finite);
    * ``res_cen``: central residual below ``-3 N`` sigma, or below ``-N`` sigma while the
      box RMS residual exceeds ``N`` sigma (``N = res_cen_sigma``): a centre strongly
      over-subtracted (not a point source, or a duplicate);
    * ``cfit``: ``cfit`` below ``median - cfit_sigma x std`` of the sigma-clipped
      ``cfit`` of the set (std floored at 0.01). One-sided: only centres that the PSF
      over-subtracts (extended objects) are rejected; sharper-than-PSF centres are
      left to SPREAD_MODEL;
    * ``drift``: distance from the detected position > ``drift_factor`` x the median
      distance of the set (the median floored at ``drift_floor`` px);
    * ``snr``: ``flux/flux_err < snr_min`` (or not finite).

    Returns
    -------
    keep : ndarray of bool
    counts : dict
        Rejections per cut (a source failing two cuts counts in both) and
        ``"rejected"`` (sources failing any).
    """
    n = values["flux"].size
    fails = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        fails["pos_err"] = ~((values["x_err"] <= settings.pos_err_max) & (values["y_err"] <= settings.pos_err_max))
        N = settings.res_cen_sigma
        zc = values["z_centre"]
        fails["res_cen"] = (zc < -3 * N) | ((zc < -N) & (values["chi"] > N))
        cfit = values["cfit"]
        fails["cfit"] = np.zeros(n, dtype=bool)
        fin = np.isfinite(cfit)
        if np.count_nonzero(fin) >= 3:
            _, med, std = clipped_stats(cfit[fin], sigma=settings.cfit_sigma)
            fails["cfit"] = cfit < med - settings.cfit_sigma * max(std, 0.01)
        drift = values["drift"]
        fails["drift"] = np.zeros(n, dtype=bool)
        if np.isfinite(drift).any():
            ref = max(float(np.nanmedian(drift)), settings.drift_floor)
            fails["drift"] = drift > settings.drift_factor * ref
        fails["snr"] = ~(values["flux"] >= settings.snr_min * values["flux_err"])
    bad = np.zeros(n, dtype=bool)
    for f in fails.values():
        bad |= f
    counts = {k: int(np.count_nonzero(v)) for k, v in fails.items()}
    counts["rejected"] = int(np.count_nonzero(bad))
    return ~bad, counts


# --------------------------------------------------------------- finalisation


def finalize(
    image: np.ndarray,
    system: PixelSystem,
    psf: PSFModel,
    x,
    y,
    flux,
    flux_err,
    flags,
    *,
    tolerance: float,
    fit_half: int,
    positions_fitted: bool = False,
    ids=None,
    stats: Optional[Dict[str, Any]] = None,
) -> PointSourceResult:
    """Build the :class:`PointSourceResult` of a set of sources with known fluxes.

    With ``positions_fitted`` (the positions were fitted on this image), the fluxes are
    first corrected for the position-fitting bias (:func:`debias_flux`). Then it
    renders the model from exactly these sources (:func:`render_table` with
    ``tolerance`` and ``fit_half``), computes the residual, ``x_err``/``y_err`` (Cramer-Rao bounds at
    the fitted flux, neighbours known), ``qfit``/``cfit`` on the fit box,
    SPREAD_MODEL and its error, and sets afresh (the bits given in ``flags`` are
    replaced) the flags ``EDGE`` (fit box beyond the image), ``NEAR_NODATA`` (an unusable
    image pixel within 1 FWHM; pixels beyond the border do not count), ``BLENDED`` (another source within 1 FWHM) and ``SINGULAR`` (no
    finite flux error); the other given bits are kept. ``noise_level`` is the clipped
    robust sigma of the final residual on the usable pixels.
    """
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    flux = np.atleast_1d(np.asarray(flux, dtype=float))
    flags = np.array(flags, dtype=np.int64, ndmin=1)
    recomputed = SOURCE_FLAGS.EDGE | SOURCE_FLAGS.NEAR_NODATA | SOURCE_FLAGS.BLENDED | SOURCE_FLAGS.SINGULAR
    flags = np.broadcast_to(flags, x.shape) & ~recomputed
    noise = system.noise
    valid = system.valid
    n = x.size
    sigma = noise_at(noise, valid, x, y)
    halves = stamp_halves(psf, flux, sigma, tolerance, fit_half)
    fisher = _fisher(psf, x, y, flux, noise, valid, halves, fit_half)
    if positions_fitted and n:
        with np.errstate(divide="ignore", invalid="ignore"):
            corrected = debias_flux(flux, 1.0 / np.sqrt(fisher[:, 0, 0]))
            r = np.where(flux > 0, corrected / flux, 1.0)
        # the position rows/columns of the Fisher matrix scale with the flux
        fisher[:, 0, 1:] *= r[:, None]
        fisher[:, 1:, 0] *= r[:, None]
        fisher[:, 1:, 1:] *= (r**2)[:, None, None]
        flux = corrected
        halves = stamp_halves(psf, flux, sigma, tolerance, fit_half)
    # the table rendered (what render_table gives for these fluxes)
    model = model_image(system.shape, psf, x, y, flux, halves)
    residual = np.where(system.valid, image - model, np.nan)
    if n:
        _, sx, sy = _bounds(fisher, flux)
        diag = box_diagnostics(residual, noise, valid, x, y, flux, fit_half)
        spread, spread_err = spread_model(residual, noise, valid, psf, x, y, flux, fit_half_size(psf, 2.0))
        ix, iy = _nearest(x, y)
        ny, nx = system.shape
        edge = (ix - fit_half < 0) | (iy - fit_half < 0) | (ix + fit_half >= nx) | (iy + fit_half >= ny)
        flags[edge] |= SOURCE_FLAGS.EDGE
        r = max(1, int(np.ceil(psf.fwhm)))
        kk = np.arange(-r, r + 1)
        disc = (kk[:, None] ** 2 + kk[None, :] ** 2) <= psf.fwhm**2
        # pixels beyond the image border are not no-data (the border is EDGE's business)
        near_bad = (~_window(valid, ix, iy, r, True) & disc).any(axis=(1, 2))
        flags[near_bad] |= SOURCE_FLAGS.NEAR_NODATA
        if n > 1:
            d, _ = cKDTree(np.c_[x, y]).query(np.c_[x, y], k=2)
            flags[d[:, 1] <= psf.fwhm] |= SOURCE_FLAGS.BLENDED
        flux_err = np.asarray(flux_err, dtype=float)
        flags[~np.isfinite(flux_err)] |= SOURCE_FLAGS.SINGULAR
    else:
        sx = sy = spread = spread_err = np.zeros(0)
        diag = {"qfit": np.zeros(0), "cfit": np.zeros(0)}
    table = SourceTable.from_columns(
        x,
        y,
        flux,
        flux_err=flux_err,
        x_err=sx,
        y_err=sy,
        flags=flags,
        spread_model=spread,
        spread_model_err=spread_err,
        qfit=diag["qfit"],
        cfit=diag["cfit"],
    )
    if ids is not None:
        table = table.with_columns(id=np.asarray(ids, dtype=np.int64))
    _, _, level = clipped_stats(residual, ~valid)
    stats = dict(stats or {})
    stats["n_sources"] = n
    return PointSourceResult(sources=table, model=model, noise_level=float(level), stats=stats)


# ----------------------------------------------------------------- utilities


def match_sources(x_ref, y_ref, x, y, radius: float) -> Tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of positions to reference positions within ``radius`` px.

    Pairs are taken in order of increasing distance (KD-tree), each position and each
    reference used at most once.

    Returns
    -------
    i_ref, i : ndarray of int
        Indices of the matched pairs.
    """
    ref = np.c_[np.atleast_1d(x_ref), np.atleast_1d(y_ref)]
    pts = np.c_[np.atleast_1d(x), np.atleast_1d(y)]
    if len(ref) == 0 or len(pts) == 0:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    pairs = cKDTree(ref).sparse_distance_matrix(cKDTree(pts), radius, output_type="ndarray")
    order = np.argsort(pairs["v"], kind="stable")
    used_r = np.zeros(len(ref), dtype=bool)
    used_p = np.zeros(len(pts), dtype=bool)
    out_r, out_p = [], []
    for k in order:
        i, j = pairs["i"][k], pairs["j"][k]
        if not used_r[i] and not used_p[j]:
            used_r[i] = used_p[j] = True
            out_r.append(i)
            out_p.append(j)
    return np.asarray(out_r, dtype=int), np.asarray(out_p, dtype=int)


def simulate_star_field(shape, psf: PSFModel, x, y, flux, sigma: float, rng, tolerance: float = 1e-3):
    """Injection helper: point sources on an image plus Gaussian noise of ``sigma``.

    The sources are rendered with all their light (:func:`model_image`, exact stamps
    holding every wing pixel above ``tolerance * sigma``). Returns ``(noisy, noiseless)``.
    """
    halves = stamp_halves(psf, flux, sigma, tolerance)
    clean = model_image(shape, psf, x, y, flux, halves)
    return clean + rng.normal(0.0, sigma, shape), clean
