"""Conformance checks for plugin authors (in the spirit of scikit-learn's
``parametrize_with_checks``).

One line in a plugin's own test suite runs every check of its stage kind::

    from sphot_core.testing import plugin_checks

    @plugin_checks(LorentzianKernel())
    def test_sphot_contract(plugin, check):
        check(plugin)

or, without pytest parametrisation, ``check_plugin(LorentzianKernel())`` runs them
all and raises :class:`AssertionError` naming the check that failed. The checks use
small synthetic images only (no data files) and take a second or two.
"""

from __future__ import annotations

import pickle
from typing import Callable, Iterator, List, Tuple

import attrs
import numpy as np

from .data import SourceTable
from .psf import PSFModel
from .stages import (
    Executor,
    JobOutcome,
    KernelCalibrator,
    KernelFamily,
    KernelFit,
    PointSourceFitter,
    PointSourceResult,
    RefitStrategy,
    SersicFitter,
    SersicResult,
    SkyEstimator,
    SkyResult,
)

__all__ = ["checks_for", "check_plugin", "plugin_checks", "pixel_averaged_sersic", "sersic_petrosian_radius", "random_star_field"]


# ------------------------------------------------------------- known truth


def pixel_averaged_sersic(shape, x0, y0, r_eff, n, ellip=0.0, theta=0.0, amplitude=1.0, sub=5) -> np.ndarray:
    """astropy ``Sersic2D`` averaged over ``sub x sub`` points per pixel.

    A brute-force, fitter-independent image of a Sersic profile (pixel (0, 0) centred
    at 0.0), for checks against known truth.
    """
    from astropy.modeling.models import Sersic2D

    model = Sersic2D(amplitude=amplitude, r_eff=r_eff, n=n, x_0=x0, y_0=y0, ellip=ellip, theta=theta)
    yy, xx = np.indices(shape, dtype=float)
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    return sum(model(xx + dx, yy + dy) for dy in offsets for dx in offsets) / sub**2


def sersic_petrosian_radius(r_eff: float, n: float, petro: float = 0.5) -> float:
    """Radius where I(r) / <I>(<r) = ``petro`` for a circular Sersic profile (analytic)."""
    from scipy import special
    from scipy.optimize import brentq

    b = special.gammaincinv(2 * n, 0.5)

    def eta(r):
        x = b * (r / r_eff) ** (1 / n)
        mean_inside = 2 * n * np.exp(b) * b ** (-2 * n) * special.gamma(2 * n) * special.gammainc(2 * n, x)
        return np.exp(-b * ((r / r_eff) ** (1 / n) - 1)) / (mean_inside * (r_eff / r) ** 2) - petro

    return brentq(eta, 1e-3 * r_eff, 50 * r_eff)


def random_star_field(psf, seed: int, *, n: int, shape, noise: float = 1.0, min_sep: float = 6.0,
                      log_flux=(2.7, 4.0), half: int = 20):
    """``n`` stars at least ``min_sep`` px apart, fluxes log-uniform in ``10**log_flux``,
    rendered with ``psf`` (stamps of half-size ``half``) plus Gaussian noise.

    Returns ``(image, x, y, flux)``.
    """
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    while len(xs) < n:
        x, y = rng.uniform(10, shape[1] - 11), rng.uniform(10, shape[0] - 11)
        if all((x - a) ** 2 + (y - b) ** 2 > min_sep**2 for a, b in zip(xs, ys)):
            xs.append(x)
            ys.append(y)
    x, y = np.array(xs), np.array(ys)
    flux = 10 ** rng.uniform(log_flux[0], log_flux[1], n)
    image = psf.render(shape, x, y, flux, half=half) + rng.normal(0.0, noise, shape)
    return image, x, y, flux


# ------------------------------------------------------------------ fixtures


def _gaussian_psf(fwhm: float = 2.2, oversample: int = 4) -> PSFModel:
    sigma = fwhm / 2.3548 * oversample
    half = int(6 * sigma) + oversample
    r = np.arange(-half, half + 1)
    g = np.exp(-0.5 * (r / sigma) ** 2)
    return PSFModel.from_array(np.outer(g, g), oversample, source="testing: Gaussian")


