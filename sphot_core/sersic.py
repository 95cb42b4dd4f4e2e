"""Sersic profile maths, models and accurate sub-pixel quadrature.

Parameter convention (astropy ``Sersic2D``)
-------------------------------------------
``I(x, y) = amplitude * exp(-b_n * ((z / r_eff) ** (1 / n) - 1))`` with the elliptical
radius ``z = sqrt(x_maj**2 + (x_min / (1 - ellip))**2)``, ``x_maj`` and ``x_min`` the
offsets from ``(x_0, y_0)`` along and across the major axis, whose position angle
``theta`` is counted counter-clockwise from +x. ``amplitude`` is the surface brightness
at ``r_eff`` (image units per pixel), ``r_eff`` the half-light radius along the major
axis (pixels), ``ellip = 1 - b/a`` and ``b_n`` the exact solution of
``P(2n, b_n) = 1/2`` (``scipy.special.gammaincinv(2n, 0.5)``). Pixel coordinates are
0-based with pixel centres at integers (pixel ``(0, 0)`` spans -0.5..0.5).

The total flux integrated to infinity is
``2 pi n exp(b_n) b_n**(-2n) Gamma(2n) r_eff**2 (1 - ellip) amplitude``.

Quadrature
----------
:func:`build_quadrature` integrates a profile over the cells of a regular grid of nodes
(pixels for :func:`render_sersic`, the PSF's oversampled grid for the convolution in
:mod:`sphot_core.psf`). Each cell is first represented by its centre sample (the
midpoint rule, exact enough where the profile is smooth). Cells are then refined
adaptively, libprofit-style: a cell is split into 2 x 2 sub-cells when the one-point
and four-point estimates of its integral differ by more than an absolute tolerance, or
when it is larger than the local scale length of the profile across its minor axis
(so that thin or tiny profiles are never missed between samples); the sub-cells are
tested again, down to ``max_level``. The cusp of high-``n`` profiles is thus integrated
on geometrically shrinking cells until its remaining error is below the tolerance, and
the total flux of the rendering converges to the analytic total.

The mass of each refined sub-cell is assigned back to the grid nodes either to the
cell it lies in (``assign="box"``: pixel integrals) or with the weights of the Keys
cubic-convolution kernel (``assign="keys"``). The latter is the adjoint of Keys
interpolation between the nodes: summing node masses times a function sampled at the
nodes equals integrating the profile times the Keys-interpolated function, to the
accuracy of the quadrature. That is how sub-node structure of the cusp reaches an
oversampled PSF without blurring it (Keys weights conserve mass and the first and
second moments, so where the profile is smooth they coincide with plain samples).
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Mapping, Optional, Tuple

import attrs
import numpy as np
from scipy import special

from .errors import InputError

__all__ = [
    "sersic_bn",
    "sersic_total_flux",
    "sersic_flux_gradient",
    "sersic_enclosed_fraction",
    "sersic_radius_enclosing",
    "magnitude",
    "SersicProfile",
    "ModelSpec",
    "MODELS",
    "model_spec",
    "split_params",
    "keys_kernel",
    "elliptical_taper",
    "cusp_zone",
    "Quadrature",
    "build_quadrature",
    "render_sersic",
    "N_MIN",
    "N_MAX",
]

#: 2.5 / ln(10): magnitude error per relative flux error
MAG_PER_LN_FLUX = 2.5 / math.log(10.0)
#: range of the Sersic index a profile supports (:meth:`SersicProfile.validate`)
N_MIN, N_MAX = 0.05, 20.0


# ----------------------------------------------------------------------------- maths


def sersic_bn(n):
    """Exact ``b_n``: ``P(2n, b_n) = 1/2`` (half the light inside ``r_eff``)."""
    return special.gammaincinv(2.0 * np.asarray(n, dtype=float), 0.5)


def _log_total_flux(amplitude, r_eff, n, ellip):
    n = np.asarray(n, dtype=float)
    b = sersic_bn(n)
    return (
        np.log(2.0 * np.pi * n)
        + b
        - 2.0 * n * np.log(b)
        + special.gammaln(2.0 * n)
        + 2.0 * np.log(r_eff)
        + np.log1p(-np.asarray(ellip, dtype=float))
        + np.log(amplitude)
    )


def sersic_total_flux(amplitude, r_eff, n, ellip=0.0):
    """Total flux integrated to infinity (image units).

    ``2 pi n exp(b_n) b_n**(-2n) Gamma(2n) r_eff**2 (1 - ellip) amplitude``, computed in
    logarithms so that large ``n`` does not overflow. Zero amplitude gives zero.
    """
    amplitude = np.asarray(amplitude, dtype=float)
    with np.errstate(divide="ignore"):
        out = np.exp(_log_total_flux(np.abs(amplitude), r_eff, n, ellip)) * np.sign(amplitude)
    return out if out.ndim else float(out)


def _dlogflux_dn(n: float) -> float:
    """d ln(total flux) / dn at fixed amplitude, r_eff, ellip (central difference)."""
    h = 1e-5 * max(1.0, n)
    return float((_log_total_flux(1.0, 1.0, n + h, 0.0) - _log_total_flux(1.0, 1.0, n - h, 0.0)) / (2 * h))


def sersic_flux_gradient(amplitude: float, r_eff: float, n: float, ellip: float) -> Dict[str, float]:
    """Partial derivatives of :func:`sersic_total_flux` by each parameter."""
    f = sersic_total_flux(amplitude, r_eff, n, ellip)
    return {
        "amplitude": f / amplitude if amplitude != 0 else sersic_total_flux(1.0, r_eff, n, ellip),
        "r_eff": 2.0 * f / r_eff,
        "n": f * _dlogflux_dn(n),
        "ellip": -f / (1.0 - ellip),
    }


def sersic_enclosed_fraction(radius, r_eff, n):
    """Fraction of the total light inside elliptical radius ``radius`` (major-axis px)."""
    radius = np.asarray(radius, dtype=float)
    x = sersic_bn(n) * (np.maximum(radius, 0.0) / r_eff) ** (1.0 / n)
    return special.gammainc(2.0 * n, x)


def sersic_radius_enclosing(fraction, r_eff, n):
    """Elliptical radius (major-axis px) enclosing ``fraction`` of the light."""
    return r_eff * (special.gammaincinv(2.0 * n, fraction) / sersic_bn(n)) ** n


def magnitude(flux: float, flux_err: float, zeropoint: Optional[float]) -> Tuple[float, float]:
    """AB magnitude and its 1-sigma error, ``mag = -2.5 log10(flux) + zeropoint``.

    NaN for both when the zeropoint is unknown or the flux is not positive.
    """
    if zeropoint is None or not np.isfinite(zeropoint) or not (flux > 0):
        return float("nan"), float("nan")
    return float(-2.5 * np.log10(flux) + zeropoint), float(MAG_PER_LN_FLUX * flux_err / flux)


# --------------------------------------------------------------------------- profile


@attrs.frozen(slots=False)
class SersicProfile:
    """One Sersic component (astropy ``Sersic2D`` convention, see the module doc).

    Attributes are floats; ``amplitude`` may be 1 for unit-amplitude renderings.
    """

    x_0: float
    y_0: float
    amplitude: float
    r_eff: float
    n: float
    ellip: float
    theta: float

    @classmethod
    def from_params(cls, params: Mapping[str, float], suffix: str = "", **override) -> "SersicProfile":
        """Build from a parameter dict (names with an optional suffix such as ``_disk``)."""
        values = {}
        for name in ("x_0", "y_0", "amplitude", "r_eff", "n", "ellip", "theta"):
            key = name if name in ("x_0", "y_0") else name + suffix
            values[name] = override.get(name, params.get(key))
        missing = [k for k, v in values.items() if v is None]
        if missing:
            which = f" for the {suffix.strip('_')}" if suffix else ""
            raise InputError(f"Sersic parameters missing{which}: {', '.join(missing)}")
        prof = cls(**{k: float(v) for k, v in values.items()})
        prof.validate()
        return prof

    def validate(self) -> None:
        """Raise :class:`InputError` for parameters outside the supported domain."""
        bad = []
        if not (self.r_eff > 0 and np.isfinite(self.r_eff)):
            bad.append(f"r_eff={self.r_eff:g} (must be > 0)")
        if not (N_MIN <= self.n <= N_MAX):
            bad.append(f"n={self.n:g} (supported {N_MIN:g}..{N_MAX:g})")
        if not (0.0 <= self.ellip < 1.0):
            bad.append(f"ellip={self.ellip:g} (must be in [0, 1))")
        if not all(np.isfinite([self.x_0, self.y_0, self.amplitude, self.theta])):
            bad.append("non-finite centre, amplitude or theta")
        if bad:
            raise InputError("invalid Sersic parameters: " + "; ".join(bad))

    @property
    def q(self) -> float:
        """Axis ratio ``b/a = 1 - ellip``."""
        return 1.0 - self.ellip

    @functools.cached_property
    def bn(self) -> float:
        return float(sersic_bn(self.n))

    @property
    def total_flux(self) -> float:
        return sersic_total_flux(self.amplitude, self.r_eff, self.n, self.ellip)

    def scaled(self, amplitude: float) -> "SersicProfile":
        return attrs.evolve(self, amplitude=float(amplitude))

    # ---------------------------------------------------------------- evaluate
    @functools.cached_property
    def _axes(self):
        """Rows of the map (dx, dy) -> (major, minor) offsets in units of r_eff and b."""
        c, s = math.cos(self.theta), math.sin(self.theta)
        inv_a = 1.0 / self.r_eff
        inv_b = inv_a / self.q
        return c * inv_a, s * inv_a, -s * inv_b, c * inv_b

    def _z2(self, x, y):
        """Squared elliptical radius in units of r_eff (broadcasting x against y)."""
        ax, ay, bx, by = self._axes
        dx = np.asarray(x, dtype=float) - self.x_0
        dy = np.asarray(y, dtype=float) - self.y_0
        u = dx * ax + dy * ay
        v = dx * bx + dy * by
        u *= u
        v *= v
        u += v
        return u

    def _from_z2(self, z2):
        """Surface brightness from the squared elliptical radius in units of r_eff (in place)."""
        if np.ndim(z2) == 0:
            z = float(z2) ** (0.5 / self.n)
            return self.amplitude * math.exp(self.bn * (1.0 - z))
        with np.errstate(divide="ignore"):
            t = np.log(z2, out=z2)
        t *= 0.5 / self.n
        np.exp(t, out=t)
        t *= -self.bn
        t += self.bn
        np.exp(t, out=t)
        t *= self.amplitude
        return t

    def __call__(self, x, y):
        """Surface brightness at ``(x, y)`` (arrays broadcast against each other)."""
        return self._from_z2(np.array(self._z2(x, y), dtype=float))

    def radial(self, radius):
        """Surface brightness at elliptical radius ``radius`` (major-axis pixels)."""
        z = np.asarray(radius, dtype=float) / self.r_eff
        return self._from_z2(z * z)

    def grid(self, xs, ys):
        """Surface brightness on the outer grid ``ys[:, None], xs[None, :]``."""
        ax, ay, bx, by = self._axes
        dx = np.asarray(xs, dtype=float) - self.x_0
        dy = np.asarray(ys, dtype=float) - self.y_0
        u = np.add.outer(dy * ay, dx * ax)
        v = np.add.outer(dy * by, dx * bx)
        u *= u
        v *= v
        u += v
        return self._from_z2(u)

    def elliptical_radius(self, x, y):
        """Elliptical radius (major-axis pixels) of ``(x, y)``."""
        z2 = self._z2(x, y)
        return np.sqrt(z2, out=z2) * self.r_eff if isinstance(z2, np.ndarray) else math.sqrt(z2) * self.r_eff

    def minor_scale(self, radius):
        """Local scale length ``|d ln I / dr|^-1`` across the minor axis at elliptical radius ``radius``.

        ``q n r_eff / b_n (radius / r_eff)**(1 - 1/n)``: zero at the cusp of ``n > 1``
        profiles, shrinking outwards for ``n < 1``.
        """
        r = np.maximum(np.asarray(radius, dtype=float), 1e-12 * self.r_eff)
        return self.q * self.n * self.r_eff / self.bn * (r / self.r_eff) ** (1.0 - 1.0 / self.n)

    def sharp_radius(self, scale: float, light_fraction: float = 1.0 - 1e-5) -> float:
        """Largest elliptical radius where the profile varies faster than ``scale`` pixels.

        The region where :meth:`minor_scale` is below ``scale``, limited to the radius
        enclosing ``light_fraction`` of the light (beyond it the profile is negligible).
        """
        r_max = float(sersic_radius_enclosing(light_fraction, self.r_eff, self.n))
        k = self.q * self.n * self.r_eff / self.bn  # minor_scale(r_eff)
        if abs(self.n - 1.0) < 1e-9:
            return r_max if k < scale else 0.0
        # r_star = r_eff (scale / k)**(n / (n - 1)), in logarithms (n near 1 overflows)
        log_ratio = min(self.n / (self.n - 1.0) * math.log(scale / k), 700.0)
        r_star = self.r_eff * math.exp(max(log_ratio, -700.0))
        if self.n > 1.0:
            return float(min(r_star, r_max))
        return r_max if r_star < r_max else 0.0


# ----------------------------------------------------------------------------- models


@attrs.frozen
class ModelSpec:
    """A galaxy model: its parameter names and how they map onto components.

    Attributes
    ----------
    name : str
    components : tuple of str
        Suffixes of the Sersic components (``""`` for the single Sersic).
    point : bool
        Whether an unresolved nucleus (``flux_point``) shares the centre.
    linear : tuple of str
        Parameters solved linearly (amplitudes, ``flux_point``).
    fixed_defaults : dict
        Parameters fixed by the model itself (the disk's ``n_disk = 1``).
    """

    name: str
    components: Tuple[str, ...]
    point: bool = False
    fixed_defaults: Dict[str, float] = attrs.field(factory=dict)

    @property
    def param_names(self) -> Tuple[str, ...]:
        names = ["x_0", "y_0"]
        for sfx in self.components:
            names += [f"amplitude{sfx}", f"r_eff{sfx}", f"n{sfx}", f"ellip{sfx}", f"theta{sfx}"]
        if self.point:
            names.append("flux_point")
        return tuple(names)

    @property
    def linear(self) -> Tuple[str, ...]:
        out = tuple(f"amplitude{sfx}" for sfx in self.components)
        return out + (("flux_point",) if self.point else ())

    def profiles(self, params: Mapping[str, float], unit: bool = False):
        """The :class:`SersicProfile` of each component (amplitude 1 if ``unit``)."""
        full = {**self.fixed_defaults, **params}
        out = []
        for sfx in self.components:
            over = {"amplitude": 1.0} if unit else {}
            out.append(SersicProfile.from_params(full, sfx, **over))
        return out

    def total_flux(self, params: Mapping[str, float]) -> float:
        """Total flux of all components (Sersic fluxes to infinity plus the nucleus)."""
        total = sum(p.total_flux for p in self.profiles(params))
        if self.point:
            total += float(params["flux_point"])
        return float(total)


MODELS: Dict[str, ModelSpec] = {
    "sersic": ModelSpec("sersic", ("",)),
    "disk+bulge": ModelSpec("disk+bulge", ("_disk", "_bulge"), fixed_defaults={"n_disk": 1.0}),
    "sersic+point": ModelSpec("sersic+point", ("",), point=True),
}


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` called ``name`` (``InputError`` listing the choices otherwise)."""
    key = str(name).strip().lower().replace(" ", "")
    if key not in MODELS:
        raise InputError(f"unknown galaxy model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[key]


def split_params(params: Mapping[str, float]) -> ModelSpec:
    """Infer the model from parameter names (``r_eff_disk`` -> disk+bulge, ``flux_point``)."""
    if "r_eff_disk" in params or "r_eff_bulge" in params:
        return MODELS["disk+bulge"]
    if "flux_point" in params:
        return MODELS["sersic+point"]
    return MODELS["sersic"]


# ------------------------------------------------------------------------ quadrature


def keys_kernel(t):
    """Keys cubic-convolution kernel (a = -1/2): interpolating, support (-2, 2)."""
    t = np.abs(np.asarray(t, dtype=float))
    t2 = t * t
    t3 = t2 * t
    inner = 1.5 * t3 - 2.5 * t2 + 1.0
    outer = -0.5 * t3 + 2.5 * t2 - 4.0 * t + 2.0
    return np.where(t <= 1.0, inner, np.where(t < 2.0, outer, 0.0))


def elliptical_taper(rho, radius: float, width: float):
    """1 inside elliptical radius ``radius``, a raised-cosine fall to 0 over ``width``."""
    rho = np.asarray(rho, dtype=float)
    out = (rho <= radius).astype(float)
    band = (rho > radius) & (rho < radius + width)
    if band.any():
        out[band] = 0.5 * (1.0 + np.cos((np.pi / width) * (rho[band] - radius)))
    return out


@attrs.frozen(eq=False)
class Quadrature:
    """How to integrate a profile over the cells of a regular node grid.

    The integrand is the profile times an optional outer taper ``w_out`` (both
    functions of the elliptical radius). It is split with a smooth partition of
    unity: the part times the *cusp-zone* taper ``w`` (1 inside ``zone_radius``,
    falling to 0 over ``zone_width``) is integrated on adaptively refined sub-cells
    ("leaves"); the part times ``1 - w``, smooth on the grid scale by construction, is
    sampled at the nodes (plus the ``h**4 / 24`` Laplacian term of a cell integral for
    ``box`` masses). Neither part has an edge, so no boundary error arises between
    them.

    Built by :func:`build_quadrature` for one set of parameters and reusable for
    nearby ones (finite-difference derivatives must not see the refinement change).
    Cell ``(j, i)`` is centred on node ``(y0 + j * spacing, x0 + i * spacing)``.

    Attributes
    ----------
    x0, y0, spacing : float
    shape : tuple
        Number of nodes ``(ny, nx)``.
    zone : tuple
        ``(radius, width)`` of the cusp-zone taper (major-axis pixels).
    outer : tuple or None
        ``(radius, width)`` of the outer taper.
    leaf_x, leaf_y, leaf_area : ndarray
        Centres and quadrature weights (areas; negative for the Richardson term) of
        the sub-cells covering the cusp zone.
    node_index, node_weight : ndarray, shape (n_leaves, k)
        Assignment of leaf masses to flat node indices.
    box : bool
        Node masses are cell integrals (``True``) or Keys-weighted integrals.
    """

    x0: float
    y0: float
    spacing: float
    shape: Tuple[int, int]
    zone: Tuple[float, float]
    outer: Optional[Tuple[float, float]]
    leaf_x: np.ndarray
    leaf_y: np.ndarray
    leaf_area: np.ndarray
    node_index: np.ndarray
    node_weight: np.ndarray
    box: bool

    @property
    def n_leaves(self) -> int:
        return int(self.leaf_x.size)

    def node_coordinates(self) -> Tuple[np.ndarray, np.ndarray]:
        """``xs`` and ``ys`` of the nodes (1-D)."""
        ny, nx = self.shape
        return self.x0 + self.spacing * np.arange(nx), self.y0 + self.spacing * np.arange(ny)

    def integrand(self, profile: SersicProfile, rho) -> np.ndarray:
        """Profile times the outer taper at elliptical radius ``rho``."""
        out = profile.radial(rho)
        if self.outer is not None:
            out *= elliptical_taper(rho, *self.outer)
        return out

    def masses(self, profile: SersicProfile) -> np.ndarray:
        """Integrals of the (tapered) ``profile`` assigned to the nodes, shape ``shape``."""
        xs, ys = self.node_coordinates()
        rho = profile.elliptical_radius(xs[None, :], ys[:, None])
        smooth = self.integrand(profile, rho) * (1.0 - elliptical_taper(rho, *self.zone))
        return self._assemble(smooth, self._leaf_masses(profile))

    def _leaf_masses(self, profile: SersicProfile) -> np.ndarray:
        rho = profile.elliptical_radius(self.leaf_x, self.leaf_y)
        return self.integrand(profile, rho) * elliptical_taper(rho, *self.zone) * self.leaf_area

    def _assemble(self, smooth: np.ndarray, leaf_mass: np.ndarray) -> np.ndarray:
        h2 = self.spacing * self.spacing
        out = smooth * h2
        if self.box:
            p = np.pad(smooth, 1, mode="edge")
            lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4.0 * smooth
            out += lap * (h2 / 24.0)
        if leaf_mass.size:
            contrib = (self.node_weight * leaf_mass[:, None]).ravel()
            out += np.bincount(self.node_index.ravel(), contrib, minlength=out.size).reshape(out.shape)
        return out


def _unresolved(profile: SersicProfile, rho, size: float, atol: float) -> np.ndarray:
    """Cells (elliptical radius ``rho`` of their centres, side ``size``) that may hide finer structure.

    True where the profile's smallest minor-axis scale length inside the cell is below
    the cell size *and* the profile's largest value inside the cell could give the
    cell a mass above ``atol``. The elliptical radius changes by at most
    ``|displacement| / q`` inside the cell, which bounds both.
    """
    reach = 0.7072 * size / profile.q
    lo = np.maximum(rho - reach, 0.0)
    scale = np.minimum(profile.minor_scale(lo), profile.minor_scale(rho + reach))
    return (scale < size) & (abs(profile.radial(lo)) * (size * size) > atol)


_CHILD = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]], dtype=float)  # (dx, dy) signs


