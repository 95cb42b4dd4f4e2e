"""Aperture (Petrosian) photometry on the fitted bands of a galaxy.

One elliptical aperture is defined on the isophotes of one band (the *isophote band*,
by default the engine's base band) and applied unchanged to every band:

1. **Isophotal ellipses** (:func:`isophotal_ellipses`). For enclosed-light fractions
   ``f`` from ``isophot_frac_min`` to ``isophot_frac_max`` the pixels brighter than the
   level that encloses the fraction ``f`` of the light form a region; its connected
   part around the galaxy centre gives an ellipse from its first and second moments
   (centre, axis ratio and angle), scaled so that the ellipse area equals the pixel
   count of the region.
2. **Petrosian ratio** (:func:`petrosian_aperture`). The ratio of the surface
   brightness *at* an ellipse to the mean surface brightness *inside* it is
   ``eta = (dF/dA) / (F/A) = d ln F / d ln A`` (``F`` the enclosed flux, ``A`` the
   ellipse area). The enclosed fluxes of the ladder of ellipses (exact-overlap
   photometry) give ``ln F`` versus ``ln A``; a cubic smoothing spline with the
   smoothing chosen by generalised cross-validation is differentiated analytically,
   and the aperture where ``eta`` first falls to ``petro`` is interpolated between
   the ellipses of the ladder.
3. **Per band** (:func:`measure_band`). Flux in the aperture on the star-subtracted
   image (``data - stars``) with pixels without data filled from the band's model,
   minus the sky in the aperture: the sky model summed over the
   aperture plus the mean residual level measured in copies of the aperture placed at
   random (seeded) positions on the masked residual, away from the galaxy and from
   pixels without data. The scatter of those copies is the empirical background error
   of an aperture of this shape (correlated noise, sky structure and residual stars
   included).
4. **PSF-matching correction** (:func:`psf_correction`) to the resolution of one band
   (``PSF_corr_base_filter``, by default the one with the smallest PSF FWHM):
   ``dmag = mag_raw - (the magnitude at the base band's resolution)``, positive when
   the band's PSF puts less light into the aperture than the base band's PSF;
   ``mag_corr = mag_raw - dmag``.

:func:`run_aperture_photometry` runs everything and returns the rows of
``NAME_aperture.csv`` (columns :data:`APERTURE_COLUMNS`, flags :data:`APERTURE_FLAGS`).
Coordinates in the rows are on the input image grid; all other coordinates in this
module are cutout pixels (0-based, pixel centres at integers, arrays ``[y, x]``).
"""

from __future__ import annotations

import logging
import math
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import attrs
import numpy as np
from scipy import ndimage, signal
from scipy.interpolate import make_smoothing_spline

from .data import Band, Galaxy
from .errors import ConfigError, DegenerateCutoutError, InputError
from .flags import Flag, FlagRegistry
from .io import zeropoint_mjy_per_sr
from .calibrate import _centred
from .sersic import MAG_PER_LN_FLUX, magnitude
from .stats import clipped_stats, noise_map

__all__ = [
    "APERTURE_COLUMNS",
    "APERTURE_FLAGS",
    "ApertureGeometry",
    "ApertureOptions",
    "BandPhotometry",
    "Isophote",
    "PetrosianResult",
    "SkyApertures",
    "aperture_sum",
    "filled_net_image",
    "isophotal_ellipses",
    "matching_kernel",
    "measure_band",
    "petrosian_aperture",
    "psf_correction",
    "run_aperture_photometry",
    "science_aperture",
    "sky_apertures",
    "zeropoint_mjy_per_sr",
]

log = logging.getLogger(__name__)

#: smallest region (pixels) that defines an isophotal ellipse
MIN_ISOPHOTE_PIXELS = 5
#: smallest number of ladder apertures with positive flux for the Petrosian spline
MIN_PETROSIAN_SAMPLES = 5
#: fewer accepted sky apertures than this sets ``FEW_SKY_APERTURES``
MIN_SKY_APERTURES = 20
#: points of the grid on which the smoothed Petrosian ratio is searched
_ETA_GRID = 2000

#: columns of ``NAME_aperture.csv``, in order
APERTURE_COLUMNS = (
    "filter",
    "flux",
    "flux_err",
    "sky",
    "sky_err",
    "mag_raw",
    "mag_raw_err",
    "dmag_psf",
    "dmag_psf_err",
    "mag_corr",
    "mag_corr_err",
    "frac_enclosed",
    "aper_x",
    "aper_y",
    "aper_a",
    "aper_b",
    "aper_theta",
    "flags",
)

APERTURE_FLAGS = FlagRegistry(
    "Aperture photometry flags, column ``flags`` of NAME_aperture.csv",
    [
        Flag(
            1,
            "PETRO_NOT_BRACKETED",
            "the Petrosian ratio never reached ``petro`` on the isophote ladder; the nearest end of the ladder was used",
        ),
        Flag(
            2,
            "NAN_FILLED",
            "some aperture pixels had no data (NaN or masked) and were filled (``fill_replace_with``)",
        ),
        Flag(
            4,
            "TOO_MUCH_FILLED",
            "more than ``fill_max_nan_frac`` of the aperture had no data: flux and magnitudes are NaN",
        ),
        Flag(8, "FEW_SKY_APERTURES", "fewer than 20 sky apertures fitted on the residual; the sky error is uncertain"),
        Flag(
            16,
            "NO_SKY_APERTURES",
            "no sky aperture fitted on the residual: no residual sky offset, errors from the noise map only",
        ),
        Flag(32, "NONPOSITIVE_FLUX", "the sky-subtracted aperture flux is not positive: magnitudes are NaN"),
        Flag(64, "NO_PSF_CORRECTION", "the PSF-matching correction was requested but could not be computed"),
        Flag(128, "NOT_MEASURED", "the band has no usable fit (failed, or no galaxy model): the row is empty"),
    ],
)