def _star_field(seed: int = 0, shape=(48, 48), n: int = 6, sigma: float = 1.0):
    rng = np.random.default_rng(seed)
    psf = _gaussian_psf()
    x = rng.uniform(6, shape[1] - 7, n)
    y = rng.uniform(6, shape[0] - 7, n)
    # keep the stars apart so every implementation can separate them
    for i in range(1, n):
        for _ in range(100):
            if np.min(np.hypot(x[:i] - x[i], y[:i] - y[i])) > 6:
                break
            x[i], y[i] = rng.uniform(6, shape[1] - 7), rng.uniform(6, shape[0] - 7)
    flux = rng.uniform(300, 2000, n) * sigma
    image = psf.render(shape, x, y, flux, half=psf.half_extent) + rng.normal(0, sigma, shape)
    return image, np.full(shape, sigma), psf, x, y, flux


def _roundtrip(obj) -> None:
    try:
        pickle.loads(pickle.dumps(obj))
    except Exception as exc:
        raise AssertionError(f"the stage object does not pickle (it must, to run in worker processes): {exc}") from None


# ------------------------------------------------------------------ generic


def check_options(obj) -> None:
    """``Options`` is an attrs class with defaults; the stage pickles (worker processes)."""
    cls = getattr(type(obj), "Options", None)
    assert cls is not None, f"{type(obj).__name__} has no Options class"
    assert attrs.has(cls), f"{type(obj).__name__}.Options must be an attrs class"
    cls()  # every option has a default
    fresh = type(obj)(None)
    assert attrs.has(type(fresh.options)), "__init__(None) must set default options"
    _roundtrip(obj)


# ------------------------------------------------------------- kernel family


def check_kernel_parameters(family: KernelFamily) -> None:
    params = family.parameters()
    assert len(params) > 0, "a kernel family needs at least one parameter"
    names = [p.name for p in params]
    assert len(set(names)) == len(names), f"duplicate parameter names {names}"
    for p in params:
        assert p.lower < p.upper, f"parameter {p.name}: empty range ({p.lower}, {p.upper})"
        assert p.lower <= p.start <= p.upper, f"parameter {p.name}: start {p.start} outside ({p.lower}, {p.upper})"
        assert p.scale in ("linear", "log"), f"parameter {p.name}: scale must be 'linear' or 'log'"


def check_kernel_render(family: KernelFamily) -> None:
    params = family.parameters()
    points = [family.start(), {p.name: p.lower for p in params}, {p.name: p.upper for p in params}]
    for values in points:
        for oversample in (1, 3, 4):
            k = np.asarray(family.render(values, oversample), dtype=float)
            assert k.ndim == 2 and k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1, f"kernel shape {k.shape} is not odd and square ({values})"
            assert np.all(np.isfinite(k)) and k.min() >= 0, f"kernel has negative or non-finite values ({values})"
            assert abs(k.sum() - 1.0) < 1e-9, f"kernel sums to {k.sum()}, not 1 ({values})"
            yy, xx = np.indices(k.shape)
            c = k.shape[0] // 2
            cy, cx = (yy * k).sum(), (xx * k).sum()
            assert abs(cx - c) < 0.5 and abs(cy - c) < 0.5, f"kernel centroid ({cx:.2f}, {cy:.2f}) is not at the middle element {c}"


def check_kernel_identity(family: KernelFamily) -> None:
    ident = family.identity()
    if ident is None:
        return
    k = np.asarray(family.render(ident, 4), dtype=float)
    c = k.shape[0] // 2
    core = k[max(0, c - 2) : c + 3, max(0, c - 2) : c + 3].sum()
    assert core > 0.95, f"identity() renders a kernel with only {core:.3f} of its weight within 2 elements of the centre"


