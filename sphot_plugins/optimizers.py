"""Sersic optimizers: each a few lines around a minimiser of a :class:`SersicProblem`.

The problem (:mod:`sphot_core.problem`) renders the model, solves the amplitudes
linearly, maps bounded parameters to unbounded engine variables and builds the result
(covariance, flux, flags) in :meth:`~sphot_core.problem.SersicProblem.finalize`. An
optimizer only moves the engine vector:

* ``levmar`` (alias ``least_squares``): scipy ``least_squares`` on the residual vector
  (trust region; Jacobian by forward differences with the rendering plan frozen).
  The default: converges in a few tens of evaluations.
* ``iterative_NM`` (alias ``nelder_mead``): restarted Nelder-Mead on the loss, as the
  original tool did.
* ``dual_annealing``: scipy's global dual annealing inside the engine box, with
  L-BFGS-B local searches using the problem's gradient.
* ``lbfgsb`` (alias ``lbfgsb_polish``): L-BFGS-B polish of a previous solution.

Every optimizer returns ``problem.finalize(...)``. A problem without free parameters
(a scale fit with the centre pinned) never reaches an optimizer: the engine finalizes
it directly.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import attrs
import numpy as np
from attrs import validators as v
from scipy import optimize

from sphot_core.hookspecs import StrategySpec
from sphot_core.stages import SersicFitter, SersicResult

__all__ = ["LevMar", "IterativeNelderMead", "DualAnnealing", "LBFGSB", "SPECS"]

log = logging.getLogger(__name__)

_positive = v.gt(0)
#: numerical failures an optimizer may raise on a pathological problem
_FAILURES = (ValueError, ArithmeticError, np.linalg.LinAlgError)


def _failed(problem: Any, q, name: str, exc: Exception) -> SersicResult:
    log.warning("%s failed: %s: %s", name, type(exc).__name__, exc)
    message = f"{name} failed: {type(exc).__name__}: {exc}"
    return problem.finalize(q, success=False, message=message, optimizer=name)


# ----------------------------------------------------------------------------- levmar


@attrs.frozen
class LevMarOptions:
    """Options of ``[fitter.levmar]``.

    Attributes
    ----------
    method : str
        ``least_squares`` method: ``"trf"``, ``"lm"`` (MINPACK) or ``"dogbox"``.
    max_nfev : int
        Largest number of residual evaluations (Jacobian evaluations not counted).
    ftol, xtol, gtol : float
        Relative tolerances on the loss, the step and the gradient.
    jacobian : str
        ``"frozen"`` (forward differences with the rendering plan frozen; smooth),
        ``"2-point"`` or ``"3-point"`` (scipy's differences of the full evaluation).
    x_scale : str
        ``"engine"``: unit scale of every engine variable (robust: the bounded
        transforms already make them O(1)); ``"jac"``: scipy's scaling by the
        Jacobian column norms, which can leap into saturated bounds.
    """

    method: str = attrs.field(default="trf", validator=v.in_(("trf", "lm", "dogbox")))
    max_nfev: int = attrs.field(default=200, validator=_positive)
    ftol: float = attrs.field(default=1e-8, validator=_positive)
    xtol: float = attrs.field(default=1e-8, validator=_positive)
    gtol: float = attrs.field(default=1e-8, validator=_positive)
    jacobian: str = attrs.field(default="frozen", validator=v.in_(("frozen", "2-point", "3-point")))
    x_scale: str = attrs.field(default="engine", validator=v.in_(("engine", "jac")))


class LevMar(SersicFitter):
    """Trust-region least squares on the residual vector (scipy ``least_squares``)."""

    name = "levmar"
    Options = LevMarOptions

    def fit(self, problem, start: Optional[Mapping[str, float]] = None) -> SersicResult:
        o = self.options
        q0 = problem.start_engine(start)
        jac = problem.jacobian if o.jacobian == "frozen" else o.jacobian
        try:
            res = optimize.least_squares(
                problem.residuals,
                q0,
                jac=jac,
                method=o.method,
                x_scale=1.0 if o.x_scale == "engine" else "jac",
                ftol=o.ftol,
                xtol=o.xtol,
                gtol=o.gtol,
                max_nfev=o.max_nfev,
            )
        except _FAILURES as exc:
            return _failed(problem, q0, self.name, exc)
        success = res.status > 0
        return problem.finalize(res.x, success=success, message=str(res.message), optimizer=self.name)


# ------------------------------------------------------------------------ iterative NM


@attrs.frozen
class IterativeNMOptions:
    """Options of ``[fitter.iterative_NM]`` (the original tool's restarted Nelder-Mead).

    Attributes
    ----------
    max_iter : int
        Restarts after the first run.
    maxfev : int
        Evaluations per run.
    rtol_init, rtol_iter : float
        ``fatol`` of the first and later runs, relative to the loss at their start.
    rtol_convergence : float
        Stop when two consecutive runs end within this relative loss difference.
    xatol : float
        Absolute simplex size tolerance in engine units.
    simplex_step : float
        Initial simplex edge in engine units.
    """

    max_iter: int = attrs.field(default=10, validator=v.ge(0))
    maxfev: int = attrs.field(default=100, validator=_positive)
    rtol_init: float = attrs.field(default=1e-3, validator=_positive)
    rtol_iter: float = attrs.field(default=1e-3, validator=_positive)
    rtol_convergence: float = attrs.field(default=1e-6, validator=_positive)
    xatol: float = attrs.field(default=1e-4, validator=_positive)
    simplex_step: float = attrs.field(default=0.2, validator=_positive)


class IterativeNelderMead(SersicFitter):
    """Nelder-Mead on the loss, restarted from its last point with a fresh simplex."""

    name = "iterative_NM"
    Options = IterativeNMOptions

    def _run(self, problem, q, fatol: float):
        o = self.options
        simplex = np.vstack([q, q + o.simplex_step * np.eye(q.size)])
        return optimize.minimize(
            problem.loss,
            q,
            method="Nelder-Mead",
            options={"maxfev": o.maxfev, "fatol": fatol, "xatol": o.xatol, "initial_simplex": simplex},
        )

    def fit(self, problem, start: Optional[Mapping[str, float]] = None) -> SersicResult:
        o = self.options
        q = problem.start_engine(start)
        try:
            previous = problem.loss(q)
            res = self._run(problem, q, o.rtol_init * previous)
            converged, runs = False, 1
            for _ in range(o.max_iter):
                if abs(previous - res.fun) <= o.rtol_convergence * max(abs(res.fun), 1e-300):
                    converged = True
                    break
                previous = res.fun
                res = self._run(problem, res.x, o.rtol_iter * res.fun)
                runs += 1
            else:
                converged = abs(previous - res.fun) <= o.rtol_convergence * max(abs(res.fun), 1e-300)
        except _FAILURES as exc:
            return _failed(problem, q, self.name, exc)
        message = f"{runs} Nelder-Mead run(s); " + ("loss converged" if converged else "restart limit reached")
        return problem.finalize(res.x, success=converged, message=message, optimizer=self.name)


# ------------------------------------------------------------------------ annealing


@attrs.frozen
class DualAnnealingOptions:
    """Options of ``[fitter.dual_annealing]``.

    Attributes
    ----------
    maxiter : int
        Global iterations.
    initial_temp : float
        Initial temperature (the original tool used 10).
    seed : int
        Random seed (results are reproducible).
    local_maxfun : int
        Evaluation budget of each L-BFGS-B local search.
    """

    maxiter: int = attrs.field(default=10, validator=_positive)
    initial_temp: float = attrs.field(default=10.0, validator=v.gt(0.01))
    seed: int = 0
    local_maxfun: int = attrs.field(default=200, validator=_positive)


class DualAnnealing(SersicFitter):
    """Global search: scipy ``dual_annealing`` inside ``problem.engine_box``."""

    name = "dual_annealing"
    Options = DualAnnealingOptions

    def fit(self, problem, start: Optional[Mapping[str, float]] = None) -> SersicResult:
        o = self.options
        lo, hi = problem.engine_box
        q0 = np.clip(problem.start_engine(start), lo, hi)
        local = {"method": "L-BFGS-B", "jac": problem.gradient, "options": {"maxfun": o.local_maxfun}}
        try:
            res = optimize.dual_annealing(
                problem.loss,
                list(zip(lo, hi)),
                x0=q0,
                maxiter=o.maxiter,
                initial_temp=o.initial_temp,
                seed=o.seed,
                minimizer_kwargs=local,
            )
        except _FAILURES as exc:
            return _failed(problem, q0, self.name, exc)
        message = "; ".join(str(m) for m in np.atleast_1d(res.message))
        return problem.finalize(res.x, success=bool(res.success), message=message, optimizer=self.name)


# --------------------------------------------------------------------------- lbfgsb


@attrs.frozen
class LBFGSBOptions:
    """Options of ``[fitter.lbfgsb]``.

    Attributes
    ----------
    maxfun, maxiter : int
        Evaluation and iteration limits.
    ftol, gtol : float
        scipy L-BFGS-B tolerances.
    gradient : str
        ``"jacobian"`` (``2 J^T r`` from the problem's frozen-plan Jacobian) or
        ``"finite_difference"`` (scipy's differences of the loss with step ``eps``).
    eps : float
        Finite-difference step in engine units.
    """

    maxfun: int = attrs.field(default=2000, validator=_positive)
    maxiter: int = attrs.field(default=500, validator=_positive)
    ftol: float = attrs.field(default=1e-12, validator=_positive)
    gtol: float = attrs.field(default=1e-8, validator=_positive)
    gradient: str = attrs.field(default="jacobian", validator=v.in_(("jacobian", "finite_difference")))
    eps: float = attrs.field(default=1e-5, validator=_positive)


class LBFGSB(SersicFitter):
    """L-BFGS-B on the loss: a polish of a solution found by another optimizer."""

    name = "lbfgsb"
    Options = LBFGSBOptions

    def fit(self, problem, start: Optional[Mapping[str, float]] = None) -> SersicResult:
        o = self.options
        q0 = problem.start_engine(start)
        jac = problem.gradient if o.gradient == "jacobian" else None
        options = {"maxfun": o.maxfun, "maxiter": o.maxiter, "ftol": o.ftol, "gtol": o.gtol}
        if jac is None:
            options["eps"] = o.eps
        try:
            res = optimize.minimize(problem.loss, q0, method="L-BFGS-B", jac=jac, options=options)
        except _FAILURES as exc:
            return _failed(problem, q0, self.name, exc)
        success = bool(res.success)
        return problem.finalize(res.x, success=success, message=str(res.message), optimizer=self.name)


SPECS = [
    StrategySpec(
        name="levmar",
        factory=LevMar,
        options=LevMarOptions,
        aliases=("least_squares",),
        description="trust-region least squares (scipy least_squares) on the residuals; fast default",
    ),
    StrategySpec(
        name="iterative_NM",
        factory=IterativeNelderMead,
        options=IterativeNMOptions,
        aliases=("nelder_mead",),
        description="restarted Nelder-Mead on the loss (the original tool's optimizer)",
    ),
    StrategySpec(
        name="dual_annealing",
        factory=DualAnnealing,
        options=DualAnnealingOptions,
        description="global dual annealing in the engine box with L-BFGS-B local searches",
    ),
    StrategySpec(
        name="lbfgsb",
        factory=LBFGSB,
        options=LBFGSBOptions,
        aliases=("lbfgsb_polish",),
        description="L-BFGS-B polish of a previous solution",
    ),
]