def cusp_zone(
    profile: SersicProfile, spacing: float, resolve: float = 3.0, width_cells: float = 5.0, min_cells: float = 1.5
) -> Tuple[float, float]:
    """``(radius, width)`` of the taper enclosing where the profile is not resolved.

    The zone holds every elliptical radius where the minor-axis scale length is below
    ``resolve * spacing`` (the cusp of ``n > 1``, all of a tiny or thin profile) and at
    least ``min_cells`` cells across the minor axis (the kink of ``n <= 1`` profiles
    at the centre); the taper falls to zero over ``width_cells`` cells along the
    minor axis.
    """
    radius = max(profile.sharp_radius(resolve * spacing), min_cells * spacing / profile.q)
    return radius, width_cells * spacing / profile.q


def build_quadrature(
    profile: SersicProfile,
    x0: float,
    y0: float,
    spacing: float,
    shape: Tuple[int, int],
    *,
    atol: float,
    assign: str = "box",
    outer: Optional[Tuple[float, float]] = None,
    resolve: float = 3.0,
    width_cells: float = 5.0,
    max_level: int = 20,
) -> Tuple[Quadrature, np.ndarray]:
    """Adaptive quadrature of ``profile`` (times an outer taper) on a node grid.

    Parameters
    ----------
    profile : SersicProfile
    x0, y0, spacing, shape
        The node grid (see :class:`Quadrature`).
    atol : float
        Absolute tolerance on the integral of one sub-cell.
    assign : {"box", "keys"}
        Node masses are cell integrals, or Keys-weighted integrals (the adjoint of Keys
        interpolation between the nodes).
    outer : tuple, optional
        ``(radius, width)`` of an elliptical taper multiplying the profile.
    resolve, width_cells : float
        See :func:`cusp_zone`.
    max_level : int
        Maximum number of halvings of a cell.

    Returns
    -------
    quad : Quadrature
    masses : ndarray
        The node masses of ``profile`` (``quad.masses(profile)``, computed on the way).
    """
    if assign not in ("box", "keys"):
        raise ValueError(f"unknown assignment {assign!r}")
    ny, nx = shape
    zone = cusp_zone(profile, spacing, resolve, width_cells)
    xs = x0 + spacing * np.arange(nx)
    ys = y0 + spacing * np.arange(ny)
    rho = profile.elliptical_radius(xs[None, :], ys[:, None])
    quad0 = Quadrature(x0, y0, spacing, (ny, nx), zone, outer, *([np.zeros(0)] * 5), assign == "box")
    base = quad0.integrand(profile, rho)
    w = elliptical_taper(rho, *zone)
    # cells whose area can reach the zone
    jj, ii = np.nonzero(rho - 0.7072 * spacing / profile.q < zone[0] + zone[1])

    def g(x, y):
        r = profile.elliptical_radius(x, y)
        return quad0.integrand(profile, r) * elliptical_taper(r, *zone), r

    lx, ly, la, lr, lm = _refine(profile, g, xs[ii], ys[jj], (base * w)[jj, ii], rho[jj, ii], spacing, atol, max_level)
    index, weight = _assignment(lx, ly, jj * nx + ii, lr, x0, y0, spacing, shape, assign)
    quad = attrs.evolve(quad0, leaf_x=lx, leaf_y=ly, leaf_area=la, node_index=index, node_weight=weight)
    return quad, quad._assemble(base * (1.0 - w), lm)