def check_kernel_convolves(family: KernelFamily) -> None:
    psf = _gaussian_psf()
    blurred = psf.convolved(family.render(family.start(), psf.oversample))
    assert blurred.fwhm >= psf.fwhm - 1e-6, "a blur kernel must not sharpen the PSF"
    img = blurred.render((31, 31), [15.0], [15.0], [1.0], half=15)
    assert abs(img.sum() - 1.0) < 0.02


# ----------------------------------------------------------------- fitters


def check_sersic_fitter(fitter: SersicFitter) -> None:
    from .problem import SersicProblem, make_scale_problem

    psf = _gaussian_psf()
    truth = {"x_0": 20.3, "y_0": 19.6, "amplitude": 5.0, "r_eff": 5.0, "n": 1.5, "ellip": 0.3, "theta": 0.7}
    image = SersicProblem(np.zeros((41, 41)), 1.0, psf).render(truth)
    problem = SersicProblem(image, 0.01, psf)
    start = {k: v * (1.1 if k not in ("x_0", "y_0", "theta") else 1.0) for k, v in truth.items()}
    result = fitter.fit(problem, start)
    assert isinstance(result, SersicResult), f"fit() returned {type(result).__name__}, not a SersicResult"
    assert result.nfev > 0 and isinstance(result.success, bool)
    for k in ("r_eff", "n", "ellip"):
        assert abs(result.params[k] / truth[k] - 1) < 0.05, f"{k}: fitted {result.params[k]:.4g}, true {truth[k]}"
    assert abs(result.params["x_0"] - truth["x_0"]) < 0.05
    if result.covariance is not None:
        assert result.covariance.shape == (len(result.names),) * 2
    scale = make_scale_problem(image, 0.01, psf, truth, shift_max=0.5)
    result = fitter.fit(scale, truth)
    assert abs(result.params["amplitude"] / truth["amplitude"] - 1) < 1e-3, "scale problems (shape pinned, centre free) must fit"


def check_sky_estimator(sky: SkyEstimator) -> None:
    rng = np.random.default_rng(1)
    img = 3.0 + rng.normal(0, 0.1, (40, 50))
    img[5, 5] = np.nan
    mask = np.zeros(img.shape, bool)
    mask[20:25, 20:25] = True
    img[mask] = 1e6
    res = sky.fit(img, np.full(img.shape, 0.1), mask)
    assert isinstance(res, SkyResult), f"fit() returned {type(res).__name__}, not a SkyResult"
    assert res.image.shape == img.shape and np.all(np.isfinite(res.image)), "the sky image must be finite and of the input shape"
    if np.ptp(res.image) > 0 or res.level != 0:  # "none" is allowed to return zeros
        assert abs(res.level - 3.0) < 0.05, f"sky level {res.level:.3f} for a flat 3.0 (masked pixels must be ignored)"


def _check_ps_result(res, image_shape) -> SourceTable:
    assert isinstance(res, PointSourceResult), f"returned {type(res).__name__}, not a PointSourceResult"
    assert res.model.shape == image_shape and np.all(np.isfinite(res.model))
    src = res.sources
    assert isinstance(src, SourceTable)
    assert np.all(np.isfinite(src.flux)) and np.all(np.isfinite(src.x)) and np.all(np.isfinite(src.y))
    if len(src):
        assert res.model.sum() > 0.5 * src.flux.sum(), "the model image must hold the sources of the table"
    return src


def _recovered(src: SourceTable, x, y) -> float:
    if len(src) == 0:
        return 0.0
    d = np.min(np.hypot(src.x[:, None] - x[None, :], src.y[:, None] - y[None, :]), axis=0)
    return float(np.mean(d < 1.0))


def check_point_source_fitter(fitter: PointSourceFitter) -> None:
    image, noise, psf, x, y, flux = _star_field()
    positions = (x, y)
    res = fitter.fit(image, noise, psf, positions=positions)
    src = _check_ps_result(res, image.shape)
    assert _recovered(src, x, y) >= 0.8, "fewer than 80 % of six bright isolated stars were found"
    nan = image.copy()
    nan[:, :10] = np.nan
    src = _check_ps_result(fitter.fit(nan, noise, psf, positions=positions), image.shape)
    assert np.all(src.x > 9.5 - 1.0), "sources were placed on NaN pixels"