_IMAGE_CHOICES = ("galaxy_model", "star_subtracted")
_FILL_CHOICES = ("model", "median")
_WINDOW_CHOICES = ("none", "tukey", "cosine_bell", "tophat")


# ----------------------------------------------------------------------------- options


def _option(default, help: str, *validators):
    """An options field with its one-line ``help`` (shown in the configuration reference)."""
    return attrs.field(default=default, validator=list(validators), metadata={"help": help})


def _fraction_order(instance, attribute, value):
    if not value > instance.isophot_frac_min:
        raise ValueError(f"isophot_frac_max ({value}) must exceed isophot_frac_min ({instance.isophot_frac_min})")


_v = attrs.validators


@attrs.frozen
class ApertureOptions:
    """Options of the ``[aperture]`` table.

    Every field carries a one-line ``help`` in its metadata; ``docs/aperture.rst``
    explains each in context.
    """

    petro: float = _option(
        0.5, "Petrosian ratio (surface brightness at the aperture / mean inside) that selects the aperture",
        _v.gt(0.0), _v.lt(1.0),
    )
    center_mask: float = _option(
        4.0, "sky apertures are not centred inside the science ellipse scaled by this factor", _v.ge(1.0)
    )
    isophot_base_filter: str = _option("", "band whose image defines the isophotes; empty = the base band")
    isophot_frac_min: float = _option(
        0.05, "smallest enclosed-light fraction of the isophote ladder", _v.gt(0.0), _v.lt(1.0)
    )
    isophot_frac_max: float = _option(
        0.95, "largest enclosed-light fraction of the isophote ladder", _v.gt(0.0), _v.le(1.0), _fraction_order
    )
    n_isophotes: int = _option(100, "number of steps of the isophote ladder", _v.ge(MIN_PETROSIAN_SAMPLES))
    fit_isophot_to: str = _option(
        "galaxy_model", "image the isophotes are drawn on: galaxy_model or star_subtracted", _v.in_(_IMAGE_CHOICES)
    )
    petro_profile_on: str = _option(
        "galaxy_model", "image whose enclosed fluxes give the Petrosian ratio: galaxy_model or star_subtracted",
        _v.in_(_IMAGE_CHOICES),
    )
    fill_max_nan_frac: float = _option(
        0.7, "largest fraction of the aperture without data that may be filled; above it the band is not measured",
        _v.ge(0.0), _v.le(1.0),
    )
    fill_replace_with: str = _option(
        "model", "fill pixels without data from the band's model or the median at the same elliptical radius",
        _v.in_(_FILL_CHOICES),
    )
    PSF_corr_base_filter: str = _option(
        "", "band whose resolution mag_corr refers to; empty = the band with the smallest PSF FWHM"
    )
    correct_PSF: bool = _option(True, "compute the PSF-matching correction (dmag_psf, mag_corr)")
    n_sky_apertures: int = _option(200, "random sky apertures per band", _v.ge(0))
    seed: int = _option(0, "seed of the sky-aperture placement (combined with the filter name)")
    match_window: str = _option(
        "none", "Fourier window of the PSF-matching kernel: none, tukey, cosine_bell or tophat",
        _v.in_(_WINDOW_CHOICES),
    )
    match_window_param: float = _option(
        0.5, "the window's parameter (tukey/cosine_bell alpha, tophat beta)", _v.ge(0.0), _v.le(1.0)
    )
    match_regularization: float = _option(
        1e-4, "Fourier ratios where the source PSF's transfer function is below this fraction of its peak are zeroed",
        _v.ge(0.0), _v.lt(1.0),
    )


# ---------------------------------------------------------------------------- geometry


@attrs.frozen
class ApertureGeometry:
    """An elliptical aperture in cutout pixel coordinates.

    Attributes
    ----------
    x, y : float
        Centre (pixel centres at integers).
    a, b : float
        Semi-major and semi-minor axes, pixels (``a >= b > 0``).
    theta : float
        Angle of the major axis, radians counter-clockwise from +x, in [0, pi).
    """

    x: float
    y: float
    a: float
    b: float
    theta: float

    @property
    def area(self) -> float:
        return math.pi * self.a * self.b

    @property
    def axis_ratio(self) -> float:
        return self.b / self.a

    def photutils(self):
        """The same aperture as a :class:`photutils.aperture.EllipticalAperture`."""
        from photutils.aperture import EllipticalAperture

        return EllipticalAperture((self.x, self.y), a=self.a, b=self.b, theta=self.theta)

    def scaled(self, factor: float) -> "ApertureGeometry":
        """Both axes multiplied by ``factor``, same centre and angle."""
        return attrs.evolve(self, a=self.a * factor, b=self.b * factor)

    def weights(self, shape: Tuple[int, int]) -> np.ndarray:
        """Exact overlap of every pixel of an image of ``shape`` with the ellipse (0..1)."""
        image = self.photutils().to_mask(method="exact").to_image(shape)
        return np.zeros(shape) if image is None else image

    def elliptical_radius(self, shape: Tuple[int, int]) -> np.ndarray:
        """Semi-major axis of the similar ellipse through each pixel centre (pixels)."""
        yy, xx = np.indices(shape, dtype=float)
        dx, dy = xx - self.x, yy - self.y
        c, s = math.cos(self.theta), math.sin(self.theta)
        u = dx * c + dy * s
        v = (-dx * s + dy * c) / self.axis_ratio
        return np.hypot(u, v)