def _refine(profile, g, cx, cy, cv, crho, spacing, atol, max_level):
    """Adaptive 2 x 2 splitting of cells (centres ``cx, cy``, integrand values ``cv``).

    A cell is split when its one-point and four-point integrals differ by more than
    ``atol`` or when it may hide unresolved structure. An accepted cell is integrated
    with the Richardson-extrapolated midpoint rule (exact for quadratics): its four
    children weigh ``s**2 / 3`` each and its centre ``-s**2 / 3``.

    Returns leaf x, y, weight, root-cell index and leaf mass (value times weight).
    """
    root = np.arange(cx.size)
    parts = []
    s = spacing
    for level in range(max_level):
        if cx.size == 0:
            break
        d = 0.25 * s
        kx = cx[:, None] + d * _CHILD[None, :, 0]
        ky = cy[:, None] + d * _CHILD[None, :, 1]
        kv, kr = g(kx, ky)
        if level == max_level - 1:
            split = np.zeros(cx.size, dtype=bool)
        else:
            err = np.abs(kv.mean(axis=1) - cv) * (s * s)
            split = (err > atol) | _unresolved(profile, crho, s, atol)
        keep = ~split
        nk = int(keep.sum())
        third = s * s / 3.0
        parts.append(
            (
                np.concatenate([kx[keep].ravel(), cx[keep]]),
                np.concatenate([ky[keep].ravel(), cy[keep]]),
                np.concatenate([np.full(4 * nk, third), np.full(nk, -third)]),
                np.concatenate([np.repeat(root[keep], 4), root[keep]]),
                np.concatenate([kv[keep].ravel() * third, cv[keep] * -third]),
            )
        )
        cx, cy, cv, crho = kx[split].ravel(), ky[split].ravel(), kv[split].ravel(), kr[split].ravel()
        root = np.repeat(root[split], 4)
        s *= 0.5
    if not parts:
        empty = np.zeros(0)
        return empty, empty, empty, np.zeros(0, dtype=np.intp), empty
    return tuple(np.concatenate(col) for col in zip(*parts))


