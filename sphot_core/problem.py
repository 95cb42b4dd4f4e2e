"""The Sersic fitting problem: data, noise, mask, model, bounds, transforms and loss.

A :class:`SersicProblem` owns everything an optimizer needs, so that an optimizer
plugin is a few lines around a minimiser (see :class:`sphot_core.stages.SersicFitter`):

* the **model**: a galaxy model of :data:`sphot_core.sersic.MODELS` rendered by a
  :class:`sphot_core.psf.SersicRenderer`, plus an optional fixed image (the other
  components) and an optional constant sky offset;
* the **linear parameters** (amplitudes, ``flux_point``, the sky offset) solved
  exactly at each evaluation (non-negatively except the sky), so optimizers search
  only the shape;
* the **engine variables**: SExtractor's change of variables makes every shape
  parameter unbounded (``linear``, ``bounded-linear`` ``q = a + (b - a) / (1 +
  exp(-Q))`` and ``bounded-log``, the same in ``log q``); ellipticity and position
  angle of a component are one ``polar`` pair ``(E1, E2)`` with
  ``ellip = e_max tanh|E|`` and ``theta = atan2(E2, E1) / 2``, which has no boundary
  at round shapes and no wrap-around of the angle;
* the **loss**: chi-square ``sum(u**2)`` with ``u = (data - model) / sigma``, or the
  robust modified least squares ``sum(g(u)**2)`` with
  ``g(u) = u0 asinh(u / u0)``, ``u0 = kappa`` (SExtractor's ``u0 = kappa sigma`` in
  units of sigma), plus an optional Tikhonov term on the axis ratio. Masked and NaN
  pixels are simply absent: the loss is a plain sum (never divided by the number of
  pixels), so its normalisation does not change when the mask does;
* the **result**: :meth:`SersicProblem.finalize` computes the covariance from the
  Jacobian at the solution (the inverse of the approximate Hessian ``J^T J``, linear
  parameters included), propagates it to the total flux, sets the flags of
  :data:`sphot_core.flags.GALAXY_FLAGS` and returns a
  :class:`sphot_core.stages.SersicResult`.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
import numpy as np
from scipy import ndimage

from .errors import DegenerateCutoutError, InputError
from .flags import GALAXY_FLAGS
from .psf import PSFModel, SersicRenderer
from .sersic import N_MAX, N_MIN, ModelSpec, model_spec, sersic_flux_gradient, split_params
from .stages import SersicResult

__all__ = ["SersicProblem", "make_scale_problem", "LOSSES", "Transform"]

log = logging.getLogger(__name__)

#: names accepted by ``loss=``
LOSSES = ("chi2", "robust")

#: largest |Q| used by global optimizers for bounded engine variables (sigmoid 1e-3 .. 1 - 1e-3)
ENGINE_LIMIT = 7.0
#: largest |E| of the polar ellipticity pair in ``engine_box`` (tanh 2.65 = 0.99)
POLAR_LIMIT = 2.65
#: a parameter closer than this fraction of its range to a bound is flagged as at the bound
BOUND_TOLERANCE = 1e-3
#: evaluation value returned instead of non-finite residuals (per pixel)
BAD_RESIDUAL = 1e6
#: minimum number of usable pixels per fitted parameter (TOO_FEW_PIXELS below)
PIXELS_PER_PARAMETER = 10


# ----------------------------------------------------------------------- transforms


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@attrs.frozen
class Transform:
    """Change of variables between one physical parameter and its engine variable.

    Attributes
    ----------
    kind : {"linear", "bounded_linear", "bounded_log"}
    lower, upper : float
        Bounds of the physical value (unused by ``linear``).
    """

    kind: str
    lower: float = -math.inf
    upper: float = math.inf

    def to_physical(self, engine: float, upper: Optional[float] = None) -> float:
        hi = self.upper if upper is None else min(self.upper, upper)
        if self.kind == "linear":
            return float(engine)
        s = float(_sigmoid(engine))
        if self.kind == "bounded_linear":
            value = self.lower + (hi - self.lower) * s
        else:
            lo = math.log(self.lower)
            value = math.exp(lo + (math.log(hi) - lo) * s)
        return min(max(value, self.lower), hi)  # no rounding past a bound

    def to_engine(self, value: float, upper: Optional[float] = None, margin: float = 1e-3) -> float:
        """Engine value of ``value``; values at or beyond a bound are moved ``margin`` inside."""
        hi = self.upper if upper is None else min(self.upper, upper)
        if self.kind == "linear":
            return float(value)
        if self.kind == "bounded_linear":
            f = (value - self.lower) / (hi - self.lower)
        else:
            f = (math.log(max(value, 1e-300)) - math.log(self.lower)) / (math.log(hi) - math.log(self.lower))
        f = min(max(f, margin), 1.0 - margin)
        return math.log(f / (1.0 - f))

    def fraction(self, value: float, upper: Optional[float] = None) -> float:
        """Position of ``value`` in its range, 0 at the lower and 1 at the upper bound."""
        hi = self.upper if upper is None else min(self.upper, upper)
        if self.kind == "bounded_log":
            return (math.log(value) - math.log(self.lower)) / (math.log(hi) - math.log(self.lower))
        return (value - self.lower) / (hi - self.lower)


@attrs.frozen
class _Coord:
    """One engine coordinate (scalar) or pair (polar ellipticity)."""

    names: Tuple[str, ...]  # physical names it sets
    transform: Optional[Transform]  # None for the polar pair
    e_max: float = 0.0  # polar only
    upper_from: Optional[str] = None  # name of the parameter bounding this one from above

    @property
    def size(self) -> int:
        return len(self.names)

    @property
    def polar(self) -> bool:
        return self.transform is None


# ------------------------------------------------------------------------- helpers


def _default_bounds(shape: Tuple[int, int]) -> Dict[str, Tuple[float, float]]:
    ny, nx = shape
    big = float(max(nx, ny))
    return {
        "x_0": (-0.5, nx - 0.5),
        "y_0": (-0.5, ny - 0.5),
        "r_eff": (0.5, big),
        "n": (0.3, 10.0),
        "ellip": (0.0, 0.9),
        "theta": (-math.inf, math.inf),
    }


def _base_name(name: str) -> str:
    for sfx in ("_disk", "_bulge"):
        if name.endswith(sfx):
            return name[: -len(sfx)]
    return name


#: the part of each shape parameter's range a Sersic profile supports
#: (:meth:`sphot_core.sersic.SersicProfile.validate`); theta is unrestricted
_DOMAIN = {
    "x_0": (-math.inf, math.inf, "finite"),
    "y_0": (-math.inf, math.inf, "finite"),
    "r_eff": (0.0, math.inf, "finite and > 0"),
    "n": (N_MIN, N_MAX, f"in the supported range {N_MIN:g}..{N_MAX:g}"),
    "ellip": (0.0, 1.0, "in [0, 1)"),
}


def _check_domain(name: str, lo: float, hi: float, what: str) -> None:
    """Raise InputError if ``[lo, hi]`` reaches outside the supported domain of ``name``."""
    base = _base_name(name)
    if base not in _DOMAIN:
        return
    d_lo, d_hi, text = _DOMAIN[base]
    ok = math.isfinite(lo) and math.isfinite(hi) and d_lo <= lo and hi <= d_hi
    if base == "r_eff":
        ok = ok and lo > 0.0
    elif base == "ellip":
        ok = ok and hi < 1.0
    if not ok:
        shown = f"{lo:g}" if lo == hi else f"({lo:g}, {hi:g})"
        raise InputError(f"{what} {name!r} {shown} must be {text}")


def _moments_start(data: np.ndarray, usable: np.ndarray) -> Dict[str, float]:
    """Centre, half-light radius, ellipticity and angle from image moments.

    The centre search takes the peak of the smoothed image weighted towards the
    middle of the cutout (cutouts are centred on their galaxy; a bright star near an
    edge must not win), then refines it with flux-weighted moments.
    """
    ny, nx = data.shape
    filled = np.where(usable, data, 0.0)
    bg = float(np.median(data[usable]))
    smooth = ndimage.gaussian_filter(np.where(usable, filled - bg, 0.0), 2.0)
    yy, xx = np.indices(data.shape)
    prior = np.exp(-0.5 * (((xx - (nx - 1) / 2) / (nx / 3)) ** 2 + ((yy - (ny - 1) / 2) / (ny / 3)) ** 2))
    yc, xc = np.unravel_index(int(np.argmax(smooth * prior)), smooth.shape)
    radius = 0.25 * min(nx, ny)
    start = {"x_0": float(xc), "y_0": float(yc), "r_eff": max(1.0, radius / 4.0), "ellip": 0.1, "theta": 0.0}
    for _ in range(2):
        dx = xx - start["x_0"]
        dy = yy - start["y_0"]
        sel = usable & (dx * dx + dy * dy <= radius * radius)
        w = np.clip(filled - bg, 0.0, None) * sel
        tot = w.sum()
        if not tot > 0:
            break
        mx, my = (w * xx).sum() / tot, (w * yy).sum() / tot
        dx, dy = xx - mx, yy - my
        cxx, cyy, cxy = (w * dx * dx).sum() / tot, (w * dy * dy).sum() / tot, (w * dx * dy).sum() / tot
        tr, det = cxx + cyy, cxx * cyy - cxy * cxy
        disc = math.sqrt(max(tr * tr / 4.0 - det, 0.0))
        l1, l2 = tr / 2.0 + disc, max(tr / 2.0 - disc, 1e-6)
        q = math.sqrt(l2 / l1) if l1 > 0 else 1.0
        theta = 0.5 * math.atan2(2.0 * cxy, cxx - cyy)
        c, s = math.cos(theta), math.sin(theta)
        rho = np.hypot(dx * c + dy * s, (dy * c - dx * s) / max(q, 0.1))[sel]
        order = np.argsort(rho)
        cum = np.cumsum(w[sel][order])
        r_half = float(rho[order][np.searchsorted(cum, 0.5 * cum[-1])])
        start.update(x_0=float(mx), y_0=float(my), r_eff=max(r_half, 0.6), ellip=min(1.0 - q, 0.8), theta=theta % math.pi)
        radius = min(max(4.0 * start["r_eff"], 5.0), 0.5 * max(nx, ny))
    return start


def _as_noise(noise, shape) -> np.ndarray:
    if noise is None:
        raise InputError("SersicProblem needs a noise level (scalar or per-pixel sigma), got None")
    arr = np.asarray(noise, dtype=float)
    if arr.ndim == 0:
        return np.full(shape, float(arr))
    if arr.shape != shape:
        raise InputError(f"noise map shape {arr.shape} does not match the image shape {shape}")
    return arr


# --------------------------------------------------------------------------- problem


class SersicProblem:
    """A galaxy model fit to one image (see the module documentation).

    Parameters
    ----------
    image : ndarray
        Data with the other components removed (NaN = no data).
    noise : float or ndarray
        Per-pixel 1-sigma uncertainty (pixels with non-positive or non-finite noise
        are excluded).
    psf : PSFModel
    mask : ndarray of bool, optional
        ``True`` = excluded pixel.
    fixed : ndarray, optional
        Image added to the model and held fixed (other components).
    model : str
        ``"sersic"``, ``"disk+bulge"`` or ``"sersic+point"``.
    start : mapping, optional
        Physical starting values; missing ones come from image moments.
    bounds : mapping, optional
        ``name -> (lower, upper)`` overriding the defaults (generic names such as
        ``"r_eff"`` apply to every component).
    fixed_params : mapping, optional
        ``name -> value`` held fixed.
    loss : {"chi2", "robust"}
    robust_kappa : float
        ``u0`` of the robust loss in units of sigma.
    regularize_aspect : bool
        Add the Tikhonov term ``(ln(b/a) / aspect_prior_sigma)**2`` per component.
    aspect_prior_sigma : float
    solve_sky : bool
        Solve a constant sky offset with the amplitudes.
    renderer : SersicRenderer, optional
        A renderer for this shape and PSF (default: a new one).
    """

    def __init__(
        self,
        image,
        noise,
        psf: PSFModel,
        *,
        mask=None,
        fixed=None,
        model: str = "sersic",
        start: Optional[Mapping[str, float]] = None,
        bounds: Optional[Mapping[str, Tuple[float, float]]] = None,
        fixed_params: Optional[Mapping[str, float]] = None,
        loss: str = "chi2",
        robust_kappa: float = 10.0,
        regularize_aspect: bool = False,
        aspect_prior_sigma: float = 1.0,
        solve_sky: bool = False,
        renderer: Optional[SersicRenderer] = None,
    ):
        data = np.asarray(image, dtype=float)
        if data.ndim != 2:
            raise InputError(f"SersicProblem: image must be 2-D, got shape {data.shape}")
        if not isinstance(psf, PSFModel):
            raise InputError(f"SersicProblem: psf must be a PSFModel, got {type(psf).__name__}")
        if loss not in LOSSES:
            raise InputError(f"SersicProblem: unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        if not robust_kappa > 0 or not aspect_prior_sigma > 0:
            raise InputError("SersicProblem: robust_kappa and aspect_prior_sigma must be positive")
        self.shape = data.shape
        self.psf = psf
        self.spec: ModelSpec = model_spec(model)
        self.loss_name = loss
        self.kappa = float(robust_kappa)
        self.regularize_aspect = bool(regularize_aspect)
        self.aspect_sigma = float(aspect_prior_sigma)
        self.solve_sky = bool(solve_sky)
        sigma = _as_noise(noise, self.shape)
        extra = np.zeros(self.shape) if fixed is None else np.asarray(fixed, dtype=float)
        if extra.shape != self.shape:
            raise InputError(f"fixed image shape {extra.shape} does not match the image shape {self.shape}")
        usable = np.isfinite(data) & np.isfinite(sigma) & (sigma > 0) & np.isfinite(extra)
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != self.shape:
                raise InputError(f"mask shape {mask.shape} does not match the image shape {self.shape}")
            usable &= ~mask
        self.n_pix = int(usable.sum())
        if self.n_pix == 0:
            raise DegenerateCutoutError(
                f"no finite, unmasked pixel with positive noise in the {self.shape[1]}x{self.shape[0]} "
                "fit region: nothing to fit"
            )
        self.usable = usable
        self.fixed = extra
        self._data = (data - extra)[usable]
        self._w = 1.0 / sigma[usable]
        self._dw = self._data * self._w
        self.renderer = renderer if renderer is not None else SersicRenderer(self.shape, psf)
        self._setup_parameters(data, start, bounds, fixed_params)
        #: scale problems: the largest centre shift (SHIFT_AT_BOUND instead of AT_*_BOUND)
        self.shift_max: Optional[float] = None
        self.nfev = 0
        self.n_nonfinite = 0
        self._cache: Tuple[Optional[bytes], Optional[dict]] = (None, None)

    # ------------------------------------------------------------ parameters
    def _setup_parameters(self, data, start, bounds, fixed_params) -> None:
        spec = self.spec
        self.linear_names: Tuple[str, ...] = spec.linear + (("sky_offset",) if self.solve_sky else ())
        self._constrained = np.array([name != "sky_offset" for name in self.linear_names])
        shape_names = [n for n in spec.param_names if n not in spec.linear]
        self.pinned: Dict[str, float] = {k: float(v) for k, v in spec.fixed_defaults.items()}
        for name, value in (fixed_params or {}).items():
            if name not in spec.param_names:
                raise InputError(f"fixed parameter {name!r} is not a parameter of model {spec.name!r}")
            if name not in spec.linear:
                self.pinned[name] = float(value)
        generic = _default_bounds(self.shape)
        user = dict(bounds or {})
        unknown = [k for k in user if k not in spec.param_names and k not in generic]
        if unknown:
            raise InputError(f"bounds for unknown parameter(s) {', '.join(unknown)} of model {spec.name!r}")
        self.bounds: Dict[str, Tuple[float, float]] = {}
        for name in shape_names:
            lo, hi = user.get(name, user.get(_base_name(name), generic[_base_name(name)]))
            lo, hi = float(lo), float(hi)
            if name in self.pinned:
                _check_domain(name, self.pinned[name], self.pinned[name], "fixed value of")
            else:
                if not lo < hi:
                    raise InputError(f"bounds of {name!r} are empty: ({lo}, {hi})")
                _check_domain(name, lo, hi, "bounds of")
            self.bounds[name] = (lo, hi)
        given = {k: float(v) for k, v in (start or {}).items() if k in spec.param_names}
        if all(n in given for n in shape_names if n not in self.pinned):
            # every free shape parameter has a start: no image moments needed (~10 ms on 255^2)
            auto = {name: 0.0 for name in spec.linear}
        else:
            auto = self._auto_start(data)
        self.start = {**auto, **given, **self.pinned}
        self.coords: List[_Coord] = self._make_coords(shape_names)
        self.free_names: Tuple[str, ...] = tuple(n for c in self.coords for n in c.names)
        self.n_free = len(self.free_names)

    def _auto_start(self, data) -> Dict[str, float]:
        mom = _moments_start(np.where(self.usable, data - self.fixed, np.nan), self.usable)
        out = {"x_0": mom["x_0"], "y_0": mom["y_0"]}
        for sfx in self.spec.components:
            r = mom["r_eff"] * {"": 1.0, "_disk": 1.5, "_bulge": 0.3}[sfx]
            out[f"r_eff{sfx}"] = r
            out[f"n{sfx}"] = {"": 2.0, "_disk": 1.0, "_bulge": 3.0}[sfx]
            out[f"ellip{sfx}"] = mom["ellip"] if sfx != "_bulge" else 0.5 * mom["ellip"]
            out[f"theta{sfx}"] = mom["theta"]
        for name in self.spec.linear:
            out[name] = 0.0
        return out

    def _make_coords(self, shape_names: Sequence[str]) -> List[_Coord]:
        coords = []
        done = set()
        for name in shape_names:
            if name in self.pinned or name in done:
                continue
            base = _base_name(name)
            sfx = name[len(base) :]
            lo, hi = self.bounds[name]
            if base in ("x_0", "y_0"):
                coords.append(_Coord((name,), Transform("bounded_linear", lo, hi)))
            elif base == "r_eff":
                upper_from = "r_eff_disk" if sfx == "_bulge" and "r_eff_disk" not in self.pinned else None
                coords.append(_Coord((name,), Transform("bounded_log", lo, hi), upper_from=upper_from))
            elif base == "n":
                coords.append(_Coord((name,), Transform("bounded_linear", lo, hi)))
            elif base in ("ellip", "theta"):
                e_name, t_name = f"ellip{sfx}", f"theta{sfx}"
                e_lo, e_hi = self.bounds[e_name]
                t_lo, t_hi = self.bounds[t_name]
                pair_free = e_name not in self.pinned and t_name not in self.pinned
                if pair_free and e_lo <= 0.0 and not (math.isfinite(t_lo) or math.isfinite(t_hi)):
                    coords.append(_Coord((e_name, t_name), None, e_max=min(e_hi, 0.99)))
                    done.update((e_name, t_name))
                elif base == "ellip":
                    coords.append(_Coord((name,), Transform("bounded_linear", max(lo, 0.0), min(hi, 0.99))))
                else:
                    kind = "bounded_linear" if math.isfinite(lo) and math.isfinite(hi) else "linear"
                    coords.append(_Coord((name,), Transform(kind, lo, hi)))
            done.add(name)
        # the bulge radius is bounded by the disk radius: decode the disk first
        coords.sort(key=lambda c: c.upper_from is not None)
        return coords

    # --------------------------------------------------------- engine <-> physical
    @property
    def engine_size(self) -> int:
        return sum(c.size for c in self.coords)

    def decode(self, q) -> Dict[str, float]:
        """Physical shape parameters (pinned ones included) of engine vector ``q``."""
        q = np.asarray(q, dtype=float)
        out = dict(self.pinned)
        i = 0
        for c in self.coords:
            if c.polar:
                e1, e2 = float(q[i]), float(q[i + 1])
                mod = math.hypot(e1, e2)
                out[c.names[0]] = c.e_max * math.tanh(mod)
                out[c.names[1]] = (0.5 * math.atan2(e2, e1)) % math.pi
            else:
                upper = out.get(c.upper_from) if c.upper_from else None
                out[c.names[0]] = c.transform.to_physical(q[i], upper)
            i += c.size
        return out

    def encode(self, params: Mapping[str, float]) -> np.ndarray:
        """Engine vector of physical ``params`` (values at bounds moved slightly inside)."""
        q = []
        for c in self.coords:
            if c.polar:
                e = min(max(float(params[c.names[0]]), 0.0), c.e_max * (1.0 - 1e-3))
                mod = math.atanh(e / c.e_max)
                th = 2.0 * float(params[c.names[1]])
                q += [mod * math.cos(th), mod * math.sin(th)]
            else:
                upper = params.get(c.upper_from) if c.upper_from else None
                q.append(c.transform.to_engine(float(params[c.names[0]]), upper))
        return np.array(q, dtype=float)

    def start_engine(self, start: Optional[Mapping[str, float]] = None) -> np.ndarray:
        """Engine vector of the starting point (``start`` overrides the problem's own)."""
        merged = {**self.start, **{k: float(v) for k, v in (start or {}).items() if k in self.start}, **self.pinned}
        return self.encode(merged)

    @property
    def engine_box(self) -> Tuple[np.ndarray, np.ndarray]:
        """Finite (lower, upper) box of the engine space for global optimizers."""
        lo, hi = [], []
        start = self.start_engine()
        i = 0
        for c in self.coords:
            if c.polar:
                lo += [-POLAR_LIMIT] * 2
                hi += [POLAR_LIMIT] * 2
            elif c.transform.kind == "linear":
                lo.append(start[i] - 0.5 * math.pi)
                hi.append(start[i] + 0.5 * math.pi)
            else:
                lo.append(-ENGINE_LIMIT)
                hi.append(ENGINE_LIMIT)
            i += c.size
        return np.array(lo), np.array(hi)

    # ---------------------------------------------------------------- evaluation
    def render(self, params: Mapping[str, float]) -> np.ndarray:
        """The full model image of physical ``params`` (fixed image and sky included)."""
        img = self.renderer.render(params, self.spec) + self.fixed
        return img + float(params.get("sky_offset", 0.0))

    def _columns(self, params, plans=None):
        images, plans = self.renderer.component_images(params, self.spec, plans)
        self.nfev += 1
        cols = [img[self.usable] for img in images]
        if self.solve_sky:
            cols.append(np.ones(self.n_pix))
        return np.stack(cols, axis=1), plans

    def _solve_linear(self, cols: np.ndarray):
        """Linear parameters minimising the loss (non-negative except the sky)."""
        xw = cols * self._w[:, None]
        weights = None
        a = _nonneg_lstsq(xw, self._dw, self._constrained)
        if self.loss_name == "robust":
            for _ in range(8):
                u = self._dw - xw @ a
                weights = _robust_weights(u, self.kappa)
                sw = np.sqrt(weights)
                new = _nonneg_lstsq(xw * sw[:, None], self._dw * sw, self._constrained)
                done = np.allclose(new, a, rtol=1e-9, atol=1e-12 * (1.0 + np.abs(a).max()))
                a = new
                if done:
                    break
        return a

    def _regularization(self, params) -> List[float]:
        if not self.regularize_aspect:
            return []
        out = []
        for c in self.coords:
            if not c.names[0].startswith("ellip"):
                continue
            e = params[c.names[0]]
            factor = -math.log1p(-e) / e if e > 1e-12 else 1.0
            if c.polar:
                th = 2.0 * params[c.names[1]]
                out += [e * factor * math.cos(th) / self.aspect_sigma, e * factor * math.sin(th) / self.aspect_sigma]
            else:
                out.append(e * factor / self.aspect_sigma)
        return out

    def _evaluate(self, q, plans=None) -> dict:
        """Residual vector and everything that made it (cached for the last ``q``)."""
        q = np.asarray(q, dtype=float)
        key = q.tobytes()
        if plans is None and self._cache[0] == key:
            return self._cache[1]
        try:
            if not np.all(np.isfinite(q)):
                raise FloatingPointError("non-finite engine vector")
            with np.errstate(invalid="ignore", over="ignore"):
                params = self.decode(q)
                cols, plans = self._columns(params, plans)
                a = self._solve_linear(cols)
                u = self._dw - (cols * self._w[:, None]) @ a
            if not np.all(np.isfinite(u)):
                raise FloatingPointError("non-finite model")
            resid = u if self.loss_name == "chi2" else self.kappa * np.arcsinh(u / self.kappa)
            reg = self._regularization(params)
            if reg:
                resid = np.concatenate([resid, reg])
            out = {"q": q, "params": params, "plans": plans, "cols": cols, "a": a, "u": u, "resid": resid, "ok": True}
        except (ArithmeticError, np.linalg.LinAlgError) as exc:  # numerical failures only
            self.n_nonfinite += 1
            log.debug("model evaluation failed at engine %s: %s", q, exc)
            size = self.n_pix + (len(self._regularization(self.start)) if self.regularize_aspect else 0)
            out = {"q": q, "params": None, "plans": None, "resid": np.full(size, BAD_RESIDUAL), "ok": False}
        if plans is None:
            self._cache = (key, out)
        return out

    def residuals(self, q) -> np.ndarray:
        """Vector whose sum of squares is the loss at engine ``q``."""
        return self._evaluate(q)["resid"]

    def loss(self, q) -> float:
        """The objective at engine ``q`` (chi-square or robust, plus regularisation)."""
        r = self.residuals(q)
        return float(r @ r)

    def jacobian(self, q, step: float = 1e-5) -> np.ndarray:
        """Forward-difference Jacobian of :meth:`residuals` in engine space.

        The rendering plans (windows, adaptive sub-cells) are frozen at ``q`` so that
        the differences see a smooth model.
        """
        base = self._evaluate(q)
        q = np.asarray(q, dtype=float)
        jac = np.empty((base["resid"].size, q.size))
        if not base["ok"]:
            jac[:] = 0.0
            return jac
        for i in range(q.size):
            h = step * max(1.0, abs(q[i]))
            qi = q.copy()
            qi[i] += h
            jac[:, i] = (self._evaluate(qi, plans=base["plans"])["resid"] - base["resid"]) / h
        return jac

    def gradient(self, q) -> np.ndarray:
        """Gradient of :meth:`loss` (``2 J^T r``) from :meth:`jacobian`."""
        return 2.0 * self.jacobian(q).T @ self.residuals(q)

    # ------------------------------------------------------------------ finalize
    def finalize(
        self, q, *, success: bool, message: str = "", nfev: Optional[int] = None, optimizer: str = ""
    ) -> SersicResult:
        """The :class:`SersicResult` at engine ``q``: parameters, covariance, flux, flags."""
        q = np.asarray(q, dtype=float).reshape(-1)
        ev = self._evaluate(q)
        nfev = self.nfev if nfev is None else int(nfev)
        notes = [message] if message else []
        flags = 0
        if not success:
            flags |= GALAXY_FLAGS.NOT_CONVERGED
        n_lin = len(self.linear_names)
        if self.n_pix < PIXELS_PER_PARAMETER * (self.n_free + n_lin):
            flags |= GALAXY_FLAGS.TOO_FEW_PIXELS
            notes.append(f"only {self.n_pix} usable pixels for {self.n_free + n_lin} parameters")
        if self.n_nonfinite:
            flags |= GALAXY_FLAGS.NONFINITE
            notes.append(f"{self.n_nonfinite} evaluation(s) gave a non-finite model or loss")
        if not ev["ok"]:
            return self._failed_result(q, flags, notes, nfev, optimizer)
        params = dict(ev["params"])
        params.update(zip(self.linear_names, map(float, ev["a"])))
        flags |= self._bound_flags(params, notes)
        names, cov = self._covariance(ev)
        errors = {n: 0.0 if n in self.pinned else float("nan") for n in self.spec.param_names}
        if cov is None:
            flags |= GALAXY_FLAGS.SINGULAR_COVARIANCE
            notes.append("the covariance matrix is singular: errors are NaN")
        else:
            errors.update({n: float(math.sqrt(max(cov[i, i], 0.0))) for i, n in enumerate(names)})
        grad = self._flux_gradient(params, names)
        flux, flux_err = self._flux(params, grad, cov)
        flux_err_fixed = self._flux_err_fixed_shape(names, grad, cov)
        # a NaN error (singular covariance) says nothing about the signal
        if not flux > 0 or (np.isfinite(flux_err) and flux_err >= flux):
            flags |= GALAXY_FLAGS.NO_SIGNAL
            notes.append("the model flux is zero or below its 1-sigma error")
        chi2 = float(ev["u"] @ ev["u"])
        dof = self.n_pix - self.n_free - n_lin
        sky = params.pop("sky_offset", 0.0)
        for name in list(params):
            if name.startswith("theta"):
                params[name] = params[name] % math.pi
        return SersicResult(
            params={n: float(params[n]) for n in self.spec.param_names},
            errors={n: errors.get(n, float("nan")) for n in self.spec.param_names},
            names=tuple(names),
            covariance=cov,
            flux=float(flux),
            flux_err=float(flux_err),
            loss=float(ev["resid"] @ ev["resid"]),
            chi2=chi2,
            dof=int(dof),
            success=bool(success),
            message="; ".join(notes),
            nfev=nfev,
            flags=int(flags),
            sky_offset=float(sky),
            optimizer=optimizer,
            model=self.spec.name,
            flux_err_fixed_shape=float(flux_err_fixed),
        )

    def _failed_result(self, q, flags, notes, nfev, optimizer) -> SersicResult:
        notes.append("the model could not be evaluated at the solution")
        nan = float("nan")
        params = {n: nan for n in self.spec.param_names}
        try:
            params.update(self.decode(q))
        except (ValueError, OverflowError):
            pass
        return SersicResult(
            params=params,
            errors={n: nan for n in self.spec.param_names},
            names=(),
            covariance=None,
            flux=nan,
            flux_err=nan,
            loss=nan,
            chi2=nan,
            dof=self.n_pix - self.n_free - len(self.linear_names),
            success=False,
            message="; ".join(notes),
            nfev=nfev,
            flags=int(flags | GALAXY_FLAGS.NONFINITE),
            optimizer=optimizer,
            model=self.spec.name,
        )

    def _bound_flags(self, params: Mapping[str, float], notes: List[str]) -> int:
        flags = 0
        for c in self.coords:
            if c.polar:
                frac, name = params[c.names[0]] / c.e_max, c.names[0]
                lower = False
            else:
                name = c.names[0]
                upper = params.get(c.upper_from) if c.upper_from else None
                if c.transform.kind == "linear":
                    continue
                frac = c.transform.fraction(params[name], upper)
                lower = frac <= BOUND_TOLERANCE
            at_bound = lower or frac >= 1.0 - BOUND_TOLERANCE
            if at_bound and self.shift_max is not None and name in ("x_0", "y_0"):
                flags |= GALAXY_FLAGS.SHIFT_AT_BOUND
                notes.append(f"{name} shifted by the largest allowed {self.shift_max:g} px")
            elif lower:
                flags |= GALAXY_FLAGS.AT_LOWER_BOUND
                lo = c.transform.lower
                hint = " (unresolved source?)" if name.startswith("r_eff") else ""
                notes.append(f"{name} at its lower bound {lo:g}{hint}")
            elif frac >= 1.0 - BOUND_TOLERANCE:
                flags |= GALAXY_FLAGS.AT_UPPER_BOUND
                notes.append(f"{name} at its upper bound")
        for name, value in params.items():
            if name in self.spec.linear and value <= 0.0:
                flags |= GALAXY_FLAGS.AT_LOWER_BOUND
                notes.append(f"{name} is zero (non-negativity bound)")
        return flags

    def _covariance_coords(self, params):
        """Physical coordinates for the covariance: shape values, (e1, e2) for polar pairs."""
        vec, names = [], []
        for c in self.coords:
            if c.polar:
                e, th = params[c.names[0]], 2.0 * params[c.names[1]]
                vec += [e * math.cos(th), e * math.sin(th)]
                names += list(c.names)
            else:
                vec.append(params[c.names[0]])
                names.append(c.names[0])
        return np.array(vec), names

    def _params_from_coords(self, vec) -> Dict[str, float]:
        out = dict(self.pinned)
        i = 0
        for c in self.coords:
            if c.polar:
                e1, e2 = vec[i], vec[i + 1]
                out[c.names[0]] = math.hypot(e1, e2)
                out[c.names[1]] = 0.5 * math.atan2(e2, e1)
            else:
                out[c.names[0]] = float(vec[i])
            i += c.size
        return out

    def _covariance(self, ev) -> Tuple[List[str], Optional[np.ndarray]]:
        """Covariance of the free shape and the non-zero linear parameters.

        The inverse of ``J^T J``, ``J`` the Jacobian of the residuals (data rows times
        ``g'(u)`` for the robust loss, plus the regularisation rows) by the physical
        parameters at the solution, the linear ones included.
        """
        params, plans, a = ev["params"], ev["plans"], ev["a"]
        vec, shape_names = self._covariance_coords(params)
        active = [i for i, v in enumerate(a) if v != 0.0 or not self._constrained[i]]
        cols_w = ev["cols"] * self._w[:, None]
        names = shape_names + [self.linear_names[i] for i in active]
        n_reg = len(self._regularization(params))
        jac = np.zeros((self.n_pix + n_reg, len(names)))
        for i in range(vec.size):
            h = _covariance_step(shape_names[i], vec[i])
            plus, minus = vec.copy(), vec.copy()
            plus[i] += h
            minus[i] -= h
            p_plus, p_minus = self._params_from_coords(plus), self._params_from_coords(minus)
            try:
                diff = self._columns(p_plus, plans)[0] @ a - self._columns(p_minus, plans)[0] @ a
            except (InputError, ValueError):
                return names, None
            jac[: self.n_pix, i] = diff * self._w / (2.0 * h)
            if n_reg:
                reg = np.array(self._regularization(p_plus)) - np.array(self._regularization(p_minus))
                jac[self.n_pix :, i] = reg / (2.0 * h)
        for j, i in enumerate(active):
            jac[: self.n_pix, vec.size + j] = cols_w[:, i]
        if self.loss_name == "robust":
            jac[: self.n_pix] /= np.sqrt(1.0 + (ev["u"] / self.kappa) ** 2)[:, None]
        if jac.shape[1] == 0:
            return names, np.zeros((0, 0))
        cov = _invert(jac.T @ jac)
        if cov is None:
            return names, None
        return names, self._polar_to_physical(cov, names, params)

    def _polar_to_physical(self, cov, names, params) -> np.ndarray:
        """Transform covariance rows of (e1, e2) pairs to (ellip, theta)."""
        t = np.eye(len(names))
        for c in self.coords:
            if not c.polar:
                continue
            i = names.index(c.names[0])
            e, th = params[c.names[0]], 2.0 * params[c.names[1]]
            e1, e2 = e * math.cos(th), e * math.sin(th)
            if e <= 0:
                t[i : i + 2, i : i + 2] = np.nan
                continue
            t[i, i : i + 2] = [e1 / e, e2 / e]
            t[i + 1, i : i + 2] = [-e2 / (2 * e * e), e1 / (2 * e * e)]
        return t @ cov @ t.T

    def _flux(self, params, grad, cov) -> Tuple[float, float]:
        """Total flux and its error (``grad``: the flux's derivatives by the covariance's parameters)."""
        flux = self.spec.total_flux(params)
        if cov is None:
            return flux, float("nan")
        return flux, _sigma(float(grad @ cov @ grad))

    def _flux_err_fixed_shape(self, names, grad, cov) -> float:
        """Flux error with the shape held fixed: the covariance of the linear parameters
        given the shape, ``C_ll - C_ls C_ss^-1 C_sl`` (the inverse of the linear block
        of ``J^T J``)."""
        lin = [i for i, n in enumerate(names) if n in self.linear_names]
        if cov is None or not lin:
            return float("nan")
        shape = [i for i in range(len(names)) if i not in lin]
        c_ll = cov[np.ix_(lin, lin)]
        if shape:
            c_ls = cov[np.ix_(lin, shape)]
            try:
                c_ll = c_ll - c_ls @ np.linalg.solve(cov[np.ix_(shape, shape)], c_ls.T)
            except np.linalg.LinAlgError:
                return float("nan")
        g = grad[lin]
        return _sigma(float(g @ c_ll @ g))

    def _flux_gradient(self, params, names) -> np.ndarray:
        """Derivatives of the total flux by the parameters in ``names``."""
        grad = np.zeros(len(names))
        for sfx in self.spec.components:
            g = sersic_flux_gradient(*(params[f"{base}{sfx}"] for base in ("amplitude", "r_eff", "n", "ellip")))
            for base, value in g.items():
                if f"{base}{sfx}" in names:
                    grad[names.index(f"{base}{sfx}")] += value
        if "flux_point" in names:
            grad[names.index("flux_point")] += 1.0
        return grad


def _sigma(var: float) -> float:
    """sqrt of a variance, NaN for a negative or non-finite one (a singular covariance)."""
    return math.sqrt(var) if var >= 0 and np.isfinite(var) else float("nan")


def _covariance_step(name: str, value: float) -> float:
    """Central-difference step of one covariance coordinate (physical units)."""
    base = _base_name(name)
    if base in ("x_0", "y_0"):
        return 1e-3
    if base in ("r_eff", "n"):
        return 1e-4 * abs(value)
    return 1e-4  # e1, e2, ellip, theta


def _invert(h: np.ndarray) -> Optional[np.ndarray]:
    """Inverse of a symmetric positive definite matrix, None if (numerically) singular."""
    if not np.all(np.isfinite(h)):
        return None
    d = np.sqrt(np.diag(h))
    if np.any(d <= 0):
        return None
    scaled = h / np.outer(d, d)
    w, v = np.linalg.eigh(scaled)
    if w.min() <= 1e-12 * w.max():
        return None
    return (v / w) @ v.T / np.outer(d, d)


def _robust_weights(u: np.ndarray, kappa: float) -> np.ndarray:
    """IRLS weights ``g(u) g'(u) / u`` of the loss ``g(u)**2``, ``g = kappa asinh(u / kappa)``."""
    t = u / kappa
    small = np.abs(t) < 1e-6
    safe = np.where(small, 1.0, t)
    w = np.arcsinh(safe) / (safe * np.sqrt(1.0 + safe * safe))
    return np.where(small, 1.0, w)


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray, constrained: np.ndarray) -> np.ndarray:
    """Least squares ``x a = y`` with ``a >= 0`` where ``constrained`` (few unknowns).

    Solves the normal equations on every subset of the constrained unknowns held at
    zero and keeps the feasible solution of lowest residual (exact for the handful
    of linear parameters of a galaxy model).
    """
    k = x.shape[1]
    gram = x.T @ x
    rhs = x.T @ y
    best, best_cost = np.zeros(k), float(y @ y)
    cons = np.flatnonzero(constrained)
    for mask in range(1 << cons.size):
        zero = cons[[bool(mask >> j & 1) for j in range(cons.size)]]
        free = np.setdiff1d(np.arange(k), zero)
        if free.size == 0:
            continue
        g = gram[np.ix_(free, free)]
        try:
            sol = np.linalg.solve(g, rhs[free])
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(g, rhs[free], rcond=None)[0]
        if np.any(sol[constrained[free]] < 0):
            continue
        cost = float(y @ y - 2.0 * sol @ rhs[free] + sol @ g @ sol)
        if cost < best_cost - 1e-12 * abs(best_cost):
            best_cost = cost
            best = np.zeros(k)
            best[free] = sol
    return best


