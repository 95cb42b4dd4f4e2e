"""Sky estimators: a robust tilted ``plane``, a ``constant`` and ``none``.

The sky is fitted to the residual image (data minus every fitted component) pixel by
pixel: no smoothing kernel, so the edges and corners weigh like the centre and carry no
zero-padding bias. Outliers (residuals of stars, the galaxy core) are removed by
iterative sigma clipping about the current fit. See ``docs/point_sources.rst``.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

import attrs
import numpy as np

from sphot_core.errors import FitError, InputError
from sphot_core.hookspecs import StrategySpec
from sphot_core.stages import SkyEstimator, SkyResult
from sphot_core.stats import MAD_TO_SIGMA

__all__ = ["SkyOptions", "robust_polynomial_sky", "PlaneSky", "ConstantSky", "NoSky", "SPECS"]

log = logging.getLogger(__name__)


@attrs.frozen
class SkyOptions:
    """Options of the ``plane`` and ``constant`` sky estimators (``[sky.plane]``, ``[sky.constant]``).

    Attributes
    ----------
    clip_sigma : float
        Pixels farther than this many robust sigmas from the current fit are rejected.
    maxiters : int
        Largest number of clip-and-refit passes.
    min_pixels : int
        Fewest usable pixels needed; fewer raise :class:`~sphot_core.errors.FitError`.
    """

    clip_sigma: float = attrs.field(default=3.0, validator=attrs.validators.gt(0))
    maxiters: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    min_pixels: int = attrs.field(default=50, validator=attrs.validators.ge(3))


def robust_polynomial_sky(
    residual: np.ndarray,
    noise: Optional[np.ndarray] = None,
    mask: Optional[np.ndarray] = None,
    *,
    degree: int = 1,
    clip_sigma: float = 3.0,
    maxiters: int = 10,
    min_pixels: int = 50,
) -> Dict[str, object]:
    """Sigma-clipped weighted least-squares fit of a constant (``degree=0``) or a plane.

    The plane is ``level + slope_x (x - x_ref) + slope_y (y - y_ref)`` with
    ``(x_ref, y_ref)`` the image centre (pixel-centre coordinates). Pixels are weighted
    by ``1/noise**2`` when a noise map is given. After each fit, pixels whose normalised
    residual lies more than ``clip_sigma`` robust sigmas (1.4826 MAD) from its median
    are rejected and the fit repeated, until the set no longer changes (at most
    ``maxiters`` fits).

    Returns
    -------
    dict
        ``image`` (the sky, finite everywhere), ``params`` (``level``, ``slope_x``,
        ``slope_y``, ``level_err``, ``x_ref``, ``y_ref``, ``n_pixels``, ``n_clipped``,
        ``iterations``); ``n_pixels``/``n_clipped`` count the pixels of the last fit.

    Raises
    ------
    ValueError
        ``degree`` is neither 0 nor 1.
    FitError
        Fewer than ``min_pixels`` usable pixels.
    """
    if degree not in (0, 1):
        raise ValueError(f"sky: degree must be 0 (constant) or 1 (plane), got {degree!r}")
    r = np.asarray(residual, dtype=float)
    if r.ndim != 2:
        raise InputError(f"sky: residual must be 2-D, got shape {r.shape}")
    valid = np.isfinite(r)
    if mask is not None:
        valid &= ~np.asarray(mask, dtype=bool)
    w = np.ones(r.shape)
    if noise is not None:
        nz = np.broadcast_to(np.asarray(noise, dtype=float), r.shape)
        valid &= np.isfinite(nz) & (nz > 0)
        w = np.where(valid, 1.0 / np.where(nz > 0, nz, 1.0), 0.0)
    n_valid = int(np.count_nonzero(valid))
    if n_valid < min_pixels:
        raise FitError(f"sky: only {n_valid} usable pixels in the residual (at least {min_pixels} needed)")
    ny, nx = r.shape
    x_ref, y_ref = 0.5 * (nx - 1), 0.5 * (ny - 1)
    yy, xx = np.indices(r.shape)
    cols = [np.ones(r.shape)]
    if degree >= 1:
        cols += [xx - x_ref, yy - y_ref]
    basis = np.stack([c[valid] for c in cols], axis=1)
    data = r[valid]
    weight = w[valid]
    keep = np.ones(data.size, dtype=bool)
    coef = np.zeros(len(cols))
    cov = np.full((len(cols), len(cols)), np.nan)
    it = 0
    for it in range(1, maxiters + 1):
        a = basis[keep] * weight[keep, None]
        coef, *_ = np.linalg.lstsq(a, data[keep] * weight[keep], rcond=None)
        z = (data - basis @ coef) * weight
        med = np.median(z[keep])
        s = MAD_TO_SIGMA * np.median(np.abs(z[keep] - med))
        new = np.abs(z - med) <= clip_sigma * s if s > 0 else keep
        # coef, n_clipped and cov must all belong to the pixel set of the last fit
        if it == maxiters or np.array_equal(new, keep) or np.count_nonzero(new) < len(cols) + 1:
            break
        keep = new
    a = basis[keep] * weight[keep, None]
    try:
        resid_var = np.var((data[keep] - basis[keep] @ coef) * weight[keep]) if noise is None else 1.0
        cov = np.linalg.inv(a.T @ a) * resid_var
    except np.linalg.LinAlgError:
        pass
    sky = np.full(r.shape, coef[0])
    if degree >= 1:
        sky = sky + coef[1] * (xx - x_ref) + coef[2] * (yy - y_ref)
    params = {
        "level": float(coef[0]),
        "slope_x": float(coef[1]) if degree >= 1 else 0.0,
        "slope_y": float(coef[2]) if degree >= 1 else 0.0,
        "level_err": float(np.sqrt(cov[0, 0])) if np.isfinite(cov[0, 0]) else float("nan"),
        "x_ref": float(x_ref),
        "y_ref": float(y_ref),
        "n_pixels": float(np.count_nonzero(keep)),
        "n_clipped": float(np.count_nonzero(~keep)),
        "iterations": float(it),
    }
    return {"image": sky, "params": params}


class _PolynomialSky(SkyEstimator):
    Options = SkyOptions
    degree = 1

    def fit(self, residual, noise=None, mask=None) -> SkyResult:
        o = self.options
        out = robust_polynomial_sky(
            residual, noise, mask,
            degree=self.degree, clip_sigma=o.clip_sigma, maxiters=o.maxiters, min_pixels=o.min_pixels,
        )
        p = out["params"]
        log.debug(
            "sky %s: level %.4g +- %.2g, slopes (%.3g, %.3g) per px, %d pixels (%d clipped)",
            self.name, p["level"], p["level_err"], p["slope_x"], p["slope_y"], p["n_pixels"], p["n_clipped"],
        )
        return SkyResult(image=out["image"], params=p, method=self.name)


class PlaneSky(_PolynomialSky):
    """Tilted plane fitted robustly (sigma-clipped, noise-weighted) to the residual."""

    name = "plane"


class ConstantSky(_PolynomialSky):
    """Constant level fitted robustly (sigma-clipped, noise-weighted mean) to the residual."""

    name = "constant"
    degree = 0


class NoSky(SkyEstimator):
    """No sky: a zero image."""

    name = "none"

    def fit(self, residual, noise=None, mask=None) -> SkyResult:
        r = np.asarray(residual)
        if r.ndim != 2:
            raise InputError(f"sky: residual must be 2-D, got shape {r.shape}")
        return SkyResult(image=np.zeros(r.shape), params={"level": 0.0}, method=self.name)


SPECS = [
    StrategySpec(
        name="plane", factory=PlaneSky, options=SkyOptions, description="robust tilted plane (sigma-clipped least squares)"
    ),
    StrategySpec(
        name="constant", factory=ConstantSky, options=SkyOptions, description="robust constant (sigma-clipped mean)"
    ),
    StrategySpec(name="none", factory=NoSky, options=None, description="no sky (zero image)"),
]