def _ellipse_from_pixels(xs: np.ndarray, ys: np.ndarray) -> ApertureGeometry:
    """Moment ellipse of a pixel set with the area of the set.

    A uniformly filled ellipse of semi-axes (a, b) has coordinate variances a^2/4 and
    b^2/4 along its axes; each pixel adds the 1/12 variance of a unit box. The moment
    axes are rescaled so that pi a b equals the number of pixels.
    """
    n = xs.size
    xc, yc = float(xs.mean()), float(ys.mean())
    dx, dy = xs - xc, ys - yc
    cxx = float(np.mean(dx * dx)) + 1.0 / 12.0
    cyy = float(np.mean(dy * dy)) + 1.0 / 12.0
    cxy = float(np.mean(dx * dy))
    half_trace = 0.5 * (cxx + cyy)
    root = math.hypot(0.5 * (cxx - cyy), cxy)
    lam_max, lam_min = half_trace + root, max(half_trace - root, 1e-12)
    a0, b0 = 2.0 * math.sqrt(lam_max), 2.0 * math.sqrt(lam_min)
    scale = math.sqrt(n / (math.pi * a0 * b0))
    theta = 0.5 * math.atan2(2.0 * cxy, cxx - cyy) % math.pi
    return ApertureGeometry(xc, yc, a0 * scale, b0 * scale, theta)


# ---------------------------------------------------------------------------- isophotes


@attrs.frozen
class Isophote:
    """One step of the isophote ladder.

    Attributes
    ----------
    fraction : float
        Fraction of the light of the galaxy's footprint in pixels at or above ``level``.
    level : float
        The surface-brightness level, image units per pixel.
    npix : int
        Pixels of the connected region around the centre (= ellipse area).
    geometry : ApertureGeometry
    """

    fraction: float
    level: float
    npix: int
    geometry: ApertureGeometry


def isophotal_ellipses(
    image: np.ndarray,
    fractions: Sequence[float],
    centre: Optional[Tuple[float, float]] = None,
) -> List[Isophote]:
    """Moment ellipses of the regions enclosing given fractions of the light.

    Parameters
    ----------
    image : ndarray
        The image (NaN pixels are ignored).
    fractions : sequence of float
        Enclosed-light fractions in (0, 1].
    centre : (x, y), optional
        The galaxy centre. Default: the brightest pixel.

    Returns
    -------
    list of Isophote
        One per distinct region of at least :data:`MIN_ISOPHOTE_PIXELS` pixels, in
        order of increasing size.

    Notes
    -----
    The galaxy's light is that of its footprint, the connected region of positive
    pixels around ``centre``. Every region is reduced to its connected part around the
    centre too, so a level whose region falls apart (a companion, a star) still gives
    an ellipse.
    """
    img = np.asarray(image, dtype=float)
    finite = np.isfinite(img)
    if not (finite & (img > 0)).any():
        return []
    if centre is None:
        iy, ix = np.unravel_index(np.argmax(np.where(finite, img, -np.inf)), img.shape)
    else:
        ix, iy = int(round(centre[0])), int(round(centre[1]))
    footprint = _central_region(finite & (img > 0), img, (iy, ix))
    values = np.sort(img[footprint])[::-1]
    light = np.cumsum(values)
    light /= light[-1]
    out: List[Isophote] = []
    last_npix = 0
    for f in np.sort(np.asarray(fractions, dtype=float)):
        level = values[min(int(np.searchsorted(light, f)), values.size - 1)]
        region = _central_region(footprint & (img >= level), img, (iy, ix))
        ys, xs = np.nonzero(region)
        if xs.size < MIN_ISOPHOTE_PIXELS or xs.size == last_npix:
            continue
        last_npix = xs.size
        out.append(Isophote(float(f), float(level), int(xs.size), _ellipse_from_pixels(xs, ys)))
    return out


def _central_region(region: np.ndarray, image: np.ndarray, centre: Tuple[int, int]) -> np.ndarray:
    """The connected part of ``region`` containing ``centre`` (else its brightest part)."""
    labels, n = ndimage.label(region)
    if n <= 1:
        return region
    iy, ix = centre
    inside = 0 <= iy < region.shape[0] and 0 <= ix < region.shape[1]
    label = labels[iy, ix] if inside else 0
    if label == 0:
        label = labels.flat[np.argmax(np.where(region, image, -np.inf))]
    return labels == label


# ---------------------------------------------------------------------------- Petrosian


