"""PSF handling: normalisation, centring, sampling on the image grid, star stamps.

The convention (INTERFACE.md, "PSF convention")
-----------------------------------------------
* The array is an **effective** PSF (it already contains the detector pixel response)
  sampled ``oversample`` times finer than the image pixels.
* Its **origin is the middle element** of the odd-sized array (or an explicitly given
  element for even-sized arrays). A point source at ``(x, y)`` puts that element at
  ``(x, y)``. The origin is *not* the light centroid.
* Pixel coordinates are 0-based and pixel centres are integers: pixel ``(0, 0)`` has
  its centre at ``(0.0, 0.0)``; arrays are indexed ``[y, x]``.
* A model image is the continuous scene convolved with the effective PSF and sampled
  at pixel centres. On the image grid the PSF is the array sampled every
  ``oversample`` elements in phase with the origin, normalised to unit sum.
* ``kind="optical"``: the array lacks the pixel response (each element holds the light
  of its sub-pixel cell); it is converted once to an effective PSF by integrating over
  one image pixel (see ``_pixel_response_kernel`` for even factors, where the pixel
  edges cut cells in half).

Stamps for point sources at arbitrary sub-pixel positions interpolate the oversampled
array with a cubic B-spline (exact at the array nodes, so a source at an integer
position reproduces the in-phase samples). Each stamp is normalised by the total of
the interpolated PSF *at its own phase*: the files in ``../shared/data/psf`` are not
perfect effective PSFs (the in-phase sums of F090W vary by up to 3 % between
sub-pixel phases), and this keeps ``flux`` the total light of the source whatever its
sub-pixel position.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Mapping, Optional

import attrs
import numpy as np
from scipy import fft as sfft
from scipy import ndimage, signal

from .errors import InputError
from .sersic import (
    build_quadrature,
    cusp_zone,
    elliptical_taper,
    keys_kernel,
    model_spec,
    sersic_enclosed_fraction,
    split_params,
)

__all__ = ["PSFModel", "SersicRenderer", "RenderPlan", "add_stamps", "bspline_weights", "gaussian_kernel"]

log = logging.getLogger(__name__)

#: 1/(2 sqrt(2 ln 2)): Gaussian sigma per FWHM
FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def bspline_weights(tau: np.ndarray) -> np.ndarray:
    """Cubic B-spline weights for fractional offsets ``tau`` in [0, 1).

    Returns an array of shape ``tau.shape + (4,)``: the weights of the coefficients at
    integer offsets -1, 0, 1, 2 from ``floor(t)``.
    """
    t = np.asarray(tau, dtype=float)
    t2 = t * t
    t3 = t2 * t
    w = np.empty(t.shape + (4,))
    w[..., 0] = (1.0 - t) ** 3 / 6.0
    w[..., 1] = (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0
    w[..., 2] = (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0
    w[..., 3] = t3 / 6.0
    return w


def gaussian_kernel(sigma: float, half: Optional[int] = None) -> np.ndarray:
    """Odd, centred, unit-sum Gaussian kernel sampled at element centres.

    ``sigma`` is in elements of the grid the kernel is used on. ``sigma <= 0`` gives
    the identity kernel ``[[1]]``.
    """
    if sigma <= 0:
        return np.ones((1, 1))
    if half is None:
        half = max(1, int(np.ceil(5.0 * sigma)))
    r = np.arange(-half, half + 1)
    g = np.exp(-0.5 * (r / sigma) ** 2)
    k = np.outer(g, g)
    return k / k.sum()


def _pixel_response_kernel(oversample: int) -> np.ndarray:
    """Integral over one image pixel, as a kernel on the oversampled grid.

    Elements of an optical PSF hold the light of their sub-pixel cell. For odd
    factors a pixel is exactly ``oversample`` cells. For even factors the pixel edges
    cut the end cells in half; the light of each half cell is taken from a quadratic
    reconstruction of the cell contents (cell average m_i, neighbours m_i+-1: the right
    half holds m_i/2 + (m_i+1 - m_i-1)/16), which keeps the kernel centred and exact
    for quadratic light distributions.
    """
    if oversample == 1:
        return np.ones((1, 1))
    if oversample % 2 == 1:
        w = np.ones(oversample)
    else:
        h = oversample // 2
        w = np.zeros(oversample + 3)  # offsets -(h+1) .. h+1
        c = h + 1
        w[c - h + 1 : c + h] = 1.0
        w[c - h] = w[c + h] = 0.5
        w[c - h + 1] += 1.0 / 16.0
        w[c + h - 1] += 1.0 / 16.0
        w[c - h - 1] = w[c + h + 1] = -1.0 / 16.0
    w = w / w.sum()
    return np.outer(w, w)


def _check_origin(shape, origin):
    ny, nx = shape
    if origin is None:
        if ny % 2 == 0 or nx % 2 == 0:
            raise InputError(
                f"PSF array has even shape {shape}: its origin is ambiguous; "
                "give the origin element explicitly (psf_origin = [row, col]) or "
                "provide an odd-sized array"
            )
        return (ny // 2, nx // 2)
    oy, ox = (int(origin[0]), int(origin[1]))
    if not (0 <= oy < ny and 0 <= ox < nx):
        raise InputError(f"PSF origin {origin} lies outside the PSF array of shape {shape}")
    return (oy, ox)


@attrs.define(frozen=True, slots=False, eq=False, repr=False)
class PSFModel:
    """An oversampled effective PSF with a fixed origin, normalised to the convention.

    Build it with :meth:`from_array`, which validates and normalises; the constructor
    itself trusts its arguments.

    Attributes
    ----------
    array : ndarray
        Oversampled effective PSF. Normalised so that the samples in phase with the
        origin (every ``oversample`` elements) sum to one.
    oversample : int
        Number of PSF elements per image pixel along each axis.
    origin : tuple of int
        ``(row, col)`` index of the origin element in ``array``.
    filter : str or None
        Filter name, for messages.
    source : str or None
        Where the PSF came from (file path, "calibrated", ...), for messages and logs.
    """

    array: np.ndarray
    oversample: int
    origin: tuple
    filter: Optional[str] = None
    source: Optional[str] = None

    # ------------------------------------------------------------------ build
    @classmethod
    def from_array(
        cls,
        array,
        oversample: int = 1,
        *,
        origin=None,
        kind: str = "effective",
        filter: Optional[str] = None,
        source: Optional[str] = None,
    ) -> "PSFModel":
        """Validate, convert (``kind="optical"``) and normalise a PSF array.

        Raises
        ------
        InputError
            Not 2-D, non-finite values, non-positive sum, even shape without
            ``origin``, bad oversampling factor or unknown ``kind``.
        """
        where = f" ({source})" if source else ""
        label = f"PSF for {filter}" if filter else "PSF"
        a = np.array(array, dtype=float)
        if a.ndim != 2:
            raise InputError(f"{label}{where} must be a 2-D array, got {a.ndim}-D shape {a.shape}")
        if min(a.shape) < 3:
            raise InputError(f"{label}{where} is too small: shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise InputError(f"{label}{where} contains NaN or infinite values")
        try:
            os_ = int(oversample)
        except (TypeError, ValueError):
            raise InputError(f"{label}{where}: oversampling factor {oversample!r} is not an integer") from None
        if os_ != oversample or os_ < 1:
            raise InputError(f"{label}{where}: oversampling factor must be a positive integer, got {oversample!r}")
        if kind not in ("effective", "optical"):
            raise InputError(f"{label}{where}: psf_kind must be 'effective' or 'optical', got {kind!r}")
        try:
            org = _check_origin(a.shape, origin)
        except InputError as exc:
            raise InputError(f"{label}{where}: {exc}") from None
        if kind == "optical":
            k = _pixel_response_kernel(os_)
            a = signal.fftconvolve(a, k, mode="full")
            np.clip(a, 0.0, None, out=a)  # FFT round-off and the reconstruction's end taps
            h = k.shape[0] // 2
            org = (org[0] + h, org[1] + h)
        total = a.sum()
        if not total > 0:
            raise InputError(f"{label}{where} has a non-positive sum ({total:g})")
        inphase = a[org[0] % os_ :: os_, org[1] % os_ :: os_].sum()
        if not inphase > 0:
            raise InputError(f"{label}{where}: the samples in phase with the origin sum to {inphase:g}")
        a = a / inphase
        a.setflags(write=False)
        return cls(a, os_, org, filter=filter, source=source)

    # ------------------------------------------------------------- caching
    def _cached(self, key, factory):
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = factory()
        return cache[key]

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_cache", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"PSFModel(filter={self.filter!r}, shape={self.array.shape}, oversample={self.oversample}, "
            f"origin={self.origin}, fwhm={self.fwhm:.3f} px)"
        )

    @property
    def key(self) -> str:
        """Content hash (array, oversampling, origin): a cache key for FFTs of this PSF."""

        def make():
            h = hashlib.blake2b(digest_size=12)
            h.update(np.ascontiguousarray(self.array).tobytes())
            h.update(repr((self.array.shape, self.oversample, self.origin)).encode())
            return h.hexdigest()

        return self._cached("key", make)

    # --------------------------------------------------------- image grid
    @property
    def grid_kernel(self) -> np.ndarray:
        """The PSF on the image grid: odd, centred on the origin, unit sum.

        The array sampled every ``oversample`` elements in phase with the origin,
        zero-padded so that the origin sample is the middle element.
        """

        def make():
            os_ = self.oversample
            oy, ox = self.origin
            sub = self.array[oy % os_ :: os_, ox % os_ :: os_]
            cy, cx = oy // os_, ox // os_
            hy = max(cy, sub.shape[0] - 1 - cy)
            hx = max(cx, sub.shape[1] - 1 - cx)
            h = max(hy, hx)
            out = np.zeros((2 * h + 1, 2 * h + 1))
            out[h - cy : h - cy + sub.shape[0], h - cx : h - cx + sub.shape[1]] = sub
            out /= out.sum()
            out.setflags(write=False)
            return out

        return self._cached("grid_kernel", make)

    @property
    def aliasing(self) -> float:
        """How far the PSF is from being sampled well enough on the image grid.

        The largest amplitude of its Fourier transform (relative to the total) at
        spatial frequencies between 0.75 and 1.25 cycles per image pixel (Chebyshev
        norm). A band-limited effective PSF (optics cut off below ~0.7 cycles/pixel,
        pixel response zero at 1) gives ~1e-4; an under-sampled one (JWST F090W at
        0.03"/px: ~0.08) makes scenes sampled at pixel centres alias. Cached.
        """

        def make():
            a = self.array
            n0 = sfft.next_fast_len(a.shape[0], real=True)
            n1 = sfft.next_fast_len(a.shape[1], real=True)
            spec = np.abs(sfft.rfft2(a, s=(n0, n1)))
            spec /= spec[0, 0]
            fy = np.abs(sfft.fftfreq(n0, d=1.0 / self.oversample))[:, None]
            fx = np.abs(sfft.rfftfreq(n1, d=1.0 / self.oversample))[None, :]
            band = np.maximum(fy, fx)
            sel = (band >= 0.75) & (band <= 1.25)
            return float(spec[sel].max()) if sel.any() else 0.0

        return self._cached("aliasing", make)

    @property
    def half_extent(self) -> int:
        """Half-size, in image pixels, of the region where the PSF is defined."""
        return self.grid_kernel.shape[0] // 2

    # ------------------------------------------------------------- shape
    @property
    def fwhm(self) -> float:
        """Full width at half maximum in image pixels, from the area above half maximum.

        ``2 sqrt(A / pi)`` where ``A`` is the area (image pixels squared) of the
        oversampled PSF above half its peak: exact for a round Gaussian, a robust
        equivalent width for any shape. Cached.
        """

        def make():
            a = self.array
            area = np.count_nonzero(a >= 0.5 * a.max()) / self.oversample**2
            return float(2.0 * np.sqrt(area / np.pi))

        return self._cached("fwhm", make)

    @property
    def sigma(self) -> float:
        """Gaussian-equivalent sigma (``fwhm / 2.3548``) in image pixels."""
        return self.fwhm * FWHM_TO_SIGMA

    @property
    def centroid_offset(self) -> tuple:
        """Light centroid minus origin, ``(dx, dy)`` in image pixels (information only)."""

        def make():
            a = self.array
            yy, xx = np.indices(a.shape)
            s = a.sum()
            return (
                float(((xx * a).sum() / s - self.origin[1]) / self.oversample),
                float(((yy * a).sum() / s - self.origin[0]) / self.oversample),
            )

        return self._cached("centroid", make)

    def encircled_energy(self, radius) -> np.ndarray:
        """Fraction of the PSF light within ``radius`` image pixels of the origin."""

        def make():
            a = self.array
            yy, xx = np.indices(a.shape)
            r = np.hypot(yy - self.origin[0], xx - self.origin[1]) / self.oversample
            order = np.argsort(r, axis=None)
            rs = r.ravel()[order]
            cum = np.cumsum(a.ravel()[order])
            cum /= cum[-1]
            return rs, cum

        rs, cum = self._cached("ee", make)
        return np.interp(radius, rs, cum)

    def radius_for_energy(self, fraction: float) -> float:
        """Smallest radius (image pixels) around the origin enclosing ``fraction`` of the light."""
        self.encircled_energy(0.0)
        rs, cum = self._cache["ee"]
        i = int(np.searchsorted(cum, fraction))
        return float(rs[min(i, len(rs) - 1)])

    def stamp_half_size(self, energy: float = 0.995, minimum: int = 3, maximum: Optional[int] = None) -> int:
        """Half-size (pixels) of a square stamp holding at least ``energy`` of the light."""
        h = int(np.ceil(self.radius_for_energy(energy)))
        h = max(minimum, h)
        if maximum is not None:
            h = min(h, maximum)
        return min(h, self.half_extent + 2)

    # ------------------------------------------------------------ stamps
    def _coefficients(self, half: int):
        """Zero-padded B-spline coefficients large enough for stamps of half-size ``half``."""

        def make():
            os_ = self.oversample
            pad = half * os_ + os_ + 4
            padded = np.pad(self.array, pad)
            coef = ndimage.spline_filter(padded, order=3, mode="mirror")
            # totals of the interpolated PSF at each residue class (phase) of the grid
            phase_sums = np.zeros((os_, os_))
            oy, ox = self.origin[0] + pad, self.origin[1] + pad
            for p in range(os_):
                for q in range(os_):
                    phase_sums[p, q] = coef[(oy + p) % os_ :: os_, (ox + q) % os_ :: os_].sum()
            return coef, pad, phase_sums

        # one set per PSF, padded for the largest useful stamp (the PSF's own extent):
        # stamps of every size reuse it, so memory stays bounded
        cache = self.__dict__.setdefault("_cache", {})
        current = cache.get("coef")
        if current is None or current[1] < half * self.oversample + self.oversample + 4:
            half = max(half, self.half_extent + 2)
            cache["coef"] = make()
        return cache["coef"]

    def stamps(self, x, y, half: int):
        """Unit-flux images of point sources at ``(x, y)`` on square stamps.

        Parameters
        ----------
        x, y : array_like
            Source positions, image pixels (pixel centres at integers).
        half : int
            Stamp half-size; each stamp is ``(2 half + 1)`` pixels on a side, centred on
            the pixel nearest to the source.

        Returns
        -------
        values : ndarray, shape (N, 2 half + 1, 2 half + 1)
            PSF values at the pixel centres of each stamp, normalised so that the
            *untruncated* PSF at that sub-pixel phase has unit sum.
        ix, iy : ndarray of int, shape (N,)
            Pixel of each stamp centre; stamp element ``[j, i]`` is image pixel
            ``(iy - half + j, ix - half + i)``.
        """
        x = np.atleast_1d(np.asarray(x, dtype=float))
        y = np.atleast_1d(np.asarray(y, dtype=float))
        half = int(half)
        os_ = self.oversample
        coef, pad, phase_sums = self._coefficients(half)
        ix = np.floor(x + 0.5).astype(int)
        iy = np.floor(y + 0.5).astype(int)
        # oversampled index (in the padded frame) of the stamp centre pixel
        ty = self.origin[0] + pad + (iy - y) * os_
        tx = self.origin[1] + pad + (ix - x) * os_
        t0y = np.floor(ty).astype(int)
        t0x = np.floor(tx).astype(int)
        wy = bspline_weights(ty - t0y)
        wx = bspline_weights(tx - t0x)
        n = x.size
        size = 2 * half + 1
        # flat index of each stamp pixel's first spline coefficient; the 4 x 4
        # coefficients around it are the same index shifted by (a W + b) in the flat
        # array, so each of the 16 terms is one `take` from a shifted view
        width = coef.shape[1]
        k = np.arange(-half, half + 1) * os_
        base = ((t0y - 1) * width + (t0x - 1))[:, None] + (k[:, None] * width + k[None, :]).ravel()[None, :]
        flat = coef.ravel()
        out = np.zeros((n, size * size))
        term = np.empty_like(out)
        norm = np.zeros(n)
        for a in range(4):
            for b in range(4):
                w = wy[:, a] * wx[:, b]
                np.take(flat[a * width + b :], base, out=term)
                term *= w[:, None]
                out += term
                norm += w * phase_sums[
                    (t0y + a - 1 - self.origin[0] - pad) % os_, (t0x + b - 1 - self.origin[1] - pad) % os_
                ]
        out = out.reshape(n, size, size)
        out /= norm[:, None, None]
        return out, ix, iy

    def render(self, shape, x, y, flux, half: Optional[int] = None) -> np.ndarray:
        """Image of point sources (total fluxes ``flux``) on an array of ``shape``."""
        img = np.zeros(shape)
        x = np.atleast_1d(np.asarray(x, dtype=float))
        if x.size == 0:
            return img
        if half is None:
            half = self.stamp_half_size()
        vals, ix, iy = self.stamps(x, y, half)
        vals *= np.atleast_1d(np.asarray(flux, dtype=float))[:, None, None]
        add_stamps(img, vals, ix, iy)
        return img

    # ------------------------------------------------------ derived PSFs
    def convolved(self, kernel: np.ndarray, source: str = "convolved") -> "PSFModel":
        """This PSF convolved with ``kernel`` given on the *oversampled* grid.

        ``kernel`` must be odd-sized and centred (its middle element is its origin);
        it is normalised to unit sum. The array grows by the kernel size so no light
        is lost at the edges; the origin moves accordingly. Negative values produced by
        the FFT are clipped to zero.
        """
        k = np.asarray(kernel, dtype=float)
        if k.ndim != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
            raise ValueError(f"convolution kernel must be 2-D and odd-sized, got shape {k.shape}")
        k = k / k.sum()
        a = signal.fftconvolve(self.array, k, mode="full")
        np.clip(a, 0.0, None, out=a)
        org = (self.origin[0] + k.shape[0] // 2, self.origin[1] + k.shape[1] // 2)
        return PSFModel.from_array(a, self.oversample, origin=org, filter=self.filter, source=source)

    def blurred(self, sigma_oversampled: float) -> "PSFModel":
        """Convolve with a Gaussian of sigma given in oversampled elements (``blur_psf``)."""
        if sigma_oversampled <= 0:
            return self
        return self.convolved(gaussian_kernel(sigma_oversampled), source=f"{self.source} blurred")


def add_stamps(image: np.ndarray, values: np.ndarray, ix, iy) -> None:
    """Add stamps (as returned by :meth:`PSFModel.stamps`) into ``image``, clipping at edges."""
    n, ks, _ = values.shape
    half = ks // 2
    ny, nx = image.shape
    for v, cx, cy in zip(values, ix, iy):
        y0, x0 = cy - half, cx - half
        ys0, xs0 = max(0, -y0), max(0, -x0)
        ys1, xs1 = min(ks, ny - y0), min(ks, nx - x0)
        if ys1 <= ys0 or xs1 <= xs0:
            continue
        image[y0 + ys0 : y0 + ys1, x0 + xs0 : x0 + xs1] += v[ys0:ys1, xs0:xs1]


# --------------------------------------------------------------------------------
# Convolution of analytic profiles with the effective PSF
# --------------------------------------------------------------------------------
#
# A model image is  M(i) = integral S(u) P(i - u) du  sampled at pixel centres i, with
# P the effective PSF (continuous between the oversampled nodes by Keys cubic
# interpolation). The profile S is split with a smooth partition of unity
# S = S (1 - w) + S w, w = 1 near the centre and 0 beyond a window:
#
# * S (1 - w) is smooth on the pixel scale: sampled at pixel centres and convolved
#   with the in-phase kernel K_0 (``grid_kernel``) through one zero-padded FFT;
# * S w holds the cusp (and everything if the profile is small or thin): integrated
#   onto the oversampled nodes of the window (adaptive sub-cells near the cusp,
#   Keys-weighted, see sphot_core.sersic.Quadrature). A node at pixel k plus phase
#   d_p = p / oversample sees the PSF samples K_p[m] = array[origin + m os - p], each
#   phase kernel normalised to unit sum. sum_p F_p (*) K_p is computed exactly as
#   KA(F) (*) K_0 + sum_p F_p (*) R_p, where KA assigns node masses to pixels with
#   Keys weights (the adjoint of Keys interpolation on the pixel grid) and
#   R_p = K_p - (K_0 Keys-interpolated at offset d_p); KA(F) joins the big FFT and
#   the residual kernels R_p (zero for p = 0, small beyond a few pixels) are
#   truncated to a core radius and applied with small FFTs around the window.
#
# Nothing is block-summed, nothing is averaged over pixels before convolving, and a
# point mass at (x, y) puts the PSF origin at (x, y).


def _phase_kernel(psf: "PSFModel", py: int, px: int, half: int) -> np.ndarray:
    """``K_p[m] = array[origin + m os - p]`` for ``|m| <= half``, normalised to unit sum."""
    os_ = psf.oversample
    oy, ox = psf.origin
    a = psf.array
    ys = oy + np.arange(-half, half + 1) * os_ - py
    xs = ox + np.arange(-half, half + 1) * os_ - px
    vy = (ys >= 0) & (ys < a.shape[0])
    vx = (xs >= 0) & (xs < a.shape[1])
    out = np.zeros((2 * half + 1, 2 * half + 1))
    out[np.ix_(vy, vx)] = a[np.ix_(ys[vy], xs[vx])]
    return out / out.sum()


def _keys_shifted(kernel: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """``kernel`` as seen by a mass at sub-pixel offset (dy, dx) assigned with Keys weights."""
    out = np.zeros_like(kernel)
    for a in range(-1, 3):
        wy = float(keys_kernel(dy - a))
        if wy == 0.0:
            continue
        rolled = np.roll(kernel, a, axis=0)
        for b in range(-1, 3):
            wx = float(keys_kernel(dx - b))
            if wx != 0.0:
                out += wy * wx * np.roll(rolled, b, axis=1)
    return out


def _residual_kernels(psf: "PSFModel") -> dict:
    """Truncated residual phase kernels ``R_p`` and the core radius (cached per PSF)."""

    def make():
        os_ = psf.oversample
        half = psf.half_extent + 3
        k0 = _phase_kernel(psf, 0, 0, half)
        m = np.arange(-half, half + 1)
        cheb = np.maximum(np.abs(m)[:, None], np.abs(m)[None, :])
        full = {}  # phases in the order py * os + px, skipping (0, 0)
        for py in range(os_):
            for px in range(os_):
                if py or px:
                    full[(py, px)] = _phase_kernel(psf, py, px, half) - _keys_shifted(k0, py / os_, px / os_)
        radius = _core_radius(full, cheb, k0.max(), half)
        core = cheb <= radius
        sl = slice(half - radius, half + radius + 1)
        kernels = []
        for (py, px), r in full.items():
            rc = np.where(core, r, 0.0)
            # keep the residual kernel flux-free after truncation
            shifted = np.where(core, _keys_shifted(k0, py / os_, px / os_), 0.0)
            rc -= rc.sum() * shifted / shifted.sum()
            kernels.append(rc[sl, sl])
        phases = [p for p in full]
        return {"radius": radius, "phases": phases, "kernels": np.array(kernels) if kernels else np.zeros((0, 1, 1))}

    return psf._cached("residual_kernels", make)


def _core_radius(full: dict, cheb: np.ndarray, peak: float, half: int) -> int:
    """Smallest radius beyond which every residual kernel is negligible.

    Negligible: no element above 1e-4 of the PSF peak and total absolute value below
    1e-2 (the light a mass spreads beyond the core with the wrong sub-pixel pattern).
    """
    for radius in range(4, half + 1, 2):
        outside = cheb > radius
        if all(np.abs(r[outside]).max(initial=0.0) <= 1e-4 * peak and np.abs(r[outside]).sum() <= 1e-2 for r in full.values()):
            return radius
    return half


@attrs.frozen(eq=False)
class RenderPlan:
    """Where and how finely one Sersic component is integrated (see :class:`SersicRenderer`).

    Attributes
    ----------
    window : tuple of int
        ``(iy0, ix0, wy, wx)``: first pixel and size of the oversampled window on the
        renderer's grid (image plus margin).
    taper : tuple of float
        ``(radius, width)`` of the elliptical taper ``w`` that moves the profile
        from the pixel-centre samples to the oversampled window.
    quad : sphot_core.sersic.Quadrature
        Quadrature of ``S w`` on the oversampled nodes of the window.
    """

    window: tuple
    taper: tuple
    quad: object


class SersicRenderer:
    """PSF-convolved Sersic and point-source images on a fixed image grid.

    Build once per (PSF, image shape); the PSF's Fourier transforms are cached on the
    :class:`PSFModel` (keyed by the FFT size), so building renderers is cheap.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)`` of the images.
    psf : PSFModel
    margin : int, optional
        Pixels rendered beyond each image edge so that light scattered into the image
        from outside it is included. Default: the radius holding 99 % of the PSF
        light (at most the PSF half-size).
    rtol : float
        Tolerance of each sub-cell integral near the cusp, relative to the light
        within one PSF FWHM of the centre.
    resolve : float, optional
        Sampling the profile at pixel centres is trusted where its scale length
        across the minor axis exceeds ``resolve`` pixels; closer to the centre the
        oversampled window takes over. Default ``1 + min(3, 25 * psf.aliasing)``:
        1 pixel for PSFs band-limited below the pixel frequency, up to 4 for
        under-sampled ones (F090W here: ~3).
    taper_width : float
        Width (pixels across the minor axis) of the taper into the window.
    fine_resolve, fine_taper_width : float
        The same, in PSF elements, for the cusp zone of the oversampled window (its
        adaptive sub-cells).

    Notes
    -----
    The construction and its accuracy are described at the top of this section of
    :mod:`sphot_core.psf` and in ``docs/sersic.rst``.
    """

    def __init__(
        self,
        shape,
        psf: PSFModel,
        *,
        margin: Optional[int] = None,
        rtol: float = 3e-4,
        resolve: Optional[float] = None,
        taper_width: float = 5.0,
        fine_resolve: float = 2.0,
        fine_taper_width: float = 3.0,
    ):
        ny, nx = (int(shape[0]), int(shape[1]))
        if ny < 1 or nx < 1:
            raise InputError(f"renderer image shape must be positive, got {shape}")
        self.shape = (ny, nx)
        self.psf = psf
        self.os = psf.oversample
        h = psf.half_extent
        if margin is None:
            margin = int(min(h, np.ceil(psf.radius_for_energy(0.99))))
        self.margin = int(margin)
        self.rtol = float(rtol)
        if resolve is None:
            resolve = 1.0 + min(3.0, 25.0 * psf.aliasing)
        self.resolve = float(resolve)
        self.taper_width = float(taper_width)
        self.fine_resolve = float(fine_resolve)
        self.fine_taper_width = float(fine_taper_width)
        m = self.margin
        self.grid_shape = (ny + 2 * m, nx + 2 * m)
        self.fft_shape = (sfft.next_fast_len(ny + m + h, real=True), sfft.next_fast_len(nx + m + h, real=True))
        self._k0_hat = psf._cached(("k0_rfft", self.fft_shape), self._make_k0_hat)
        res = _residual_kernels(psf)
        self.core_radius = res["radius"]
        self._phases = res["phases"]
        self._residual = res["kernels"]
        self._ref_radius = max(1.0, psf.fwhm)
        self._assign_cache = {}

    def __repr__(self) -> str:
        return f"SersicRenderer(shape={self.shape}, psf={self.psf.filter!r}, margin={self.margin}, fft={self.fft_shape})"

    # ------------------------------------------------------------ kernels
    def _make_k0_hat(self):
        k = self.psf.grid_kernel
        h = k.shape[0] // 2
        big = np.zeros(self.fft_shape)
        idx_y = np.arange(-h, h + 1) % self.fft_shape[0]
        idx_x = np.arange(-h, h + 1) % self.fft_shape[1]
        big[np.ix_(idx_y, idx_x)] = k
        out = sfft.rfft2(big)
        out.setflags(write=False)
        return out

    def _residual_hat(self, shape):
        def make():
            out = sfft.rfft2(self._residual, s=shape, axes=(-2, -1))
            out.setflags(write=False)
            return out

        return self.psf._cached(("residual_rfft", shape), make)

    def _assign_matrix(self, nodes: int) -> np.ndarray:
        """Keys weights from ``nodes`` oversampled nodes (from a pixel centre on) to pixels -1..W+1."""
        mat = self._assign_cache.get(nodes)
        if mat is None:
            w = nodes // self.os
            u = np.arange(nodes) / self.os
            k = np.arange(-1, w + 2)
            mat = keys_kernel(k[:, None] - u[None, :])
            self._assign_cache[nodes] = mat
        return mat

    # --------------------------------------------------------------- plan
    def plan(self, profile) -> RenderPlan:
        """Window, taper and cusp quadrature for ``profile`` (a SersicProfile)."""
        return self._build(profile)[0]

    def _build(self, profile):
        """The plan of ``profile`` and the window's node masses for it."""
        step = 1.0 / self.os
        zone_r, zone_w = cusp_zone(profile, step, self.fine_resolve, self.fine_taper_width)
        radius, width = cusp_zone(profile, 1.0, self.resolve, self.taper_width, min_cells=2.0)
        radius = max(radius, zone_r + zone_w)
        a = radius + width
        b = a * profile.q
        c, s = np.cos(profile.theta), np.sin(profile.theta)
        hx = int(np.ceil(np.hypot(a * c, b * s))) + 1
        hy = int(np.ceil(np.hypot(a * s, b * c))) + 1
        m = self.margin
        gy, gx = self.grid_shape
        cy = int(np.floor(profile.y_0 + 0.5)) + m
        cx = int(np.floor(profile.x_0 + 0.5)) + m
        iy0, iy1 = max(cy - hy, 0), min(cy + hy + 1, gy)
        ix0, ix1 = max(cx - hx, 0), min(cx + hx + 1, gx)
        if iy1 <= iy0 or ix1 <= ix0:
            iy0, iy1, ix0, ix1 = 0, 1, 0, 1
        wy, wx = iy1 - iy0, ix1 - ix0
        unit = profile.scaled(1.0)
        m_ref = unit.total_flux * float(sersic_enclosed_fraction(self._ref_radius, unit.r_eff, unit.n))
        quad, masses = build_quadrature(
            unit,
            ix0 - m,
            iy0 - m,
            step,
            (wy * self.os, wx * self.os),
            atol=self.rtol * m_ref,
            assign="keys",
            outer=(radius, width),
            resolve=self.fine_resolve,
            width_cells=self.fine_taper_width,
            max_level=16,
        )
        return RenderPlan((iy0, ix0, wy, wx), (radius, width), quad), masses * profile.amplitude

    # ------------------------------------------------------------- images
    def sersic_image(self, profile, plan: Optional[RenderPlan] = None) -> np.ndarray:
        """The PSF-convolved image of one Sersic component (its amplitude included).

        ``plan`` (from :meth:`plan`) may be reused for nearby parameters.
        """
        if plan is None:
            plan, nodes = self._build(profile)
        else:
            nodes = plan.quad.masses(profile)
        return self._image(profile, plan, nodes)

    def _image(self, profile, plan: RenderPlan, nodes: np.ndarray) -> np.ndarray:
        m = self.margin
        gy, gx = self.grid_shape
        coarse = profile.grid(np.arange(gx, dtype=float) - m, np.arange(gy, dtype=float) - m)
        iy0, ix0, wy, wx = plan.window
        xs = np.arange(ix0, ix0 + wx, dtype=float) - m
        ys = np.arange(iy0, iy0 + wy, dtype=float) - m
        rho = profile.elliptical_radius(xs[None, :], ys[:, None])
        coarse[iy0 : iy0 + wy, ix0 : ix0 + wx] *= 1.0 - elliptical_taper(rho, *plan.taper)
        return self._convolve(coarse, nodes, plan.window)

    def point_image(self, x: float, y: float, flux: float = 1.0) -> np.ndarray:
        """The image of a point source of total ``flux`` at ``(x, y)`` (PSF origin there)."""
        m = self.margin
        gy, gx = self.grid_shape
        cy = int(np.floor(y)) + m
        cx = int(np.floor(x)) + m
        iy0, ix0 = min(max(cy - 1, 0), gy - 1), min(max(cx - 1, 0), gx - 1)
        wy, wx = min(4, gy - iy0), min(4, gx - ix0)
        ty = (y + m - iy0) * self.os
        tx = (x + m - ix0) * self.os
        ny_n, nx_n = wy * self.os, wx * self.os
        wgt_y = keys_kernel(ty - np.arange(ny_n))
        wgt_x = keys_kernel(tx - np.arange(nx_n))
        nodes = flux * np.outer(wgt_y, wgt_x)
        return self._convolve(np.zeros(self.grid_shape), nodes, (iy0, ix0, wy, wx))

    def component_images(self, params: Mapping[str, float], model=None, plans=None):
        """Unit images of the linear components of a galaxy model.

        Parameters
        ----------
        params : mapping
            Parameter values (amplitudes and ``flux_point`` are ignored).
        model : ModelSpec or str, optional
            Default: inferred from the parameter names.
        plans : list of RenderPlan, optional
            One per Sersic component, reused instead of new plans.

        Returns
        -------
        images : list of ndarray
            In the order of ``model.linear``: each Sersic component with amplitude 1,
            then the unit-flux nucleus.
        plans : list of RenderPlan
        """
        spec = _spec(params, model)
        profiles = spec.profiles(params, unit=True)
        if plans is None:
            built = [self._build(p) for p in profiles]
            plans = [b[0] for b in built]
            images = [self._image(p, b[0], b[1]) for p, b in zip(profiles, built)]
        else:
            images = [self.sersic_image(p, pl) for p, pl in zip(profiles, plans)]
        if spec.point:
            images.append(self.point_image(float(params["x_0"]), float(params["y_0"])))
        return images, plans

    def render(self, params: Mapping[str, float], model=None) -> np.ndarray:
        """The PSF-convolved model image of ``params`` (amplitudes included)."""
        spec = _spec(params, model)
        images, _ = self.component_images(params, spec)
        out = np.zeros(self.shape)
        for name, img in zip(spec.linear, images):
            out += float(params[name]) * img
        return out

    def _convolve(self, coarse: np.ndarray, nodes: np.ndarray, window) -> np.ndarray:
        """Pixel-centre masses (*) K_0 plus oversampled window masses (*) K_p."""
        iy0, ix0, wy, wx = window
        os_ = self.os
        m = self.margin
        ny, nx = self.shape
        gy, gx = self.grid_shape
        # Keys assignment of the window's node masses to pixels (-1 .. W+1)
        assigned = self._assign_matrix(wy * os_) @ nodes @ self._assign_matrix(wx * os_).T
        y0, x0 = iy0 - 1, ix0 - 1
        sy0, sx0 = max(0, -y0), max(0, -x0)
        sy1, sx1 = min(assigned.shape[0], gy - y0), min(assigned.shape[1], gx - x0)
        coarse[y0 + sy0 : y0 + sy1, x0 + sx0 : x0 + sx1] += assigned[sy0:sy1, sx0:sx1]
        out = sfft.irfft2(sfft.rfft2(coarse, s=self.fft_shape) * self._k0_hat, s=self.fft_shape)
        image = out[m : m + ny, m : m + nx].copy()
        if self._residual.shape[0]:
            self._add_residual(image, nodes, window)
        return image

    def _add_residual(self, image: np.ndarray, nodes: np.ndarray, window) -> None:
        """Add sum_p F_p (*) R_p (phases p != 0) around the window."""
        iy0, ix0, wy, wx = window
        os_ = self.os
        rc = self.core_radius
        stack = nodes.reshape(wy, os_, wx, os_).transpose(1, 3, 0, 2).reshape(os_ * os_, wy, wx)[1:]
        shape = (_fast_size(wy + 2 * rc), _fast_size(wx + 2 * rc))
        spec = np.einsum("pij,pij->ij", sfft.rfft2(stack, s=shape, axes=(-2, -1)), self._residual_hat(shape))
        corr = sfft.irfft2(spec, s=shape)[: wy + 2 * rc, : wx + 2 * rc]
        ny, nx = self.shape
        y0 = iy0 - rc - self.margin
        x0 = ix0 - rc - self.margin
        sy0, sx0 = max(0, -y0), max(0, -x0)
        sy1, sx1 = min(corr.shape[0], ny - y0), min(corr.shape[1], nx - x0)
        if sy1 > sy0 and sx1 > sx0:
            image[y0 + sy0 : y0 + sy1, x0 + sx0 : x0 + sx1] += corr[sy0:sy1, sx0:sx1]


def _spec(params, model):
    """The model of ``params``: given (name or ModelSpec) or inferred from the names."""
    if model is None:
        return split_params(params)
    return model_spec(model) if isinstance(model, str) else model


def _fast_size(n: int) -> int:
    """FFT length >= n from a short list (bounds the number of cached transforms)."""
    return sfft.next_fast_len(int(16 * np.ceil(n / 16)), real=True)

