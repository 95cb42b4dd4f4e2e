"""Preparation of a galaxy before fitting: centre and size guess, crops, noise maps.

All steps are NaN-safe. Crops keep every output coordinate on the input grid: the
offset of the cutout is recorded in :attr:`Galaxy.crop_offset` and added back by the
writers.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import attrs
import numpy as np
from scipy import ndimage

from .data import Galaxy
from .errors import DegenerateCutoutError
from .stats import clipped_stats, noise_map

__all__ = ["GalaxyGuess", "guess_galaxy", "crop", "initial_crop", "auto_crop", "prepare"]

log = logging.getLogger(__name__)

#: smallest allowed ``auto_crop_min_size`` (pixels)
MIN_CROP = 31


@attrs.frozen
class GalaxyGuess:
    """Rough galaxy geometry from image moments (pixels, radians CCW from +x)."""

    x: float
    y: float
    size: float  # Gaussian-equivalent sigma
    ellip: float
    theta: float
    background: float
    flux: float

    def sersic_start(self) -> dict:
        """Starting values for a Sersic fit (amplitude is solved linearly anyway)."""
        return {
            "x_0": self.x,
            "y_0": self.y,
            "r_eff": max(1.0, 1.2 * self.size),
            "n": 2.0,
            "ellip": float(np.clip(self.ellip, 0.05, 0.7)),
            "theta": self.theta % np.pi,
        }


def _smooth(image: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing that ignores invalid pixels (normalised convolution)."""
    w = valid.astype(float)
    num = ndimage.gaussian_filter(np.where(valid, image, 0.0), sigma, mode="constant")
    den = ndimage.gaussian_filter(w, sigma, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[den < 1e-3] = np.nan
    return out


def _radial_median(img: np.ndarray, valid: np.ndarray, cx: float, cy: float, rmax: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Azimuthal median (robust to stars), its uncertainty and the annulus radii."""
    yy, xx = np.indices(img.shape)
    r = np.hypot(xx - cx, yy - cy)
    ring = np.floor(r).astype(int)
    use = valid & (r < rmax)
    edges = np.arange(int(rmax) + 1)
    med = np.full(edges.size, np.nan)
    err = np.full(edges.size, np.nan)
    order = np.argsort(ring[use], kind="stable")
    rr, vv = ring[use][order], img[use][order]
    bounds = np.searchsorted(rr, np.arange(edges.size + 1))
    for k in range(edges.size):
        v = vv[bounds[k] : bounds[k + 1]]
        if v.size >= 3:
            med[k] = np.median(v)
            err[k] = 1.2533 * 1.4826 * np.median(np.abs(v - med[k])) / np.sqrt(v.size)
    return edges + 0.5, med, err


def guess_galaxy(
    image: np.ndarray,
    mask: Optional[np.ndarray] = None,
    centre_region: float = 0.5,
    psf_fwhm: float = 2.0,
) -> GalaxyGuess:
    """Centre, size and orientation of the (roughly centred) galaxy.

    * background: the sigma-clipped median of the image;
    * centre: the brightest pixel, within the central ``centre_region`` of the frame,
      of the image median-filtered over a box about three PSF FWHM wide (which erases
      point sources, however bright, but keeps an extended galaxy) and smoothed
      (sigma 3 px, NaN-aware), refined by a centroid with a 3-px Gaussian weight;
    * size: from the azimuthal *median* profile (insensitive to the foreground stars):
      the half-light radius of the profile out to where it fades into the noise,
      converted to a Gaussian-equivalent sigma (``r_half / 1.1774``);
    * ellipticity and angle: second moments within a Gaussian weight of that size.

    Raises
    ------
    DegenerateCutoutError
        Too few finite pixels, or no positive signal above the background.
    """
    img = np.asarray(image, dtype=float)
    valid = np.isfinite(img)
    if mask is not None:
        valid &= ~mask
    if valid.sum() < 25:
        raise DegenerateCutoutError("the base band has fewer than 25 usable pixels; nothing to fit")
    _, bkg, _ = clipped_stats(img[valid])
    img = img - bkg
    box = max(5, 2 * int(np.ceil(1.5 * psf_fwhm)) + 1)
    starless = ndimage.median_filter(np.where(valid, img, 0.0), size=box, mode="nearest")
    sm = _smooth(starless, valid, 3.0)
    ny, nx = img.shape
    y0, y1 = int(ny * (1 - centre_region) / 2), int(np.ceil(ny * (1 + centre_region) / 2))
    x0, x1 = int(nx * (1 - centre_region) / 2), int(np.ceil(nx * (1 + centre_region) / 2))
    core = sm[y0:y1, x0:x1]
    if not np.isfinite(core).any() or not np.nanmax(core) > 0:
        raise DegenerateCutoutError("no galaxy signal above the background in the central region of the base band")
    iy, ix = np.unravel_index(np.nanargmax(core), core.shape)
    cx, cy = float(ix + x0), float(iy + y0)
    yy, xx = np.mgrid[:ny, :nx].astype(float)
    pos = np.where(np.isfinite(sm), np.clip(sm, 0.0, None), 0.0)
    for _ in range(5):
        w = pos * np.exp(-0.5 * ((xx - cx) ** 2 + (yy - cy) ** 2) / 9.0)
        if not w.sum() > 0:
            break
        cx, cy = float((w * xx).sum() / w.sum()), float((w * yy).sum() / w.sum())
    rmax = max(8.0, 0.5 * min(ny, nx))
    r, med, err = _radial_median(img, valid, cx, cy, rmax)
    ok = np.isfinite(med)
    if not ok.any() or not np.nanmax(med) > 0:
        raise DegenerateCutoutError("no galaxy signal above the background in the base band")
    # the profile ends where it first fades below twice its uncertainty
    faint = np.flatnonzero(ok & (med < 2.0 * np.where(np.isfinite(err), err, 0.0)))
    end = int(faint[0]) if faint.size else int(np.flatnonzero(ok)[-1]) + 1
    end = max(end, 3)
    prof = np.where(ok[:end], np.clip(med[:end], 0.0, None), 0.0)
    cum = np.cumsum(2 * np.pi * r[:end] * prof)
    if not cum[-1] > 0:
        raise DegenerateCutoutError("no galaxy signal above the background in the base band")
    r_half = float(np.interp(0.5 * cum[-1], cum, r[:end] + 0.5))
    size = float(np.clip(r_half / 1.1774, 1.0, 0.5 * max(ny, nx)))
    w = pos * np.exp(-0.5 * ((xx - cx) ** 2 + (yy - cy) ** 2) / size**2)
    dx, dy = xx - cx, yy - cy
    tot = w.sum()
    q = np.array([[(w * dx * dx).sum(), (w * dx * dy).sum()], [(w * dx * dy).sum(), (w * dy * dy).sum()]]) / tot
    evals, evecs = np.linalg.eigh(q)
    ellip = float(1.0 - np.sqrt(max(evals[0], 1e-9) / max(evals[1], 1e-9)))
    theta = float(np.arctan2(evecs[1, 1], evecs[0, 1]) % np.pi)
    flux = float(cum[-1])
    log.debug("galaxy guess: centre (%.2f, %.2f), size %.2f px, ellip %.2f, theta %.2f", cx, cy, size, ellip, theta)
    return GalaxyGuess(cx, cy, size, ellip, theta, float(bkg), flux)


def crop(galaxy: Galaxy, x0: int, y0: int, x1: int, y1: int) -> Galaxy:
    """Cut every band to rows ``y0:y1`` and columns ``x0:x1`` (cutout frame of ``galaxy``)."""
    bands = {}
    for flt, band in galaxy.bands.items():
        cut = lambda a: None if a is None else np.array(a[y0:y1, x0:x1])  # noqa: E731
        bands[flt] = attrs.evolve(
            band,
            data=cut(band.data),
            noise=cut(band.noise),
            mask=cut(band.mask),
            galaxy_model=cut(band.galaxy_model),
            star_model=cut(band.star_model),
            sky_model=cut(band.sky_model),
        )
    ox, oy = galaxy.crop_offset
    return attrs.evolve(galaxy, bands=bands, crop_offset=(ox + int(x0), oy + int(y0)))


def initial_crop(galaxy: Galaxy, fraction: float) -> Galaxy:
    """Keep the central ``fraction`` of each axis (1 = no crop)."""
    if fraction >= 1:
        return galaxy
    ny, nx = galaxy.shape
    hy, hx = max(1, int(round(ny * fraction / 2))), max(1, int(round(nx * fraction / 2)))
    cy, cx = ny // 2, nx // 2
    return crop(galaxy, max(0, cx - hx), max(0, cy - hy), min(nx, cx + hx + 1), min(ny, cy + hy + 1))


def auto_crop(galaxy: Galaxy, guess: GalaxyGuess, factor: float, min_size: int = MIN_CROP) -> Tuple[Galaxy, GalaxyGuess]:
    """Crop to +- ``factor`` x size around the guessed centre, but to a side of at least
    ``min_size`` pixels (clipped to the image)."""
    ny, nx = galaxy.shape
    half = max(int(np.ceil(factor * guess.size)), max(int(min_size), MIN_CROP) // 2)
    cx, cy = int(round(guess.x)), int(round(guess.y))
    x0, x1 = max(0, cx - half), min(nx, cx + half + 1)
    y0, y1 = max(0, cy - half), min(ny, cy + half + 1)
    if (x0, y0, x1, y1) == (0, 0, nx, ny):
        return galaxy, guess
    out = crop(galaxy, x0, y0, x1, y1)
    return out, attrs.evolve(guess, x=guess.x - x0, y=guess.y - y0)


def prepare(galaxy: Galaxy, config) -> Tuple[Galaxy, GalaxyGuess]:
    """Initial crop, centre/size guess on the base band, auto-crop, noise maps.

    Returns the prepared galaxy (a new object) and the guess in its cutout frame.
    """
    prep = config.prep
    g = initial_crop(galaxy, prep.custom_initial_crop)
    base = g.bands[g.base_filter]
    guess = guess_galaxy(base.data, base.mask, psf_fwhm=base.psf.fwhm)
    if prep.auto_crop:
        g, guess = auto_crop(g, guess, prep.auto_crop_factor, prep.auto_crop_min_size)
    for flt, band in g.bands.items():
        if not np.isfinite(band.data).any():
            raise DegenerateCutoutError(f"band {flt} has no finite pixels inside the crop")
        if band.noise is None:
            band.noise = noise_map(band.data, band.mask)
    ox, oy = g.crop_offset
    g.meta.update(
        centre_guess=[guess.x + ox, guess.y + oy],
        size_guess=guess.size,
        crop_offset=list(g.crop_offset),
        crop_shape=list(g.shape),
    )
    log.info(
        "%s: centre guess (%.1f, %.1f), size %.1f px; fitting a %dx%d cutout at offset (%d, %d)",
        g.name, guess.x + ox, guess.y + oy, guess.size, g.shape[1], g.shape[0], ox, oy,
    )
    return g, guess