@attrs.frozen(eq=False)
class PetrosianResult:
    """The science aperture and how it was found.

    Attributes
    ----------
    aperture : ApertureGeometry
        The aperture where the smoothed Petrosian ratio equals ``petro``.
    filter : str
        Band that defined it.
    petro : float
    isophotes : tuple of Isophote
        The ladder used (positive enclosed flux only).
    fluxes : ndarray
        Enclosed flux of each ladder aperture on the profile image.
    eta : ndarray
        Smoothed Petrosian ratio at each ladder aperture.
    eta_raw : ndarray
        Finite-difference Petrosian ratio (neighbouring steps) at each ladder
        aperture; NaN at both ends. For plots and checks only.
    bracketed : bool
        Whether ``eta`` crossed ``petro`` inside the ladder.
    flags : int
        :data:`APERTURE_FLAGS` bits (``PETRO_NOT_BRACKETED``).
    """

    aperture: ApertureGeometry
    filter: str
    petro: float
    isophotes: Tuple[Isophote, ...]
    fluxes: np.ndarray
    eta: np.ndarray
    eta_raw: np.ndarray
    bracketed: bool
    flags: int = 0

    @property
    def semi_major_axes(self) -> np.ndarray:
        return np.array([iso.geometry.a for iso in self.isophotes])


def aperture_sum(image: np.ndarray, weights: np.ndarray) -> float:
    """``sum(weights * image)`` over the pixels with non-zero weight (NaN elsewhere ignored)."""
    sel = weights > 0
    return float(np.sum(weights[sel] * image[sel]))


def petrosian_aperture(
    profile_image: np.ndarray, isophotes: Sequence[Isophote], petro: float = 0.5, *, where: str = "image"
) -> PetrosianResult:
    """Choose the aperture where the Petrosian ratio equals ``petro``.

    Parameters
    ----------
    profile_image : ndarray
        NaN-free image whose enclosed fluxes define the light profile.
    isophotes : sequence of Isophote
        The ladder (from :func:`isophotal_ellipses`).
    petro : float
        The target ratio (0 < petro < 1).
    where : str
        Label for messages (e.g. the filter).

    Raises
    ------
    DegenerateCutoutError
        Fewer than :data:`MIN_PETROSIAN_SAMPLES` ladder apertures with finite, positive
        enclosed flux.
    """
    fluxes = np.array([aperture_sum(profile_image, iso.geometry.weights(profile_image.shape)) for iso in isophotes])
    good = np.isfinite(fluxes) & (fluxes > 0)
    if np.count_nonzero(good) < MIN_PETROSIAN_SAMPLES:
        raise DegenerateCutoutError(
            f"aperture photometry ({where}): only {np.count_nonzero(good)} isophotal apertures with positive "
            f"enclosed flux (need {MIN_PETROSIAN_SAMPLES}); the galaxy is too small or too faint there"
        )
    ladder = tuple(iso for iso, g in zip(isophotes, good) if g)
    fluxes = fluxes[good]
    ln_area = np.log([iso.geometry.area for iso in ladder])
    ln_flux = np.log(fluxes)
    spline = make_smoothing_spline(ln_area, ln_flux)
    slope = spline.derivative()
    grid = np.linspace(ln_area[0], ln_area[-1], _ETA_GRID)
    eta_grid = slope(grid)
    ln_area_p, bracketed = _first_crossing(grid, eta_grid, petro)
    if not bracketed:
        log.warning("aperture photometry (%s): Petrosian ratio never reaches %.3g on the isophote ladder", where, petro)
    return PetrosianResult(
        aperture=_interpolate_geometry(ladder, ln_area, ln_area_p),
        filter=where,
        petro=petro,
        isophotes=ladder,
        fluxes=fluxes,
        eta=slope(ln_area),
        eta_raw=_finite_difference_eta(ln_area, ln_flux),
        bracketed=bracketed,
        flags=0 if bracketed else APERTURE_FLAGS.PETRO_NOT_BRACKETED,
    )


def _first_crossing(grid: np.ndarray, eta: np.ndarray, petro: float) -> Tuple[float, bool]:
    """First downward crossing of ``petro`` (linear interpolation), or the nearest end."""
    above = eta > petro
    down = np.nonzero(above[:-1] & ~above[1:])[0]
    if down.size:
        i = down[0]
        t = (eta[i] - petro) / (eta[i] - eta[i + 1])
        return float(grid[i] + t * (grid[i + 1] - grid[i])), True
    return float(grid[-1] if above.all() else grid[0]), False


def _finite_difference_eta(ln_area: np.ndarray, ln_flux: np.ndarray) -> np.ndarray:
    eta = np.full(ln_area.shape, np.nan)
    eta[1:-1] = (ln_flux[2:] - ln_flux[:-2]) / (ln_area[2:] - ln_area[:-2])
    return eta


def _interpolate_geometry(ladder: Sequence[Isophote], ln_area: np.ndarray, ln_area_p: float) -> ApertureGeometry:
    """Ellipse of area exp(ln_area_p) with centre, axis ratio and angle interpolated on the ladder."""
    g = [iso.geometry for iso in ladder]
    x = np.interp(ln_area_p, ln_area, [e.x for e in g])
    y = np.interp(ln_area_p, ln_area, [e.y for e in g])
    q = np.interp(ln_area_p, ln_area, [e.axis_ratio for e in g])
    two_theta = np.interp(ln_area_p, ln_area, np.unwrap([2.0 * e.theta for e in g]))
    area = math.exp(ln_area_p)
    a = math.sqrt(area / (math.pi * q))
    return ApertureGeometry(float(x), float(y), a, float(q * a), float(0.5 * two_theta % math.pi))


