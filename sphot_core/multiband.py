"""Wavelength-dependent galaxy shape across bands (``[core] wavelength_shape``).

A scale fit pins every band to the base band's shape, so a galaxy whose profile
changes with wavelength (a red bulge in a blue disk) gets biased colours: the
linear brightness of a fixed shape is dominated by the central pixels. Freeing
``n`` and ``r_eff`` in every band separately (``scale_free``) follows the gradient
but lets faint bands wander. Here, as in the MegaMorph extension of GALFIT
(Haeussler et al. 2013, MNRAS 430, 330), ``n`` and ``ln r_eff`` are low-order
polynomials of ``x = ln(lambda / lambda_base)``, fitted to all bands at once:

    n(x)       = c_n[0] + c_n[1] x + ...
    ln r_eff(x) = c_r[0] + c_r[1] x + ...

The objective is the sum of every band's loss (chi-square or robust, as configured)
on its data minus its fitted stars and sky, with each band's brightness solved
linearly and its centre, ellipticity and position angle kept from its scale fit. The
high-S/N bands set the trend; a faint band follows it instead of fitting its own
noise. Stars and sky are not refitted afterwards.

Wavelengths are pivot wavelengths in microns from :data:`PIVOT_MICRON` (HST ACS,
WFC3 and JWST NIRCam, NIRISS and MIRI broad and medium bands), or from the
``[wavelengths]`` config table, which wins.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Dict, Mapping, Optional

import numpy as np

from .errors import ConfigError
from .problem import make_scale_problem

__all__ = ["PIVOT_MICRON", "wavelength_of", "fit_wavelength_shape"]

log = logging.getLogger(__name__)

#: Pivot wavelengths (micron) of common HST and JWST imaging filters. Where ACS/WFC and
#: WFC3/UVIS share a name (F555W 0.536 / 0.531) the ACS value is used; the difference
#: is below 1 % in ln(lambda).
PIVOT_MICRON: Dict[str, float] = {
    # HST ACS/WFC and WFC3/UVIS
    "F225W": 0.237, "F275W": 0.271, "F336W": 0.336, "F390W": 0.392, "F435W": 0.433,
    "F438W": 0.433, "F475W": 0.475, "F555W": 0.536, "F606W": 0.592, "F625W": 0.631,
    "F775W": 0.769, "F814W": 0.805, "F850LP": 0.903,
    # HST WFC3/IR
    "F098M": 0.986, "F105W": 1.055, "F110W": 1.153, "F125W": 1.249, "F140W": 1.392,
    "F160W": 1.537,
    # JWST NIRCam and NIRISS (wide and medium)
    "F070W": 0.704, "F090W": 0.901, "F115W": 1.154, "F140M": 1.404, "F150W": 1.501,
    "F162M": 1.626, "F182M": 1.845, "F200W": 1.990, "F210M": 2.093, "F250M": 2.503,
    "F277W": 2.786, "F300M": 2.990, "F335M": 3.365, "F356W": 3.563, "F360M": 3.621,
    "F410M": 4.092, "F430M": 4.280, "F444W": 4.421, "F460M": 4.624, "F480M": 4.834,
    # JWST MIRI
    "F560W": 5.635, "F770W": 7.639, "F1000W": 9.953, "F1130W": 11.309, "F1280W": 12.810,
    "F1500W": 15.064, "F1800W": 17.984, "F2100W": 20.795, "F2550W": 25.365,
}  # fmt: skip


def wavelength_of(filter_name: str, table: Optional[Mapping[str, float]] = None) -> float:
    """Pivot wavelength of ``filter_name`` in microns (``table`` first, then
    :data:`PIVOT_MICRON`); a :class:`ConfigError` naming the filter if unknown."""
    for source in (table or {}, PIVOT_MICRON):
        for key in (filter_name, filter_name.upper()):
            if key in source:
                value = float(source[key])
                if not (math.isfinite(value) and value > 0):
                    raise ConfigError(f"[wavelengths] {filter_name}: must be a positive number of microns, got {value!r}")
                return value
    raise ConfigError(
        f"[core] wavelength_shape needs the wavelength of filter {filter_name}: "
        f"add it as [wavelengths] {filter_name} = <pivot wavelength in micron>"
    )


def _poly(coef, x: float) -> float:
    return float(sum(c * x**k for k, c in enumerate(coef)))


def fit_wavelength_shape(galaxy, config) -> Optional[Dict[str, Any]]:
    """Fit ``n`` and ``ln r_eff`` as polynomials of ln(wavelength) to every finished band
    of ``galaxy`` and replace each band's Sersic result and galaxy model by the fit's.

    Returns the fitted law (recorded by the engine in ``galaxy.meta``), or ``None``
    when there is nothing to do (fewer than two finished bands, or a model without a
    single ``n`` and ``r_eff``). The base band's free-fit parameters must be in
    ``galaxy.meta["base_params"]`` (else the base band's current ones are used); they
    are the starting point.
    """
    from scipy.optimize import least_squares

    core = config.core
    bands = [b for b in galaxy.bands.values() if b.status == "done" and b.sersic is not None]
    if len(bands) < 2:
        return None
    model = bands[0].sersic.model
    if model not in ("sersic", "sersic+point"):
        log.info("wavelength_shape: model %s has no single n and r_eff; skipped", model)
        return None
    t0 = time.perf_counter()
    table = getattr(config, "wavelengths", {}) or {}
    base = galaxy.base_filter
    lam0 = wavelength_of(base, table)
    xs = {b.filter: math.log(wavelength_of(b.filter, table) / lam0) for b in bands}
    distinct = len({round(x, 3) for x in xs.values()})
    deg_n = min(core.wavelength_degree_n, distinct - 1)
    deg_r = min(core.wavelength_degree_r_eff, distinct - 1)
    f = config.fitter
    problems = {}
    for b in bands:
        params = dict(b.sersic.params)
        problems[b.filter] = make_scale_problem(
            b.residual(galaxy=False),
            b.noise,
            b.psf,
            params,
            mask=b.mask,
            shift_max=0.0,
            free=("n", "r_eff"),
            model=model,
            loss=f.loss,
            robust_kappa=f.robust_kappa,
            solve_sky=f.solve_sky,
        )
    start = dict(galaxy.meta.get("base_params") or galaxy.bands[base].sersic.params)
    c0 = np.zeros(deg_n + 1 + deg_r + 1)
    c0[0] = float(start["n"])
    c0[deg_n + 1] = math.log(float(start["r_eff"]))

    def shape(c, flt):
        return {"n": _poly(c[: deg_n + 1], xs[flt]), "r_eff": math.exp(_poly(c[deg_n + 1 :], xs[flt]))}

    def residuals(c):
        return np.concatenate([p.residuals(p.encode(shape(c, flt))) for flt, p in problems.items()])

    loss_start = float(np.sum(residuals(c0) ** 2))
    # n in units of 1, ln r_eff in units of 0.1; tolerances tight: the step is cheap
    # (about 2 s on g095 and g260)
    scale = np.r_[np.ones(deg_n + 1), 0.1 * np.ones(deg_r + 1)]
    sol = least_squares(
        residuals, c0, method="trf", x_scale=scale, diff_step=1e-4, max_nfev=60, ftol=1e-10, xtol=1e-10, gtol=1e-10
    )
    coef = sol.x
    for b in bands:
        p = problems[b.filter]
        res = p.finalize(p.encode(shape(coef, b.filter)), success=bool(sol.success), message="", nfev=int(sol.nfev), optimizer="wavelength")
        # the band's factor for correlated residuals (its scale fit measured it)
        factor = next((h.get("error_factor", 1.0) for h in b.history if h.get("stage") == "total"), 1.0)
        b.sersic = res = res.with_error_factor(float(factor))
        b.galaxy_model = p.renderer.render(res.params, model)
        b.history.append(
            {
                "stage": "wavelength",
                "iteration": None,
                "params": dict(res.params),
                "chi2_dof": b.reduced_chi2(),
                "optimizer": "wavelength",
                "nfev": int(sol.nfev),
            }
        )
    law = {
        "x": f"ln(lambda / lambda_{base})",
        "lambda_base_micron": lam0,
        "wavelengths_micron": {flt: lam0 * math.exp(x) for flt, x in xs.items()},
        "n": [float(v) for v in coef[: deg_n + 1]],
        "ln_r_eff": [float(v) for v in coef[deg_n + 1 :]],
        "loss_start": loss_start,
        "loss": float(2.0 * sol.cost),
        "nfev": int(sol.nfev),
        "seconds": time.perf_counter() - t0,
    }
    log.info(
        "wavelength shape: n = %s, ln r_eff = %s in x = ln(lambda/%.3g um); loss %.6g -> %.6g (%d evaluations, %.1f s)",
        ", ".join(f"{v:.3f}" for v in law["n"]),
        ", ".join(f"{v:.3f}" for v in law["ln_r_eff"]),
        lam0,
        loss_start,
        law["loss"],
        law["nfev"],
        law["seconds"],
    )
    return law