def check_refit(refit: RefitStrategy) -> None:
    image, noise, psf, x, y, flux = _star_field(seed=2)
    start = SourceTable.from_columns(x + 0.2, y - 0.2, flux * 0.8)
    res = refit.refit(image, noise, psf, start)
    src = _check_ps_result(res, image.shape)
    assert _recovered(src, x, y) >= 0.8


def check_calibrator(calibrator: KernelCalibrator) -> None:
    from sphot_plugins.kernels import GaussianKernel

    family = GaussianKernel()
    library = _gaussian_psf(fwhm=2.0)
    truth = {"sigma": 0.8}
    true_psf = library.convolved(family.render(truth, library.oversample))
    rng = np.random.default_rng(3)
    shape = (90, 90)
    xs, ys = np.meshgrid(np.arange(12, 80, 16.0), np.arange(12, 80, 16.0))
    xs, ys = xs.ravel() + rng.uniform(-0.5, 0.5, xs.size), ys.ravel() + rng.uniform(-0.5, 0.5, ys.size)
    image = true_psf.render(shape, xs, ys, np.full(xs.size, 3000.0), half=true_psf.half_extent) + rng.normal(0, 1.0, shape)
    fit = calibrator.calibrate(image, np.ones(shape), library, family)
    assert isinstance(fit, KernelFit), f"calibrate() returned {type(fit).__name__}, not a KernelFit"
    assert fit.success, f"calibration failed on an easy field: {fit.message}"
    assert isinstance(fit.psf, PSFModel)
    assert abs(fit.params["sigma"] / truth["sigma"] - 1) < 0.1, f"sigma {fit.params['sigma']:.3f} for a true {truth['sigma']}"


def _double(x):
    return 2 * x


def check_executor(executor: Executor) -> None:
    with executor:
        outcomes: List[JobOutcome] = list(executor.run(_double, [1, 2, 3]))
    assert sorted(o.job for o in outcomes) == [1, 2, 3], "every job must yield exactly one outcome"
    assert all(o.ok and o.result == 2 * o.job for o in outcomes)


# ------------------------------------------------------------------ registry

_CHECKS: List[Tuple[type, Tuple[Callable, ...]]] = [
    (KernelFamily, (check_options, check_kernel_parameters, check_kernel_render, check_kernel_identity, check_kernel_convolves)),
    (SersicFitter, (check_options, check_sersic_fitter)),
    (SkyEstimator, (check_options, check_sky_estimator)),
    (PointSourceFitter, (check_options, check_point_source_fitter)),
    (RefitStrategy, (check_options, check_refit)),
    (KernelCalibrator, (check_options, check_calibrator)),
    (Executor, (check_options, check_executor)),
]


def checks_for(obj) -> Tuple[Callable, ...]:
    """The checks that apply to a stage object (by the abstract stage it implements)."""
    for base, checks in _CHECKS:
        if isinstance(obj, base):
            return checks
    raise TypeError(f"{type(obj).__name__} implements none of the sphot stage contracts")


def check_plugin(obj) -> None:
    """Run every check for ``obj``; AssertionError names the failing check."""
    for check in checks_for(obj):
        try:
            check(obj)
        except AssertionError as exc:
            raise AssertionError(f"{type(obj).__name__}: {check.__name__}: {exc}") from None


def _pairs(objects) -> Iterator[Tuple[object, Callable]]:
    for obj in objects:
        for check in checks_for(obj):
            yield obj, check


def plugin_checks(*objects):
    """pytest decorator: parametrize a test over (plugin, check) for ``objects``."""
    import pytest

    pairs = list(_pairs(objects))
    ids = [f"{type(o).__name__}-{c.__name__}" for o, c in pairs]
    return pytest.mark.parametrize("plugin, check", pairs, ids=ids)