# ---------------------------------------------------------------------------- band images


def _noise_map(band: Band) -> np.ndarray:
    """Per-pixel 1-sigma noise with no NaN: the band's map, gaps set to its median.

    Without a map: :func:`sphot_core.stats.noise_map` of the full residual (usable
    pixels only), which follows depth variations across the cutout.
    """
    if band.noise is None:
        return noise_map(band.residual(), ~band.valid)
    noise = np.array(band.noise, dtype=float)
    bad = ~np.isfinite(noise)
    if bad.any():
        noise[bad] = np.median(noise[~bad]) if (~bad).any() else np.nan
    return noise


def filled_net_image(band: Band, mode: str = "model", ring_geometry: Optional[ApertureGeometry] = None) -> np.ndarray:
    """``data - stars - sky`` with pixels without data (NaN or masked) filled.

    ``mode="model"`` fills with the galaxy model; ``"median"`` with the median of the
    data at the same elliptical radius of ``ring_geometry`` (1-pixel rings of the
    semi-major axis), the galaxy model where a ring has no data.
    """
    net = band.residual(galaxy=False)
    invalid = ~band.valid
    if not invalid.any():
        return net
    model = band.component("galaxy")
    net[invalid] = model[invalid]
    if mode == "median":
        ring = np.floor(ring_geometry.elliptical_radius(band.shape)).astype(int)
        valid = ~invalid
        for r in np.unique(ring[invalid]):
            in_ring = ring == r
            data = net[in_ring & valid]
            if data.size:
                net[in_ring & invalid] = np.median(data)
    return net


def _profile_image(band: Band, kind: str) -> np.ndarray:
    if kind == "galaxy_model":
        return np.asarray(band.galaxy_model, dtype=float)
    return filled_net_image(band, "model")


# ---------------------------------------------------------------------------- sky


@attrs.frozen(eq=False)
class SkyApertures:
    """Copies of the science aperture on the masked residual.

    Attributes
    ----------
    sums : ndarray
        Residual summed in each accepted copy.
    centres : ndarray, shape (n, 2)
        ``(x, y)`` of each copy.
    offset : float
        Sigma-clipped mean of ``sums``: the residual sky in one aperture (0 if none).
    scatter : float
        Robust standard deviation of ``sums``: background error of one aperture (NaN if
        none).
    noise_variance : float
        Median over the copies of the noise-map variance summed in the aperture.
    n_independent : float
        Effective number of independent copies, ``N^2 sum(w^2) / sum(C^2)`` with ``w``
        the aperture weights and ``C`` the coverage map (sum of the weights of all
        copies): ``N`` for disjoint copies, 1 for identical ones. The error of
        ``offset`` is ``scatter / sqrt(n_independent)``.
    """

    sums: np.ndarray
    centres: np.ndarray
    offset: float
    scatter: float
    noise_variance: float
    n_independent: float

    @property
    def n(self) -> int:
        return int(self.sums.size)


def sky_apertures(
    residual: np.ndarray,
    valid: np.ndarray,
    aperture: ApertureGeometry,
    rng: np.random.Generator,
    *,
    n_apertures: int = 200,
    center_mask: float = 4.0,
    noise: Optional[np.ndarray] = None,
) -> SkyApertures:
    """Place copies of ``aperture`` on the residual and sum the residual in each.

    The copies keep the science aperture's shape, orientation and sub-pixel phase (so
    their exact-overlap weights are identical) and are shifted by whole pixels to
    positions drawn without replacement from all allowed positions: every pixel a copy
    touches must be valid and inside the image, and its centre must lie outside the
    science ellipse scaled by ``center_mask``.
    """
    shape = residual.shape
    mask = aperture.photutils().to_mask(method="exact")
    box = mask.bbox
    w = mask.data
    footprint = (w > 0).astype(float)
    h, wd = w.shape
    empty = SkyApertures(np.zeros(0), np.zeros((0, 2)), 0.0, np.nan, np.nan, 0.0)
    if h > shape[0] or wd > shape[1] or n_apertures == 0:
        return empty
    usable = valid & np.isfinite(residual)
    # number of unusable pixels under a copy whose bounding box starts at (row, col)
    bad = signal.fftconvolve((~usable).astype(float), footprint[::-1, ::-1], mode="valid")
    rows, cols = np.nonzero(bad < 0.5)
    cx = aperture.x + (cols - box.ixmin)
    cy = aperture.y + (rows - box.iymin)
    outside = _outside_scaled(aperture, cx, cy, center_mask)
    rows, cols, cx, cy = rows[outside], cols[outside], cx[outside], cy[outside]
    if rows.size == 0:
        return empty
    pick = rng.choice(rows.size, size=min(n_apertures, rows.size), replace=False)
    rows, cols = rows[pick], cols[pick]
    noise2 = None if noise is None else noise**2
    sums, var = np.empty(rows.size), np.empty(rows.size)
    coverage = np.zeros(shape)
    for k, (r, c) in enumerate(zip(rows, cols)):
        sums[k] = np.sum(w * residual[r : r + h, c : c + wd])
        var[k] = np.nan if noise2 is None else np.sum(w * w * noise2[r : r + h, c : c + wd])
        coverage[r : r + h, c : c + wd] += w
    mean, _, std = clipped_stats(sums)
    # overlapping copies share pixels: effective number of independent apertures
    n_indep = sums.size**2 * float(np.sum(w * w)) / float(np.sum(coverage**2))
    return SkyApertures(sums, np.column_stack([cx[pick], cy[pick]]), mean, std, float(np.median(var)), n_indep)