# ------------------------------------------------------------------------ scale fit


def make_scale_problem(
    image,
    noise,
    psf: PSFModel,
    base_params: Mapping[str, float],
    *,
    mask=None,
    fixed=None,
    shift_max: float = 2.0,
    allow_refit: bool = False,
    free: Sequence[str] = (),
    loss: str = "chi2",
    model: Optional[str] = None,
    **kwargs,
) -> SersicProblem:
    """A problem for a non-base filter: the shape pinned to ``base_params``.

    The amplitudes (and ``flux_point``) are solved linearly; the centre may move by
    up to ``shift_max`` pixels in x and y (``0``: nothing left to search, optimizers
    just finalize). ``allow_refit=True`` frees every parameter, starting from
    ``base_params`` with the default bounds; ``free`` names shape parameters fitted in
    this band too (e.g. ``("r_eff",)`` lets the size follow a colour gradient). Other
    keyword arguments go to :class:`SersicProblem`.
    """
    spec = split_params(base_params) if model is None else model_spec(model)
    missing = [n for n in spec.param_names if n not in spec.linear and n not in base_params and n not in spec.fixed_defaults]
    if missing:
        raise InputError(f"base parameters lack {', '.join(missing)} for model {spec.name!r}")
    start = {k: float(v) for k, v in base_params.items() if k in spec.param_names}
    if allow_refit:
        return SersicProblem(image, noise, psf, mask=mask, fixed=fixed, model=spec.name, start=start, loss=loss, **kwargs)
    if shift_max < 0:
        raise InputError(f"shift_max must be >= 0, got {shift_max}")
    free = set(free or ())
    unknown = free - set(spec.param_names)
    if unknown:
        raise InputError(f"free parameter(s) {', '.join(sorted(unknown))} are not parameters of model {spec.name!r}")
    pinned = {
        k: v
        for k, v in start.items()
        if k not in spec.linear and k not in free and (shift_max == 0 or k not in ("x_0", "y_0"))
    }
    bounds = dict(kwargs.pop("bounds", None) or {})
    if shift_max > 0:
        bounds["x_0"] = (start["x_0"] - shift_max, start["x_0"] + shift_max)
        bounds["y_0"] = (start["y_0"] - shift_max, start["y_0"] + shift_max)
    problem = SersicProblem(
        image,
        noise,
        psf,
        mask=mask,
        fixed=fixed,
        model=spec.name,
        start=start,
        bounds=bounds,
        fixed_params=pinned,
        loss=loss,
        **kwargs,
    )
    problem.shift_max = float(shift_max)
    return problem
