"""Synthetic multi-band galaxy fields with known truth (``sphot simulate``, the demo, tests).

A field holds a Sersic galaxy (one shape, a brightness per band, optionally a small
per-band offset of the whole band as between HST and JWST mosaics), foreground stars
at common positions (plus that offset) with power-law fluxes and random colours, a tilted sky plane, Gaussian
noise and optionally a NaN wedge like a detector edge. PSFs are the given ones (a
folder or HDF5 file, as for ``sphot run``) or built-in analytic Moffat effective PSFs,
so nothing has to be supplied.

The galaxy is rendered by brute force, independently of sphot's renderer: the
profile is sampled on the PSF's oversampled grid (averaged over sub-samples near the
centre), convolved with the oversampled PSF (FFT, every sub-pixel phase normalised to
unit sum) and sampled at pixel centres (in phase with the PSF origin). Stars use :meth:`PSFModel.render` with stamps holding all of
the PSF.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
from scipy import fft as sfft

from .errors import InputError
from .io import atomic_path, ensure_output_dir, read_psfs, zeropoint_mjy_per_sr
from .psf import PSFModel
from .sersic import sersic_bn, sersic_enclosed_fraction, sersic_total_flux

__all__ = [
    "analytic_psf",
    "render_sersic_reference",
    "simulate_field",
    "simulate_to_file",
    "DEFAULT_GALAXY",
    "ANALYTIC_FWHM",
    "DEFAULT_COLOURS",
]

log = logging.getLogger(__name__)

#: FWHM (pixels at 0.03"/px) of the built-in analytic PSFs, close to the real ones
ANALYTIC_FWHM = {"F555W": 2.3, "F814W": 2.5, "F090W": 1.3, "F150W": 1.8, "F160W": 5.0, "F277W": 3.1}
#: galaxy colours, magnitude minus the base-band magnitude
DEFAULT_COLOURS = {"F555W": 2.0, "F814W": 0.9, "F090W": 0.6, "F150W": 0.0, "F160W": -0.05, "F277W": -0.45}
#: galaxy shape in units of the image size (centre) and pixels
DEFAULT_GALAXY = {"r_eff": 9.0, "n": 2.2, "ellip": 0.3, "theta": 0.7}


def analytic_psf(fwhm: float, oversample: int = 4, beta: float = 3.0, half: int = 25) -> np.ndarray:
    """A round Moffat profile of ``fwhm`` image pixels on a grid ``oversample`` x finer.

    Returned as an odd-sized array (origin in the middle) to be used as an effective
    PSF; the profile is averaged over 3 x 3 sub-samples of each element.
    """
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0)) * oversample
    n = 2 * half * oversample + 1
    sub = (np.arange(3) - 1) / 3.0
    c = np.arange(n) - n // 2
    r2 = (c[:, None, None, None] + sub[None, None, :, None]) ** 2 + (c[None, :, None, None] + sub[None, None, None, :]) ** 2
    img = (1.0 + r2 / alpha**2) ** (-beta)
    return img.mean(axis=(2, 3))


def _sersic_on(x, y, params: Mapping[str, float]) -> np.ndarray:
    q = 1.0 - params["ellip"]
    ct, st = np.cos(params["theta"]), np.sin(params["theta"])
    dx, dy = x - params["x_0"], y - params["y_0"]
    xm = dx * ct + dy * st
    ym = -dx * st + dy * ct
    r = np.sqrt(xm**2 + (ym / q) ** 2)
    bn = sersic_bn(params["n"])
    return params["amplitude"] * np.exp(-bn * ((r / params["r_eff"]) ** (1.0 / params["n"]) - 1.0))


def render_sersic_reference(shape, psf: PSFModel, params: Mapping[str, float], sub: int = 4) -> np.ndarray:
    """Brute-force PSF-convolved Sersic image (see the module docstring)."""
    os_ = psf.oversample
    ny, nx = shape
    oy, ox = psf.origin
    pad = psf.half_extent
    # fine grid covering the image plus the PSF reach, element centres in image pixels
    fy = (np.arange((ny + 2 * pad) * os_) - pad * os_) / os_
    fx = (np.arange((nx + 2 * pad) * os_) - pad * os_) / os_
    fine = _sersic_on(fx[None, :], fy[:, None], params)
    # near the centre, average each element over sub x sub samples (then 4 x finer
    # still in the innermost element ring), where the profile varies within an element
    for n_sub, reach in ((sub, 4.0), (4 * sub, 0.5)):
        offs = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) / os_
        ky = np.flatnonzero(np.abs(fy - params["y_0"]) <= reach)
        kx = np.flatnonzero(np.abs(fx - params["x_0"]) <= reach)
        acc = np.zeros((ky.size, kx.size))
        for dy in offs:
            for dx in offs:
                acc += _sersic_on(fx[kx][None, :] + dx, fy[ky][:, None] + dy, params)
        fine[np.ix_(ky, kx)] = acc / n_sub**2
    # every sub-pixel phase of the PSF is normalised to unit sum, as sphot does (an ideal
    # effective PSF has equal phase sums; the F090W file's differ by up to 3 %), and
    # each element of the oversampled array then weighs 1/os^2 of a pixel
    kern = np.array(psf.array, dtype=float)
    for py in range(os_):
        for px in range(os_):
            block = kern[(oy + py) % os_ :: os_, (ox + px) % os_ :: os_]
            block /= block.sum()
    kern /= os_ * os_
    shape_full = (fine.shape[0] + kern.shape[0] - 1, fine.shape[1] + kern.shape[1] - 1)
    fsize = [sfft.next_fast_len(s, real=True) for s in shape_full]
    conv = sfft.irfft2(sfft.rfft2(fine, fsize) * sfft.rfft2(kern, fsize), fsize)
    # output element (i, j) of the full convolution sits at fine index (i - oy, j - ox)
    rows = (np.arange(ny) + pad) * os_ + oy
    cols = (np.arange(nx) + pad) * os_ + ox
    return conv[np.ix_(rows, cols)]


def _psfs(psf, filters: Sequence[str]) -> Dict[str, PSFModel]:
    if psf is None:
        out = {}
        for f in filters:
            fwhm = ANALYTIC_FWHM.get(f, 2.0)
            out[f] = PSFModel.from_array(analytic_psf(fwhm), 4, filter=f, source=f"analytic Moffat FWHM {fwhm} px")
        return out
    if isinstance(psf, Mapping):
        return dict(psf)
    return read_psfs(psf, list(filters))


def simulate_field(
    filters: Sequence[str] = ("F090W", "F150W", "F277W"),
    *,
    base_filter: str = "F150W",
    size: int = 151,
    n_stars: int = 150,
    seed: int = 1,
    snr: float = 300.0,
    snr_every_band: bool = False,
    psf=None,
    galaxy: Optional[Mapping[str, float]] = None,
    colours: Optional[Mapping[str, float]] = None,
    offsets: Optional[Mapping[str, Sequence[float]]] = None,
    nan_edges: bool = True,
    star_flux_range: Sequence[float] = (5.0, 5000.0),
    star_slope: float = 1.5,
    base_mag: float = 19.0,
    pixel_scale: float = 0.03,
    star_free_radius: float = 0.0,
    star_free_min_flux: float = 0.0,
) -> Dict[str, Any]:
    """Build a field; returns ``{"images": {filter: array}, "psfs": {...}, "truth": {...}}``.

    ``snr``: galaxy signal-to-noise in the base band, defined as the flux within the
    ellipse of semi-major axis ``2 r_eff`` over ``sigma sqrt(area)``. The noise of
    another band scales as ``10**(-0.2 colour)`` (a redder band is fainter and
    shallower: S/N ``snr x 10**(-0.2 colour)``), or as ``10**(-0.4 colour)`` with
    ``snr_every_band`` (every band at S/N ``snr``). Star fluxes are in
    units of that noise sigma times ``star_flux_range`` (power law dN/dF ~ F^-slope).
    ``base_mag``: AB magnitude of the galaxy in the base band (MJy/sr at
    ``pixel_scale``). ``colours``: magnitude minus the base magnitude per filter.
    ``star_free_radius``: no star closer than this (pixels) to the galaxy centre (a
    star superposed on the nucleus cannot be told from it). ``star_free_min_flux``:
    only stars at least this bright (base band, in the units of ``star_flux_range``)
    are kept out; the fainter ones are placed anywhere, so that the unresolved
    foreground stays even (0: every star is kept out).
    """
    filters = list(filters)
    if base_filter not in filters:
        raise InputError(f"simulate: the base filter {base_filter} must be among the filters {filters}")
    if size < 31:
        raise InputError(f"simulate: size must be at least 31 pixels, got {size}")
    rng = np.random.default_rng(seed)
    psfs = _psfs(psf, filters)
    zp = zeropoint_mjy_per_sr(pixel_scale)
    shape = (size, size)
    centre = (size - 1) / 2.0
    gal = {"x_0": centre + 0.37, "y_0": centre - 0.21, **DEFAULT_GALAXY, **(galaxy or {})}
    colours = {**DEFAULT_COLOURS, **(colours or {})}
    offsets = dict(offsets or {})
    # stars: common positions, power-law fluxes in the base band, random colours
    xs = rng.uniform(-0.5, size - 0.5, n_stars)
    ys = rng.uniform(-0.5, size - 0.5, n_stars)
    near = np.hypot(xs - gal["x_0"], ys - gal["y_0"]) < star_free_radius
    while near.any():  # redraw, keeping the random stream reproducible
        xs[near] = rng.uniform(-0.5, size - 0.5, near.sum())
        ys[near] = rng.uniform(-0.5, size - 0.5, near.sum())
        near = np.hypot(xs - gal["x_0"], ys - gal["y_0"]) < star_free_radius
    lo, hi = star_flux_range
    u = rng.uniform(size=n_stars)
    a = 1.0 - star_slope
    rel = (lo**a + u * (hi**a - lo**a)) ** (1.0 / a)
    star_colour = rng.normal(0.0, 0.4, n_stars)
    if star_free_min_flux > 0:
        # a stream of its own, so that the other draws (and the fields without the
        # option) stay as they were
        faint = rel < star_free_min_flux
        aux = np.random.default_rng([seed, 1])
        xs[faint] = aux.uniform(-0.5, size - 0.5, faint.sum())
        ys[faint] = aux.uniform(-0.5, size - 0.5, faint.sum())
    # noise of the base band from the requested S/N
    base_flux = 10 ** (-0.4 * (base_mag - zp))
    unit = {**gal, "amplitude": 1.0}
    total_unit = sersic_total_flux(1.0, gal["r_eff"], gal["n"], gal["ellip"])
    inside_2re = float(sersic_enclosed_fraction(2.0 * gal["r_eff"], gal["r_eff"], gal["n"]))
    area = np.pi * (2 * gal["r_eff"]) ** 2 * (1 - gal["ellip"])
    sigma_base = base_flux * inside_2re / (snr * np.sqrt(area))
    images: Dict[str, np.ndarray] = {}
    truth_bands: Dict[str, Any] = {}
    yy, xx = np.mgrid[:size, :size].astype(float)
    nan_mask = None
    if nan_edges:
        # a slanted strip along the top edge and a corner triangle, like mosaic edges
        nan_mask = (yy > 0.88 * size + 0.06 * (xx - centre)) | (xx + yy < 0.12 * size)
    for f in filters:
        colour = colours.get(f, 0.0)
        mag = base_mag + colour
        flux = 10 ** (-0.4 * (mag - zp))
        dx, dy = offsets.get(f, (0.0, 0.0))
        params = {**unit, "x_0": gal["x_0"] + dx, "y_0": gal["y_0"] + dy, "amplitude": flux / total_unit}
        psf_f = psfs[f]
        img = render_sersic_reference(shape, psf_f, params)
        band_snr = snr if snr_every_band else snr * 10 ** (-0.2 * colour)
        sigma = sigma_base * 10 ** (-0.4 * colour) * snr / band_snr  # flux scales as 10**(-0.4 colour)
        star_flux = sigma * rel * 10 ** (-0.4 * star_colour * (f != base_filter))
        # a mosaic offset shifts everything in the band: the stars move with the galaxy
        img += psf_f.render(shape, xs + dx, ys + dy, star_flux, half=psf_f.half_extent)
        sky = {"c0": float(rng.uniform(0.2, 0.8) * 10 * sigma), "cx": float(rng.normal(0, 0.02 * sigma)), "cy": float(rng.normal(0, 0.02 * sigma))}
        img += sky["c0"] + sky["cx"] * (xx - centre) + sky["cy"] * (yy - centre)
        img += rng.normal(0.0, sigma, shape)
        if nan_mask is not None and f in (base_filter, filters[0]):
            img[nan_mask] = np.nan
        images[f] = img
        truth_bands[f] = {
            "amplitude": params["amplitude"],
            "x_0": params["x_0"],
            "y_0": params["y_0"],
            "offset": [float(dx), float(dy)],
            "flux": flux,
            "mag": mag,
            "colour": colour,
            "noise_sigma": sigma,
            "snr": band_snr,
            "sky": sky,
            "psf": psf_f.source,
            "psf_fwhm": psf_f.fwhm,
            "star_flux": star_flux.tolist(),
        }
    truth = {
        "seed": seed,
        "shape": list(shape),
        "base_filter": base_filter,
        "pixel_scale": pixel_scale,
        "zeropoint": zp,
        "snr": snr,
        "galaxy": {k: float(v) for k, v in gal.items()},
        "bands": truth_bands,
        "stars": {"x": xs.tolist(), "y": ys.tolist(), "star_free_radius": star_free_radius, "star_free_min_flux": star_free_min_flux},
        "pixel_convention": "0-based, pixel (0,0) centre at (0.0, 0.0)",
    }
    return {"images": images, "psfs": psfs, "truth": truth}


def simulate_to_file(
    output,
    *,
    psf=None,
    filters: Sequence[str] = ("F090W", "F150W", "F277W"),
    **kwargs,
) -> Dict[str, Path]:
    """Write a simulated field: ``OUTPUT`` (galaxy HDF5), ``OUTPUT_truth.json`` and, for
    the built-in analytic PSFs, ``OUTPUT_psf.h5`` (use it as ``--psf``)."""
    import h5py

    out = Path(output)
    ensure_output_dir(out.parent if str(out.parent) else ".")
    field = simulate_field(filters, psf=psf, **kwargs)
    paths: Dict[str, Path] = {}
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            for flt, img in field["images"].items():
                f.create_dataset(flt, data=img)
    paths["galaxy"] = out
    truth_path = out.with_name(out.stem + "_truth.json")
    with atomic_path(truth_path) as tmp:
        tmp.write_text(json.dumps(field["truth"], indent=1))
    paths["truth"] = truth_path
    if psf is None:
        psf_path = out.with_name(out.stem + "_psf.h5")
        with atomic_path(psf_path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.attrs["oversample"] = 4
                for flt, p in field["psfs"].items():
                    f.create_dataset(flt, data=p.array)
        paths["psf"] = psf_path
    return paths