def _outside_scaled(aperture: ApertureGeometry, x, y, scale: float) -> np.ndarray:
    c, s = math.cos(aperture.theta), math.sin(aperture.theta)
    dx, dy = np.asarray(x) - aperture.x, np.asarray(y) - aperture.y
    u = (dx * c + dy * s) / (scale * aperture.a)
    v = (-dx * s + dy * c) / (scale * aperture.b)
    return u * u + v * v >= 1.0


# ---------------------------------------------------------------------------- one band


@attrs.frozen(eq=False)
class BandPhotometry:
    """Aperture photometry of one band (before the PSF correction).

    Attributes
    ----------
    filter : str
    flux, flux_err : float
        Sky-subtracted flux in the aperture and its 1-sigma error, image units.
    sky, sky_err : float
        Sky subtracted from the aperture sum (sky model + residual offset) and the
        background scatter of one aperture.
    mag_raw, mag_raw_err : float
    frac_enclosed : float
        Fraction of the band's total galaxy-model light inside the aperture.
    filled_fraction : float
        Fraction of the aperture (by weight) that had no data.
    flags : int
    net_image : ndarray or None
        NaN-free ``data - stars - sky - offset/area`` used for the PSF correction.
    noise : ndarray or None
        NaN-free noise map of the band.
    """

    filter: str
    flux: float = np.nan
    flux_err: float = np.nan
    sky: float = np.nan
    sky_err: float = np.nan
    mag_raw: float = np.nan
    mag_raw_err: float = np.nan
    frac_enclosed: float = np.nan
    filled_fraction: float = np.nan
    flags: int = 0
    net_image: Optional[np.ndarray] = None
    noise: Optional[np.ndarray] = None

    @property
    def measured(self) -> bool:
        return self.net_image is not None


def measure_band(
    band: Band,
    aperture: ApertureGeometry,
    options: ApertureOptions,
    rng: np.random.Generator,
    zeropoint: Optional[float] = None,
) -> BandPhotometry:
    """Flux, sky, errors and raw magnitude of one band in ``aperture``.

    Error model: ``flux_err^2 = s^2 (1 + 1/N) + max(V_sci - V_sky, 0)``, where ``s`` is
    the scatter of the sky-aperture sums (background of one aperture, all sources of
    background noise included), ``N`` the number of independent sky apertures, and
    ``V_sci - V_sky`` the noise-map variance in the science aperture in excess of that
    in the sky apertures (source photon noise, when the noise map includes it).
    Without sky apertures: ``flux_err^2 = V_sci`` and no residual offset.
    """
    if band.status == "failed" or band.galaxy_model is None:
        return BandPhotometry(band.filter, flags=APERTURE_FLAGS.NOT_MEASURED)
    shape = band.shape
    w = aperture.weights(shape)
    area = aperture_sum(np.ones(shape), w)
    invalid = ~band.valid
    filled = aperture_sum(invalid.astype(float), w) / area
    flags = APERTURE_FLAGS.NAN_FILLED if filled > 0 else 0
    noise = _noise_map(band)
    residual = np.where(invalid, np.nan, band.residual())
    sky = sky_apertures(
        residual, band.valid, aperture, rng, n_apertures=options.n_sky_apertures,
        center_mask=options.center_mask, noise=noise,
    )
    sky_err, flux_var, sky_flags = _flux_variance(sky, aperture_sum(noise**2, w * w))
    flags |= sky_flags
    total = band.sersic.flux if band.sersic is not None and np.isfinite(band.sersic.flux) else band.galaxy_model.sum()
    common = dict(
        sky=aperture_sum(band.component("sky"), w) + sky.offset,
        sky_err=sky_err,
        frac_enclosed=float(aperture_sum(band.galaxy_model, w) / total) if total > 0 else np.nan,
        filled_fraction=filled,
    )
    if filled > options.fill_max_nan_frac:
        log.warning("aperture photometry (%s): %.0f%% of the aperture has no data", band.filter, 100 * filled)
        return BandPhotometry(band.filter, flags=flags | APERTURE_FLAGS.TOO_MUCH_FILLED, **common)
    net = filled_net_image(band, options.fill_replace_with, aperture) - sky.offset / area
    flux = aperture_sum(net, w)
    flux_err = math.sqrt(flux_var)
    if not flux > 0:
        flags |= APERTURE_FLAGS.NONPOSITIVE_FLUX
    mag, mag_err = magnitude(flux, flux_err, zeropoint)
    return BandPhotometry(
        band.filter, flux, flux_err, mag_raw=mag, mag_raw_err=mag_err, flags=flags, net_image=net, noise=noise,
        **common,
    )