def _keys_taps(t):
    """Keys weights of the nodes floor(t) - 1 .. floor(t) + 2 for positions ``t`` (shape (..., 4))."""
    f = t - np.floor(t)
    f2 = f * f
    f3 = f2 * f
    out = np.empty(t.shape + (4,))
    out[..., 0] = -0.5 * f3 + f2 - 0.5 * f
    out[..., 1] = 1.5 * f3 - 2.5 * f2 + 1.0
    out[..., 2] = -1.5 * f3 + 2.0 * f2 + 0.5 * f
    out[..., 3] = 0.5 * f3 - 0.5 * f2
    return out


def _assignment(lx, ly, roots, leaf_root, x0, y0, spacing, shape, assign):
    """Flat node indices and weights receiving each leaf's mass."""
    ny, nx = shape
    if assign == "box":
        return roots[leaf_root.astype(np.intp)][:, None], np.ones((lx.size, 1))
    tx = (lx - x0) / spacing
    ty = (ly - y0) / spacing
    offs = np.arange(-1, 3)
    ix = np.floor(tx).astype(np.intp)[:, None] + offs[None, :]
    iy = np.floor(ty).astype(np.intp)[:, None] + offs[None, :]
    wx = np.where((ix >= 0) & (ix < nx), _keys_taps(tx), 0.0)
    wy = np.where((iy >= 0) & (iy < ny), _keys_taps(ty), 0.0)
    np.clip(ix, 0, nx - 1, out=ix)
    np.clip(iy, 0, ny - 1, out=iy)
    index = (iy[:, :, None] * nx + ix[:, None, :]).reshape(lx.size, 16)
    weight = (wy[:, :, None] * wx[:, None, :]).reshape(lx.size, 16)
    return index, weight


def render_sersic(
    shape: Tuple[int, int],
    profile: SersicProfile,
    *,
    rtol: float = 1e-6,
    max_level: int = 20,
) -> np.ndarray:
    """The profile integrated over each pixel (no PSF), with exact total flux.

    Smooth parts are sampled at pixel centres with the ``h**4/24`` Laplacian term of
    the pixel integral; the cusp zone is integrated adaptively (see the module doc).

    Parameters
    ----------
    shape : tuple
        ``(ny, nx)`` of the image.
    profile : SersicProfile
    rtol : float
        Tolerance on each sub-cell integral, relative to the total flux.

    Returns
    -------
    ndarray
        Flux in each pixel (image units); sums to the total flux of the profile when
        the profile lies inside the image.
    """
    atol = rtol * abs(profile.total_flux)
    return build_quadrature(profile, 0.0, 0.0, 1.0, shape, atol=atol, assign="box", max_level=max_level)[1]
