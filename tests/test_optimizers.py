"""The optimizer plugins (sphot_plugins.optimizers) on Sersic problems."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize

from sphot_core.errors import ConfigError
from sphot_core.flags import GALAXY_FLAGS
from sphot_core.problem import SersicProblem, make_scale_problem
from sphot_core.psf import SersicRenderer
from sphot_core.registry import get_registry
from sphot_core.stages import SersicFitter
from sphot_plugins import optimizers as opt

SHAPE = (41, 41)
TRUTH = {"x_0": 20.3, "y_0": 19.6, "amplitude": 1.0, "r_eff": 4.0, "n": 2.5, "ellip": 0.3, "theta": 0.7}
FILTERS = ("F555W", "F814W", "F090W", "F150W", "F160W", "F277W")


def off_start(truth, factor=1.3):
    """A start 30 % off: shape parameters times 1.3, centre moved by 0.3 r_eff, theta + 0.3 rad."""
    out = {k: v * factor for k, v in truth.items()}
    out["x_0"] = truth["x_0"] + 0.3 * truth["r_eff"]
    out["y_0"] = truth["y_0"] - 0.3 * truth["r_eff"]
    out["theta"] = truth["theta"] + 0.3
    return out


@pytest.fixture(scope="module")
def setup(load_psf):
    psf = load_psf("F150W")
    renderer = SersicRenderer(SHAPE, psf)
    return psf, renderer, renderer.render(TRUTH)


@pytest.mark.parametrize(
    "name,cls",
    [
        ("levmar", opt.LevMar),
        ("least_squares", opt.LevMar),
        ("iterative_NM", opt.IterativeNelderMead),
        ("iterative-nm", opt.IterativeNelderMead),
        ("nelder_mead", opt.IterativeNelderMead),
        ("dual_annealing", opt.DualAnnealing),
        ("lbfgsb", opt.LBFGSB),
        ("lbfgsb_polish", opt.LBFGSB),
    ],
)
def test_registered_names_and_aliases(name, cls):
    fitter = get_registry().create("fitter", name)
    assert type(fitter) is cls and isinstance(fitter, SersicFitter)


def test_options_are_validated():
    fitter = get_registry().create("fitter", "levmar", {"max_nfev": 50, "method": "lm", "ftol": 1e-6})
    assert fitter.options.max_nfev == 50 and fitter.options.method == "lm"
    with pytest.raises(ConfigError, match="max_nfev"):
        get_registry().create("fitter", "levmar", {"max_nfv": 5})
    with pytest.raises(ConfigError):
        get_registry().create("fitter", "levmar", {"method": "newton"})
    with pytest.raises(ConfigError):
        get_registry().create("fitter", "iterative_NM", {"maxfev": "many"})
    assert get_registry().create("fitter", "dual_annealing", {"seed": 3}).options.seed == 3


@pytest.mark.parametrize(
    "name,options,rtol",
    [
        ("levmar", {}, 1e-4),
        ("levmar", {"method": "lm"}, 1e-4),
        ("levmar", {"jacobian": "2-point"}, 1e-3),
        ("lbfgsb", {}, 1e-3),
        ("iterative_NM", {"max_iter": 20, "maxfev": 200}, 2e-2),
        ("dual_annealing", {"maxiter": 3}, 1e-3),
    ],
)
def test_optimizers_recover_noiseless_truth(setup, name, options, rtol):
    psf, renderer, clean = setup
    prob = SersicProblem(clean, 1e-3 * clean.max(), psf, renderer=renderer)
    res = get_registry().create("fitter", name, options).fit(prob, off_start(TRUTH, 1.15))
    print(name, res.nfev, res.message, {k: round(v, 5) for k, v in res.params.items()})
    assert res.optimizer == get_registry().get("fitter", name).name
    assert 0 < res.nfev <= prob.nfev  # the covariance costs a few more evaluations
    for key, value in TRUTH.items():
        assert res.params[key] == pytest.approx(value, rel=rtol, abs=rtol * 10), key
    assert res.covariance is not None and np.all(np.isfinite(list(res.errors.values())))


def test_problem_without_free_parameters_needs_no_optimizer(setup):
    """A scale fit with everything pinned is finalized directly (as the engine does)."""
    psf, renderer, clean = setup
    prob = make_scale_problem(0.7 * clean, 0.01, psf, TRUTH, shift_max=0.0, renderer=renderer)
    assert prob.n_free == 0
    res = prob.finalize(np.zeros(0), success=True)
    assert res.success and res.nfev <= 2
    assert res.params["amplitude"] == pytest.approx(0.7, rel=1e-6)
    assert res.params["r_eff"] == TRUTH["r_eff"] and res.params["n"] == TRUTH["n"]


@pytest.mark.parametrize("name", ["levmar", "iterative_NM", "dual_annealing", "lbfgsb"])
def test_failing_model_gives_flagged_result(setup, name, monkeypatch):
    psf, renderer, clean = setup
    prob = SersicProblem(clean, 0.01, psf, renderer=SersicRenderer(SHAPE, psf))
    monkeypatch.setattr(prob.renderer, "component_images", lambda *a, **k: ([np.full(SHAPE, np.inf)], [None]))
    res = get_registry().create("fitter", name, {"maxiter": 1} if name == "dual_annealing" else {}).fit(prob)
    assert res.flags & GALAXY_FLAGS.NONFINITE and not res.success


@pytest.mark.parametrize("filter_name", FILTERS)
def test_noiseless_recovery_with_every_real_psf(load_psf, filter_name):
    """All parameters back to 1e-3 relative, the centre to 0.005 px, from a start 30 % off."""
    psf = load_psf(filter_name)
    truth = {"x_0": 30.4, "y_0": 29.7, "amplitude": 1.0, "r_eff": 6.0, "n": 3.0, "ellip": 0.35, "theta": 0.6}
    renderer = SersicRenderer((61, 61), psf)
    clean = renderer.render(truth)
    prob = SersicProblem(clean, 1e-4 * clean.max(), psf, renderer=renderer)
    res = get_registry().create("fitter", "levmar").fit(prob, off_start(truth))
    print(filter_name, res.nfev, {k: f"{res.params[k]:.6f}" for k in truth})
    assert res.success and not res.flags
    assert abs(res.params["x_0"] - truth["x_0"]) < 0.005 and abs(res.params["y_0"] - truth["y_0"]) < 0.005
    for key in ("amplitude", "r_eff", "n", "ellip", "theta"):
        assert res.params[key] == pytest.approx(truth[key], rel=1e-3), key


def test_disk_plus_bulge_recovery(load_psf):
    psf = load_psf("F160W")
    truth = {
        "x_0": 30.3,
        "y_0": 29.6,
        "amplitude_disk": 0.5,
        "r_eff_disk": 10.0,
        "ellip_disk": 0.5,
        "theta_disk": 0.4,
        "amplitude_bulge": 4.0,
        "r_eff_bulge": 2.5,
        "n_bulge": 3.5,
        "ellip_bulge": 0.15,
        "theta_bulge": 1.2,
    }
    renderer = SersicRenderer((61, 61), psf)
    clean = renderer.render({**truth, "n_disk": 1.0})
    prob = SersicProblem(clean, 1e-4 * clean.max(), psf, model="disk+bulge", renderer=renderer)
    start = {k: v * 1.1 for k, v in truth.items()}
    res = get_registry().create("fitter", "levmar").fit(prob, start)
    assert res.model == "disk+bulge" and res.params["n_disk"] == 1.0
    for key, value in truth.items():
        assert res.params[key] == pytest.approx(value, rel=1e-3), key
    assert res.flux == pytest.approx(prob.spec.total_flux({**truth, "n_disk": 1.0}), rel=1e-4)


def test_a_plugin_optimizer_is_a_few_lines(setup):
    """The contract of SersicFitter: a new optimizer only moves the engine vector."""

    class Powell(SersicFitter):
        def fit(self, problem, start=None):
            q0 = problem.start_engine(start)
            res = optimize.minimize(problem.loss, q0, method="Powell", options={"xtol": 1e-4, "ftol": 1e-8})
            return problem.finalize(res.x, success=res.success, message=str(res.message), nfev=res.nfev, optimizer="powell")

    psf, renderer, clean = setup
    res = Powell().fit(SersicProblem(clean, 1e-3 * clean.max(), psf, renderer=renderer), off_start(TRUTH, 1.05))
    assert res.optimizer == "powell" and res.covariance is not None
    assert res.params["r_eff"] == pytest.approx(TRUTH["r_eff"], rel=1e-2)