def _flux_variance(sky: SkyApertures, var_sci: float) -> Tuple[float, float, int]:
    """``(sky_err, flux variance, flags)`` from the sky copies and the noise-map variance."""
    if sky.n == 0:
        return math.sqrt(var_sci), var_sci, APERTURE_FLAGS.NO_SKY_APERTURES
    sky_err, flags = sky.scatter, 0
    if sky.n < MIN_SKY_APERTURES:
        # too few copies for a robust scatter: never below the noise-map prediction
        sky_err, flags = max(sky_err, math.sqrt(sky.noise_variance)), APERTURE_FLAGS.FEW_SKY_APERTURES
    flux_var = sky_err**2 * (1.0 + 1.0 / sky.n_independent) + max(var_sci - sky.noise_variance, 0.0)
    return sky_err, flux_var, flags


# ---------------------------------------------------------------------------- PSF matching


def _window(options: ApertureOptions):
    from photutils import psf_matching

    p = options.match_window_param
    return {
        "none": lambda: None,
        "tukey": lambda: psf_matching.TukeyWindow(alpha=p),
        "cosine_bell": lambda: psf_matching.CosineBellWindow(alpha=p),
        "tophat": lambda: psf_matching.TopHatWindow(beta=p),
    }[options.match_window]()


def matching_kernel(source_psf, target_psf, options: Optional[ApertureOptions] = None) -> np.ndarray:
    """Image-grid kernel ``K`` with ``source (*) K = target`` (photutils ``make_kernel``).

    Both PSFs are taken on the image grid (:attr:`PSFModel.grid_kernel`: odd, centred on
    the origin, unit sum) and the smaller is zero-padded to the size of the larger:
    padding keeps the wings of the broader PSF, which carry exactly the light the
    correction is about (cropping would drop them). The source must be the sharper
    PSF. Returns an odd, centred, unit-sum kernel.
    """
    from photutils.psf_matching import make_kernel

    options = options or ApertureOptions()
    src, tgt = source_psf.grid_kernel, target_psf.grid_kernel
    half = max(src.shape[0], tgt.shape[0]) // 2
    return make_kernel(
        _centred(src, half), _centred(tgt, half), window=_window(options), regularization=options.match_regularization
    )


def psf_correction(
    base: BandPhotometry,
    band: BandPhotometry,
    base_psf,
    band_psf,
    aperture: ApertureGeometry,
    options: Optional[ApertureOptions] = None,
) -> Tuple[float, float]:
    """``dmag = mag_raw - (magnitude at the base band's resolution)`` and its error.

    For a band whose PSF is broader (larger FWHM) than the base band's, the base image
    (sky removed, gaps filled) is convolved to the band's PSF: ``dmag = m(base (*) K) -
    m(base)``. For a sharper band its own image is convolved to the base PSF: ``dmag =
    m(band) - m(band (*) K)``. Either way ``dmag > 0`` when the band's PSF puts less
    light into the aperture than the base PSF, and ``mag_corr = mag_raw - dmag``.

    Both fluxes are linear in the same pixels, ``F0 = sum(w I)`` and ``FK = sum(wK I)``
    with ``wK`` the aperture weights correlated with ``K``; the error is propagated
    exactly for independent pixel noise ``s``: ``var(FK) = sum(wK^2 s^2)`` (the noise
    map convolved in variance, with the squared kernel, and the induced pixel
    correlations kept), ``cov(F0, FK) = sum(w wK s^2)``.
    """
    if base.filter == band.filter:
        return 0.0, 0.0
    broader = band_psf.fwhm >= base_psf.fwhm
    source, sharp_psf, broad_psf = (base, base_psf, band_psf) if broader else (band, band_psf, base_psf)
    kernel = matching_kernel(sharp_psf, broad_psf, options)
    w0 = aperture.weights(source.net_image.shape)
    wk = signal.fftconvolve(w0, kernel[::-1, ::-1], mode="same")
    image, var = source.net_image, source.noise**2
    f0, fk = float(np.sum(w0 * image)), float(np.sum(wk * image))
    if not (f0 > 0 and fk > 0):
        return np.nan, np.nan
    v0, vk, cov = float(np.sum(w0 * w0 * var)), float(np.sum(wk * wk * var)), float(np.sum(w0 * wk * var))
    rel_var = max(v0 / f0**2 + vk / fk**2 - 2.0 * cov / (f0 * fk), 0.0)
    dmag = -2.5 * math.log10(fk / f0)
    return (dmag if broader else -dmag), MAG_PER_LN_FLUX * math.sqrt(rel_var)


# ---------------------------------------------------------------------------- driver


def _isophote_band(galaxy: Galaxy, options: ApertureOptions) -> Band:
    name = options.isophot_base_filter or galaxy.base_filter
    if not name:
        raise ConfigError("[aperture] isophot_base_filter is empty and the galaxy has no base filter")
    if name not in galaxy.bands:
        raise ConfigError(
            f"[aperture] isophot_base_filter {name!r} is not a band of {galaxy.name}; bands: {', '.join(galaxy.filters)}"
        )
    band = galaxy.bands[name]
    if band.galaxy_model is None or band.status == "failed":
        raise InputError(f"aperture photometry of {galaxy.name}: band {name} has no galaxy model to draw isophotes on")
    return band


