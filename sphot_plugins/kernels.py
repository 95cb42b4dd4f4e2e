"""Built-in PSF kernel families: ``gaussian``, ``moffat`` and ``drizzle``.

A kernel family describes the blur ``K`` in ``psf = library_psf (*) K`` (see
:class:`sphot_core.stages.KernelFamily`). Parameters are in image pixels; ``render``
returns ``K`` on the grid of the oversampled PSF: an odd, square array centred on its
middle element, non-negative and normalised to unit sum.

Sampling
--------
The continuous kernel is sampled at the centres of the oversampled elements (the
convolution with the library PSF is then the rectangle rule of the continuous
convolution, which is accurate for kernels wider than about one element). The
drizzle box is integrated exactly over each element instead, because a box is not
smooth. A width of zero renders the identity kernel ``[[1.0]]``.

Angles follow the package convention: radians, counter-clockwise from the +x axis
(x = column), with arrays indexed ``[y, x]``.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Tuple

import attrs
import numpy as np

from sphot_core.errors import ConfigError
from sphot_core.hookspecs import StrategySpec
from sphot_core.psf import gaussian_kernel
from sphot_core.stages import KernelFamily, KernelParameter

__all__ = ["GaussianKernel", "MoffatKernel", "DrizzleKernel", "SPECS"]

_IDENTITY = np.ones((1, 1))
_IDENTITY.setflags(write=False)

_positive = attrs.validators.gt(0.0)
_non_negative = attrs.validators.ge(0.0)


def _axis(half: int) -> np.ndarray:
    return np.arange(-half, half + 1, dtype=float)


def _normalised(k: np.ndarray) -> np.ndarray:
    return k / k.sum()


class _Family(KernelFamily):
    """Shared parameter checking of the built-in families."""

    def _values(self, params: Mapping[str, float]) -> Dict[str, float]:
        """The parameter values as floats; raise ConfigError on missing or invalid ones."""
        out = {}
        for p in self.parameters():
            if p.name not in params:
                names = ", ".join(q.name for q in self.parameters())
                raise ConfigError(f"kernel {self.name!r}: parameter {p.name!r} is missing (parameters: {names})")
            value = float(params[p.name])
            if not math.isfinite(value):
                raise ConfigError(f"kernel {self.name!r}: parameter {p.name!r} is not finite ({value!r})")
            out[p.name] = value
        return out


# ----------------------------------------------------------------------- gaussian


@attrs.frozen
class GaussianOptions:
    """Options of the ``gaussian`` family (``[psf-calib.gaussian]``).

    Attributes
    ----------
    elliptical : bool
        Add the axis ratio ``ratio`` (minor/major sigma) and the major-axis angle
        ``theta`` (radians CCW from +x) to the round ``sigma``.
    max_sigma : float
        Upper bound of ``sigma`` (image pixels).
    truncate : float
        Kernel half-size in units of the (major-axis) sigma.
    """

    elliptical: bool = False
    max_sigma: float = attrs.field(default=5.0, validator=_positive)
    truncate: float = attrs.field(default=5.0, validator=_positive)


class GaussianKernel(_Family):
    """Gaussian blur ``K ~ exp(-u^2 / 2 sigma^2 - v^2 / 2 (ratio sigma)^2)``.

    ``u, v`` are the coordinates along the major and minor axes; the round kernel has
    ``ratio = 1``. ``sigma = 0`` is the identity.
    """

    name = "gaussian"
    Options = GaussianOptions

    def parameters(self) -> Tuple[KernelParameter, ...]:
        sigma = KernelParameter(
            "sigma", start=0.5, lower=0.0, upper=self.options.max_sigma, description="major-axis sigma"
        )
        if not self.options.elliptical:
            return (sigma,)
        return (
            sigma,
            # the start is slightly elliptical (a round kernel gives theta no gradient) and
            # at the middle of the angle range: every orientation is then reachable
            # without crossing the ends of [0, pi]
            KernelParameter("ratio", start=0.9, lower=0.1, upper=1.0, unit="", description="minor/major sigma"),
            KernelParameter(
                "theta", start=math.pi / 2, lower=0.0, upper=math.pi, unit="rad", description="major axis, CCW from +x"
            ),
        )

    def identity(self) -> Dict[str, float]:
        out = {p.name: p.start for p in self.parameters()}
        out["sigma"] = 0.0
        if self.options.elliptical:
            out["ratio"] = 1.0
        return out

    def render(self, params: Mapping[str, float], oversample: int) -> np.ndarray:
        v = self._values(params)
        s = v["sigma"] * oversample
        if s < 0:
            raise ConfigError(f"kernel 'gaussian': sigma must be >= 0, got {v['sigma']!r}")
        if s == 0:
            return _IDENTITY
        half = max(1, int(math.ceil(self.options.truncate * s)))
        ratio = v.get("ratio", 1.0)
        if not 0 < ratio <= 1:
            raise ConfigError(f"kernel 'gaussian': ratio must be in (0, 1], got {ratio!r}")
        if ratio == 1.0:
            return gaussian_kernel(s, half)
        r = _axis(half)
        c, sn = math.cos(v["theta"]), math.sin(v["theta"])
        yy, xx = np.meshgrid(r, r, indexing="ij")
        u = xx * c + yy * sn
        w = -xx * sn + yy * c
        return _normalised(np.exp(-0.5 * ((u / s) ** 2 + (w / (ratio * s)) ** 2)))


# ------------------------------------------------------------------------- moffat


@attrs.frozen
class MoffatOptions:
    """Options of the ``moffat`` family (``[psf-calib.moffat]``).

    Attributes
    ----------
    max_alpha : float
        Upper bound of ``alpha`` (image pixels).
    radius : float
        The kernel is cut at this radius (image pixels) and renormalised. The cut does
        not depend on the parameters, so the kernel (and the calibration loss) varies
        smoothly with them; the wings of small ``beta`` converge too slowly to be
        rendered to a fixed enclosed energy.
    """

    max_alpha: float = attrs.field(default=6.0, validator=_positive)
    radius: float = attrs.field(default=10.0, validator=_positive)


class MoffatKernel(_Family):
    """Moffat blur ``K ~ (1 + r^2 / alpha^2) ** -beta`` for ``r <= radius``, 0 beyond.

    ``alpha = 0`` is the identity. Large ``beta`` tends to a Gaussian of sigma
    ``alpha / sqrt(2 beta)``.
    """

    name = "moffat"
    Options = MoffatOptions

    def parameters(self) -> Tuple[KernelParameter, ...]:
        return (
            KernelParameter("alpha", start=1.0, lower=0.0, upper=self.options.max_alpha, description="core width"),
            KernelParameter("beta", start=3.0, lower=1.5, upper=10.0, unit="", description="wing power index"),
        )

    def identity(self) -> Dict[str, float]:
        return {"alpha": 0.0, "beta": 3.0}

    def render(self, params: Mapping[str, float], oversample: int) -> np.ndarray:
        v = self._values(params)
        alpha, beta = v["alpha"], v["beta"]
        if alpha < 0 or beta <= 1:
            raise ConfigError(f"kernel 'moffat': need alpha >= 0 and beta > 1, got alpha={alpha!r}, beta={beta!r}")
        if alpha == 0:
            return _IDENTITY
        radius = self.options.radius * oversample
        r = _axis(max(1, int(math.ceil(radius))))
        r2 = r[:, None] ** 2 + r[None, :] ** 2
        k = (1.0 + r2 / (alpha * oversample) ** 2) ** (-beta)
        k[r2 > radius**2] = 0.0
        return _normalised(k)


# ------------------------------------------------------------------------ drizzle


@attrs.frozen
class DrizzleOptions:
    """Options of the ``drizzle`` family (``[psf-calib.drizzle]``).

    Attributes
    ----------
    pixel_width : float
        Full width (image pixels) of the square box: the drizzle drop (``pixfrac``
        times the input pixel, in output pixels) combined with any pixel response
        missing from the library PSF. Fixed unless ``fit_width``.
    fit_width : bool
        Make the box width a free parameter ``width`` (poorly separated from
        ``sigma`` for widths below about 1.5 pixel: both mostly add variance).
    max_sigma, max_width : float
        Upper bounds (image pixels).
    truncate : float
        Half-size of the Gaussian part in units of sigma.
    """

    pixel_width: float = attrs.field(default=1.0, validator=_non_negative)
    fit_width: bool = False
    max_sigma: float = attrs.field(default=3.0, validator=_positive)
    max_width: float = attrs.field(default=3.0, validator=_positive)
    truncate: float = attrs.field(default=5.0, validator=_positive)


def _box_1d(width: float) -> np.ndarray:
    """Exact overlap of the box ``[-width/2, width/2]`` with unit cells centred on integers."""
    if width <= 0:
        return np.ones(1)
    half = max(0, int(math.ceil(width / 2.0 - 0.5)))
    i = _axis(half)
    lo = np.maximum(i - 0.5, -width / 2.0)
    hi = np.minimum(i + 0.5, width / 2.0)
    return np.clip(hi - lo, 0.0, None)


class DrizzleKernel(_Family):
    """Pixel-kernel blur of drizzled images: a square box convolved with a Gaussian.

    Drizzling spreads every input pixel over a square *drop* (``pixfrac`` times the
    input pixel) on the output grid; with a dither pattern and imperfect registration
    the effective PSF of the combined image is the instrument's PSF convolved with
    that drop (a box of side ``width``, aligned with the image axes) and with a
    Gaussian jitter of ``sigma``. Both factors are separable, so ``K = k (x) k`` with
    ``k`` the 1-D box convolved with the 1-D Gaussian.
    """

    name = "drizzle"
    Options = DrizzleOptions

    def parameters(self) -> Tuple[KernelParameter, ...]:
        o = self.options
        sigma = KernelParameter("sigma", start=0.3, lower=0.0, upper=o.max_sigma, description="Gaussian jitter")
        if not o.fit_width:
            return (sigma,)
        width = KernelParameter(
            "width", start=min(o.pixel_width, o.max_width), lower=0.0, upper=o.max_width, description="box width"
        )
        return (width, sigma)

    def identity(self):
        """``{width: 0, sigma: 0}`` when the width is free; ``None`` for a fixed box."""
        if self.options.fit_width or self.options.pixel_width == 0:
            return {p.name: 0.0 for p in self.parameters()}
        return None

    def render(self, params: Mapping[str, float], oversample: int) -> np.ndarray:
        v = self._values(params)
        width = v.get("width", self.options.pixel_width)
        sigma = v["sigma"]
        if width < 0 or sigma < 0:
            raise ConfigError(f"kernel 'drizzle': width and sigma must be >= 0, got {width!r}, {sigma!r}")
        k = _box_1d(width * oversample)
        s = sigma * oversample
        if s > 0:
            g = np.exp(-0.5 * (_axis(max(1, int(math.ceil(self.options.truncate * s)))) / s) ** 2)
            k = np.convolve(k, g)
        if k.size == 1:
            return _IDENTITY
        return _normalised(np.outer(k, k))


SPECS = [
    StrategySpec(
        name="gaussian",
        factory=GaussianKernel,
        options=GaussianOptions,
        description="Gaussian blur kernel (sigma; optionally elliptical)",
    ),
    StrategySpec(
        name="moffat",
        factory=MoffatKernel,
        options=MoffatOptions,
        description="Moffat blur kernel (alpha, beta), truncated on a circle",
    ),
    StrategySpec(
        name="drizzle",
        factory=DrizzleKernel,
        options=DrizzleOptions,
        description="drizzle pixel kernel: square box (fixed or fitted width) convolved with a Gaussian",
    ),
]
