"""Robust statistics shared by the stages (NaN-safe, not inflated by stars).

* :func:`robust_sigma`: 1.4826 x MAD of the finite values.
* :func:`clipped_stats`: iteratively sigma-clipped mean, median and MAD-based std.
* :func:`background_sigma`: noise level of an image whose outliers are mostly
  *positive* (stars): the width of the lower half of the clipped distribution around
  its mode, so that undetected faint stars neither shift nor widen it.
* :func:`noise_map`: a per-pixel noise map (1 sigma) when the data come without one,
  from :func:`background_sigma` in boxes, smoothly interpolated.
* :func:`correlated_error_factor`: how much larger a linear amplitude's error is than
  the per-pixel noise says, given the residual's spatial correlation.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from scipy import ndimage

__all__ = ["MAD_TO_SIGMA", "robust_sigma", "clipped_stats", "background_sigma", "noise_map", "correlated_error_factor"]

#: fewest usable values for a noise estimate
_MIN_VALUES = 10

#: sigma of a Gaussian per median absolute deviation
MAD_TO_SIGMA = 1.482602218505602


def _finite_values(values, mask: Optional[np.ndarray]) -> np.ndarray:
    """The finite values not masked (``mask`` is cast to bool: 0/1 arrays work too)."""
    v = np.asarray(values, dtype=float)
    if mask is not None:
        v = v[~np.asarray(mask, dtype=bool)]
    return v[np.isfinite(v)]


def robust_sigma(values, mask: Optional[np.ndarray] = None) -> float:
    """1.4826 x median absolute deviation of the finite, unmasked values (NaN if none)."""
    v = _finite_values(values, mask)
    if v.size == 0:
        return float("nan")
    med = np.median(v)
    return float(MAD_TO_SIGMA * np.median(np.abs(v - med)))


def clipped_stats(values, mask: Optional[np.ndarray] = None, sigma: float = 3.0, maxiters: int = 10) -> Tuple[float, float, float]:
    """Iteratively sigma-clipped (mean, median, std) with a MAD-based std.

    Pixels more than ``sigma`` robust standard deviations from the median are rejected
    until nothing changes (at most ``maxiters`` passes). Stars and other positive
    outliers therefore neither shift the level nor inflate the noise.
    """
    v = _finite_values(values, mask)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    for _ in range(maxiters):
        med = np.median(v)
        std = MAD_TO_SIGMA * np.median(np.abs(v - med))
        if not std > 0:
            break
        keep = np.abs(v - med) <= sigma * std
        if keep.all():
            break
        v = v[keep]
    med = float(np.median(v))
    std = float(MAD_TO_SIGMA * np.median(np.abs(v - med)))
    return float(np.mean(v)), med, std


def background_sigma(values, mask: Optional[np.ndarray] = None, sigma: float = 3.0, maxiters: int = 10) -> float:
    """Noise level (1 sigma) of an image with positive contamination (stars).

    The values are first sigma-clipped (:func:`clipped_stats`). The mode is estimated
    as ``3 median - 2 mean`` of the clipped values (it sits below the median when faint
    sources skew the distribution), and sigma is 1.4826 x the median distance to the
    mode of the values *below* it. Stars only add positive values, so this lower half
    is the pure noise distribution; on pure Gaussian noise the result equals
    :func:`robust_sigma` within its statistical error.

    Parameters
    ----------
    values : array_like
        Image or values (NaN ignored).
    mask : ndarray of bool, optional
        ``True`` = ignore.
    sigma, maxiters : float, int
        Clipping parameters passed to :func:`clipped_stats`.

    Returns
    -------
    float
        NaN if fewer than 10 usable values.
    """
    v = _finite_values(values, mask)
    if v.size < _MIN_VALUES:
        return float("nan")
    mean, med, std = clipped_stats(v, sigma=sigma, maxiters=maxiters)
    if not std > 0:
        return float(std)
    kept = v[np.abs(v - med) <= sigma * std]
    mode = min(3.0 * med - 2.0 * mean, med)
    below = mode - kept[kept <= mode]
    if below.size < _MIN_VALUES:
        return float(std)
    return float(MAD_TO_SIGMA * np.median(below))


def noise_map(
    image,
    mask: Optional[np.ndarray] = None,
    box_size: int = 32,
    sigma: float = 3.0,
    min_fraction: float = 0.3,
) -> np.ndarray:
    """Per-pixel 1-sigma noise map of an image that comes without one.

    The image is cut into ``box_size`` x ``box_size`` boxes; each box with at least
    ``min_fraction`` usable pixels gets :func:`background_sigma` of its pixels, a 3 x 3
    median filter over the boxes removes outliers (boxes dominated by a bright star),
    boxes without an estimate take the median of the others, and the grid is
    interpolated bilinearly between box centres (constant beyond the outer centres).
    Source photon noise is not included (no gain is known): the map is the background
    noise.

    Parameters
    ----------
    image : ndarray
        2-D image, NaN = no data.
    mask : ndarray of bool, optional
        ``True`` = pixel not used.
    box_size : int
        Box side in pixels; an image smaller than two boxes gets a constant map.
    sigma : float
        Clipping threshold.
    min_fraction : float
        Minimum fraction of usable pixels for a box to get its own estimate.

    Returns
    -------
    ndarray
        Same shape as ``image``, finite and positive everywhere (NaN-only input gives
        an all-NaN map).
    """
    img = np.asarray(image, dtype=float)
    bad = ~np.isfinite(img)
    if mask is not None:
        bad |= np.asarray(mask, dtype=bool)
    ny, nx = img.shape
    box = max(int(box_size), 8)
    nby, nbx = max(1, ny // box), max(1, nx // box)
    if nby < 2 and nbx < 2:
        return np.full(img.shape, background_sigma(img, bad, sigma=sigma))
    ey = np.linspace(0, ny, nby + 1).astype(int)
    ex = np.linspace(0, nx, nbx + 1).astype(int)
    grid = np.full((nby, nbx), np.nan)
    for j in range(nby):
        for i in range(nbx):
            sub = img[ey[j] : ey[j + 1], ex[i] : ex[i + 1]]
            subbad = bad[ey[j] : ey[j + 1], ex[i] : ex[i + 1]]
            if np.count_nonzero(~subbad) >= min_fraction * sub.size:
                grid[j, i] = background_sigma(sub, subbad, sigma=sigma)
    good = np.isfinite(grid) & (grid > 0)
    if not good.any():
        return np.full(img.shape, background_sigma(img, bad, sigma=sigma))
    grid[~good] = np.median(grid[good])
    grid = ndimage.median_filter(grid, size=3, mode="nearest")
    cy = 0.5 * (ey[:-1] + ey[1:]) - 0.5
    cx = 0.5 * (ex[:-1] + ex[1:]) - 0.5
    fy = np.interp(np.arange(ny), cy, np.arange(nby))
    fx = np.interp(np.arange(nx), cx, np.arange(nbx))
    return ndimage.map_coordinates(grid, np.meshgrid(fy, fx, indexing="ij"), order=1, mode="nearest")


def correlated_error_factor(
    residual,
    noise,
    region: np.ndarray,
    model,
    usable: Optional[np.ndarray] = None,
    max_lag: int = 8,
    clip: float = 5.0,
    min_pixels: int = 400,
) -> float:
    """Ratio of a linear amplitude's true error to the one from independent pixels.

    The error of the amplitude of ``model`` fitted by weighted least squares is
    ``1 / sqrt(sum u^2)`` with ``u = model / noise`` if the pixels' noise is
    independent. Resampled (drizzled) mosaics and the light of unresolved stars make
    neighbouring pixels of the residual correlated; the variance is then
    ``sum_d xi(d) A(d) / (sum u^2)^2``, with ``xi`` the autocorrelation of
    ``residual / noise`` and ``A`` that of ``u``. ``xi`` is measured on ``region``
    (pixels the model does not dominate, e.g. the sky region) for lags up to
    ``max_lag`` pixels in x and y, with ``residual / noise`` clipped at ``clip`` (a few
    badly subtracted stars do not dominate it); ``A`` over ``usable`` pixels. Returns
    ``sqrt(sum_d xi(d) A(d) / A(0))``, at least 1 (the factor never shrinks an
    error), or 1 when ``region`` has fewer than ``min_pixels`` usable pixels.
    ``xi(0)`` is the residual's variance in units of the noise map's, so residual
    scatter the noise map misses (the noise map is the background noise) counts too.
    """
    r = np.asarray(residual, dtype=float)
    n = np.asarray(noise, dtype=float) * np.ones(r.shape)
    good = np.isfinite(r) & np.isfinite(n) & (n > 0)
    reg = good & np.asarray(region, dtype=bool)
    if int(reg.sum()) < min_pixels:
        return 1.0
    z = np.zeros(r.shape)
    z[reg] = np.clip(r[reg] / n[reg], -clip, clip)
    z[reg] -= z[reg].mean()
    use = good if usable is None else good & np.asarray(usable, dtype=bool)
    u = np.zeros(r.shape)
    m = np.asarray(model, dtype=float)
    ok = use & np.isfinite(m)
    u[ok] = m[ok] / n[ok]
    a0 = float(np.sum(u * u))
    if not a0 > 0:
        return 1.0
    lag = int(max(0, min(max_lag, min(r.shape) // 4)))
    pad = [s + lag for s in r.shape]

    def autocorr(img):
        f = np.fft.rfft2(img, s=pad)
        c = np.fft.irfft2(f * np.conj(f), s=pad)
        # lags -lag..lag on both axes, zero lag in the middle
        return np.roll(np.roll(c, lag, axis=0), lag, axis=1)[: 2 * lag + 1, : 2 * lag + 1]

    pairs = autocorr(reg.astype(float))
    xi = np.where(pairs > 0.5 * pairs[lag, lag], autocorr(z) / np.maximum(pairs, 1.0), 0.0)
    total = float(np.sum(xi * autocorr(u))) / a0
    return float(np.sqrt(max(total, 1.0)))