def science_aperture(galaxy: Galaxy, options: Optional[ApertureOptions] = None) -> PetrosianResult:
    """The Petrosian aperture of ``galaxy`` from its isophote band (cutout coordinates)."""
    options = options or ApertureOptions()
    band = _isophote_band(galaxy, options)
    centre = None
    if band.sersic is not None and "x_0" in band.sersic.params:
        centre = (band.sersic.params["x_0"], band.sersic.params["y_0"])
    fractions = np.linspace(options.isophot_frac_min, options.isophot_frac_max, options.n_isophotes)
    isophotes = isophotal_ellipses(_profile_image(band, options.fit_isophot_to), fractions, centre)
    where = f"{galaxy.name} {band.filter}"
    return petrosian_aperture(_profile_image(band, options.petro_profile_on), isophotes, options.petro, where=where)


def _psf_base(galaxy: Galaxy, measured: Dict[str, BandPhotometry], options: ApertureOptions) -> Optional[str]:
    name = options.PSF_corr_base_filter
    if name:
        if name not in galaxy.bands:
            raise ConfigError(
                f"[aperture] PSF_corr_base_filter {name!r} is not a band of {galaxy.name}; "
                f"bands: {', '.join(galaxy.filters)}"
            )
        return name if measured[name].measured else None
    usable = [f for f, m in measured.items() if m.measured]
    return min(usable, key=lambda f: galaxy.bands[f].psf.fwhm) if usable else None


def _band_rng(seed: int, filter_name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(filter_name.encode())])


def run_aperture_photometry(
    galaxy: Galaxy,
    options: Optional[ApertureOptions] = None,
    rng_seed: Optional[int] = None,
    *,
    default_zeropoint: Optional[float] = None,
    petrosian: Optional[PetrosianResult] = None,
) -> List[dict]:
    """Petrosian aperture photometry of every band: the rows of ``NAME_aperture.csv``.

    Parameters
    ----------
    galaxy : Galaxy
        Fitted bands (``galaxy_model``, ``star_model``, ``sky_model``, ``noise``, ``psf``).
    options : ApertureOptions, optional
    rng_seed : int, optional
        Seed of the sky-aperture placement; ``None`` = ``options.seed``.
    default_zeropoint : float, optional
        Zeropoint of bands without ``band.zeropoint`` (e.g.
        ``zeropoint_mjy_per_sr(0.03)`` for MJy/sr images); ``None``: their magnitudes
        are NaN.
    petrosian : PetrosianResult, optional
        The aperture from :func:`science_aperture`, if already computed (e.g. to plot
        it); default: computed here.

    Returns
    -------
    list of dict
        One row per band in galaxy order, keys :data:`APERTURE_COLUMNS`; aperture
        coordinates on the input image grid.
    """
    options = options or ApertureOptions()
    seed = options.seed if rng_seed is None else rng_seed
    petro = petrosian if petrosian is not None else science_aperture(galaxy, options)
    aperture = petro.aperture
    log.info(
        "aperture photometry of %s: Petrosian aperture a=%.2f b=%.2f px theta=%.3f from %s",
        galaxy.name, aperture.a, aperture.b, aperture.theta, petro.filter,
    )
    measured = {}
    for name, band in galaxy.bands.items():
        zp = band.zeropoint if band.zeropoint is not None else default_zeropoint
        measured[name] = measure_band(band, aperture, options, _band_rng(seed, name), zp)
    corrections = _corrections(galaxy, measured, aperture, options)
    x_in, y_in = galaxy.to_input_frame(aperture.x, aperture.y)
    geometry = dict(
        aper_x=float(x_in), aper_y=float(y_in), aper_a=aperture.a, aper_b=aperture.b, aper_theta=aperture.theta
    )
    rows = []
    for name, m in measured.items():
        dmag, dmag_err, cflags = corrections[name]
        rows.append(_row(m, dmag, dmag_err, m.flags | cflags | petro.flags, geometry))
    return rows


def _corrections(galaxy, measured, aperture, options) -> Dict[str, Tuple[float, float, int]]:
    nan = (np.nan, np.nan, 0)
    if not options.correct_PSF:
        return {name: nan for name in measured}
    base = _psf_base(galaxy, measured, options)
    if base is None:
        log.warning("aperture photometry of %s: no measured band to match PSFs to; no PSF correction", galaxy.name)
    out = {}
    for name, m in measured.items():
        if not m.measured:
            out[name] = nan
        elif base is None:
            out[name] = (np.nan, np.nan, APERTURE_FLAGS.NO_PSF_CORRECTION)
        else:
            dmag, err = psf_correction(
                measured[base], m, galaxy.bands[base].psf, galaxy.bands[name].psf, aperture, options
            )
            out[name] = (dmag, err, 0 if np.isfinite(dmag) else APERTURE_FLAGS.NO_PSF_CORRECTION)
    return out


def _row(m: BandPhotometry, dmag: float, dmag_err: float, flags: int, geometry: dict) -> dict:
    mag_corr = m.mag_raw - dmag
    mag_corr_err = math.hypot(m.mag_raw_err, dmag_err)
    row = dict(
        filter=m.filter, flux=m.flux, flux_err=m.flux_err, sky=m.sky, sky_err=m.sky_err,
        mag_raw=m.mag_raw, mag_raw_err=m.mag_raw_err, dmag_psf=dmag, dmag_psf_err=dmag_err,
        mag_corr=mag_corr, mag_corr_err=mag_corr_err, frac_enclosed=m.frac_enclosed, flags=int(flags),
    )
    row.update(geometry)
    return {key: row[key] for key in APERTURE_COLUMNS}
