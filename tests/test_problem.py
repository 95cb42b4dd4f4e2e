"""The Sersic problem: transforms, masks, linear parameters, losses, errors, flags."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sphot_core.errors import DegenerateCutoutError, InputError
from sphot_core.flags import GALAXY_FLAGS
from sphot_core.problem import SersicProblem, Transform, make_scale_problem
from sphot_core.psf import SersicRenderer
from sphot_core.registry import get_registry

SHAPE = (41, 41)
TRUTH = {"x_0": 20.3, "y_0": 19.6, "amplitude": 1.0, "r_eff": 4.0, "n": 2.5, "ellip": 0.3, "theta": 0.7}


@pytest.fixture(scope="module")
def psf(load_psf):
    return load_psf("F150W")


@pytest.fixture(scope="module")
def renderer(psf):
    return SersicRenderer(SHAPE, psf)


@pytest.fixture(scope="module")
def clean(renderer):
    return renderer.render(TRUTH)


def levmar():
    return get_registry().create("fitter", "levmar")


# ------------------------------------------------------------------ transforms


@pytest.mark.parametrize(
    "kind,lo,hi,value",
    [("bounded_linear", -0.5, 40.5, 12.3), ("bounded_log", 0.5, 41.0, 3.7), ("linear", -math.inf, math.inf, 2.2)],
)
def test_transform_round_trip_and_limits(kind, lo, hi, value):
    t = Transform(kind, lo, hi)
    assert t.to_physical(t.to_engine(value)) == pytest.approx(value, rel=1e-12)
    if kind != "linear":
        # any engine value maps inside the bounds; far engine values approach them
        assert lo < t.to_physical(-30.0) <= lo + 1e-9 * (hi - lo) + 1e-12 * abs(lo)
        assert hi - 1e-9 * (hi - lo) <= t.to_physical(30.0) <= hi
        assert t.fraction(t.to_physical(0.0)) == pytest.approx(0.5)


def test_encode_decode_and_bulge_radius_constraint(psf, clean):
    prob = SersicProblem(clean, 0.01, psf, model="disk+bulge")
    params = {**prob.start, "r_eff_disk": 8.0, "r_eff_bulge": 2.0, "ellip_disk": 0.4, "theta_disk": 2.9}
    back = prob.decode(prob.encode(params))
    for name in ("r_eff_disk", "r_eff_bulge", "ellip_disk", "theta_disk", "n_bulge", "x_0"):
        assert back[name] == pytest.approx(params[name], rel=1e-10, abs=1e-12)
    assert back["n_disk"] == 1.0 and "n_disk" not in prob.free_names
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = prob.decode(rng.normal(0, 5, prob.engine_size))
        assert p["r_eff_bulge"] <= p["r_eff_disk"]
        assert 0.0 <= p["ellip_disk"] < 0.9 and 0.0 <= p["theta_disk"] < math.pi


def test_engine_box_is_finite(psf, clean):
    prob = SersicProblem(clean, 0.01, psf)
    lo, hi = prob.engine_box
    assert lo.shape == hi.shape == (prob.engine_size,)
    assert np.all(np.isfinite(lo)) and np.all(hi > lo)
    assert np.all((prob.start_engine() >= lo) & (prob.start_engine() <= hi))


# ---------------------------------------------------------------- bad input


def test_degenerate_cutouts_raise_clear_errors(psf):
    with pytest.raises(DegenerateCutoutError, match="no finite"):
        SersicProblem(np.full(SHAPE, np.nan), 1.0, psf)
    with pytest.raises(DegenerateCutoutError):
        SersicProblem(np.ones(SHAPE), 1.0, psf, mask=np.ones(SHAPE, bool))
    with pytest.raises(DegenerateCutoutError):
        SersicProblem(np.ones(SHAPE), 0.0, psf)
    with pytest.raises(InputError, match="noise map shape"):
        SersicProblem(np.ones(SHAPE), np.ones((3, 3)), psf)
    with pytest.raises(InputError, match="unknown loss"):
        SersicProblem(np.ones(SHAPE), 1.0, psf, loss="l1")
    with pytest.raises(InputError, match="not a parameter"):
        SersicProblem(np.ones(SHAPE), 1.0, psf, fixed_params={"flux_point": 1.0})


def test_noise_only_cutout_gives_flagged_result(psf, renderer, rng):
    prob = SersicProblem(rng.normal(0, 1, SHAPE), 1.0, psf, renderer=renderer)
    res = levmar().fit(prob)
    assert res.flags & GALAXY_FLAGS.NO_SIGNAL
    assert res.params["amplitude"] >= 0.0
    assert "flux" in res.message


def test_unresolved_source_flags_r_eff_at_lower_bound(psf, renderer, rng):
    img = 1000 * renderer.point_image(20.2, 19.7) + rng.normal(0, 0.01, SHAPE)
    res = levmar().fit(SersicProblem(img, 0.01, psf, renderer=renderer))
    print("point source fitted as Sersic:", res.params, res.message)
    assert res.flags & GALAXY_FLAGS.AT_LOWER_BOUND
    assert "r_eff at its lower bound" in res.message


def test_nonfinite_model_is_flagged_not_raised(psf, clean, renderer, monkeypatch):
    prob = SersicProblem(clean, 0.01, psf, renderer=renderer)
    monkeypatch.setattr(prob.renderer, "component_images", lambda *a, **k: ([np.full(SHAPE, np.nan)], [None]))
    res = levmar().fit(prob)
    assert res.flags & GALAXY_FLAGS.NONFINITE and not res.success
    assert np.isnan(res.flux) and "could not be evaluated" in res.message


# ----------------------------------------------------------- pixels and loss


def test_masked_and_nan_pixels_carry_no_weight(psf, clean, renderer, rng):
    noisy = clean + rng.normal(0, 0.01, SHAPE)
    mask = np.zeros(SHAPE, bool)
    mask[:, :8] = True
    spoiled = noisy.copy()
    spoiled[:, :8] = 1e6
    spoiled[30:, 30:] = np.nan
    ref = SersicProblem(np.where(np.isnan(spoiled), np.nan, noisy), 0.01, psf, mask=mask, renderer=renderer)
    prob = SersicProblem(spoiled, 0.01, psf, mask=mask, renderer=renderer)
    assert prob.n_pix == ref.n_pix == SHAPE[0] * SHAPE[1] - 8 * 41 - 11 * 11
    q = prob.start_engine(TRUTH)
    assert prob.loss(q) == pytest.approx(ref.loss(q), rel=1e-12)
    # the loss is a plain chi-square: about one per usable pixel at the truth
    assert prob.loss(q) == pytest.approx(prob.n_pix, rel=0.1)


def test_fixed_image_and_sky_offset_are_handled(psf, clean, renderer, rng):
    stars = np.zeros(SHAPE)
    stars[5, 5] = stars[35, 30] = 50.0
    img = clean + stars + 0.2 + rng.normal(0, 0.01, SHAPE)
    res = levmar().fit(SersicProblem(img, 0.01, psf, fixed=stars, solve_sky=True, renderer=renderer), TRUTH)
    assert res.sky_offset == pytest.approx(0.2, abs=5e-3)
    assert res.params["r_eff"] == pytest.approx(TRUTH["r_eff"], rel=0.05)
    assert "sky_offset" in res.names


def test_robust_loss_resists_outliers(psf, clean, renderer, rng):
    img = clean + rng.normal(0, 0.01, SHAPE)
    bad = img.copy()
    hot = rng.choice(img.size, 40, replace=False)
    bad.flat[hot] += rng.uniform(0.5, 3.0, hot.size)  # cosmic rays, 50-300 sigma
    chi2 = levmar().fit(SersicProblem(bad, 0.01, psf, renderer=renderer), TRUTH)
    robust = levmar().fit(SersicProblem(bad, 0.01, psf, loss="robust", renderer=renderer), TRUTH)
    print("r_eff chi2 %.3f robust %.3f truth %.3f" % (chi2.params["r_eff"], robust.params["r_eff"], TRUTH["r_eff"]))
    for name in ("r_eff", "n", "amplitude"):
        err_chi2 = abs(chi2.params[name] / TRUTH[name] - 1)
        err_robust = abs(robust.params[name] / TRUTH[name] - 1)
        assert err_robust < 0.3 * err_chi2
    assert abs(robust.params["r_eff"] / TRUTH["r_eff"] - 1) < 0.01


def test_aspect_regularisation_pulls_towards_round(psf, renderer, rng):
    """Noise bias: faint round galaxies come out elongated; the prior reduces it."""
    truth = {**TRUTH, "ellip": 0.0, "r_eff": 2.0}
    clean = renderer.render(truth)
    sigma = clean.max() / 8.0
    plain, reg = [], []
    for _ in range(6):
        img = clean + rng.normal(0, sigma, SHAPE)
        plain.append(levmar().fit(SersicProblem(img, sigma, psf, renderer=renderer), truth).params["ellip"])
        prob = SersicProblem(img, sigma, psf, renderer=renderer, regularize_aspect=True, aspect_prior_sigma=0.2)
        reg.append(levmar().fit(prob, truth).params["ellip"])
    print("mean ellip plain %.3f regularised %.3f" % (np.mean(plain), np.mean(reg)))
    assert np.mean(reg) < 0.8 * np.mean(plain)


# ---------------------------------------------------------------- uncertainties


def test_errors_scale_with_noise(psf, clean, renderer):
    out = []
    for sigma in (0.01, 0.02):
        prob = SersicProblem(clean, sigma, psf, renderer=renderer)
        out.append(prob.finalize(prob.start_engine(TRUTH), success=True))
    for name in TRUTH:
        assert out[1].errors[name] == pytest.approx(2 * out[0].errors[name], rel=1e-3)
    assert out[1].flux_err == pytest.approx(2 * out[0].flux_err, rel=1e-3)
    assert out[0].covariance.shape == (len(out[0].names),) * 2
    assert set(out[0].names) == set(TRUTH)


def test_pulls_are_honest(psf, clean, renderer, rng):
    """Reduced pull study (the full 200-realisation one is in benchmarks/bench_sersic.py)."""
    unit = SersicProblem(clean, 1.0, psf, renderer=renderer)
    unit_err = unit.finalize(unit.start_engine(TRUTH), success=True).flux_err  # flux error for sigma = 1
    true_flux = unit.spec.total_flux(TRUTH)
    sigma = true_flux / (50.0 * unit_err)  # total-flux S/N = 50
    pulls = {name: [] for name in (*TRUTH, "flux")}
    for _ in range(40):
        img = clean + rng.normal(0, sigma, SHAPE)
        res = levmar().fit(SersicProblem(img, sigma, psf, renderer=renderer))
        assert res.flags == 0, res.message
        for name in TRUTH:
            pulls[name].append((res.params[name] - TRUTH[name]) / res.errors[name])
        pulls["flux"].append((res.flux - true_flux) / res.flux_err)
    for name, p in pulls.items():
        p = np.array(p)
        print(f"{name:10s} mean pull {p.mean():+.2f}  std {p.std():.2f}")
        assert abs(p.mean()) < 0.5, name
        assert 0.7 < p.std() < 1.35, name


def test_fixed_shape_flux_error_is_the_pinned_shape_error(psf, clean, renderer, rng):
    img = clean + rng.normal(0, 0.01, SHAPE)
    free = levmar().fit(SersicProblem(img, 0.01, psf, renderer=renderer))
    pinned = make_scale_problem(img, 0.01, psf, free.params, shift_max=0.0, renderer=renderer)
    at_shape = pinned.finalize(np.zeros(0), success=True)
    # the amplitude's error given the shape, whether the shape was free or pinned
    assert free.flux_err_fixed_shape == pytest.approx(at_shape.flux_err, rel=1e-3)
    assert at_shape.flux_err_fixed_shape == pytest.approx(at_shape.flux_err, rel=1e-9)
    # the shape's uncertainty (r_eff and n trade flux) is most of a free fit's flux error
    assert free.flux_err > 2 * free.flux_err_fixed_shape


def test_colour_pulls_are_honest_with_the_fixed_shape_error(psf, clean, renderer, rng):
    """A second band with the base shape (colour 0.75 mag): the colour's error is the
    quadrature sum of the fixed-shape errors; with the base's full flux error it would be
    overstated."""
    sigma = 0.02
    colour_true = -2.5 * math.log10(0.5)
    pulls, pulls_full = [], []
    for _ in range(30):
        base = levmar().fit(SersicProblem(clean + rng.normal(0, sigma, SHAPE), sigma, psf, renderer=renderer))
        other_img = 0.5 * clean + rng.normal(0, sigma, SHAPE)
        other = make_scale_problem(other_img, sigma, psf, base.params, shift_max=0.0, renderer=renderer).finalize(np.zeros(0), success=True)
        colour = -2.5 * math.log10(other.flux / base.flux)
        rel = math.hypot(other.flux_err_fixed_shape / other.flux, base.flux_err_fixed_shape / base.flux)
        rel_full = math.hypot(other.flux_err / other.flux, base.flux_err / base.flux)
        pulls.append((colour - colour_true) / (1.0857 * rel))
        pulls_full.append((colour - colour_true) / (1.0857 * rel_full))
    pulls, pulls_full = np.array(pulls), np.array(pulls_full)
    print(f"colour pulls: mean {pulls.mean():+.2f} std {pulls.std():.2f}; with the full base error std {pulls_full.std():.2f}")
    assert abs(pulls.mean()) < 0.5
    assert 0.7 < pulls.std() < 1.35
    assert pulls_full.std() < 0.7


# --------------------------------------------------------------------- scale fit


def test_scale_problem_solves_amplitude_without_search(psf, clean, renderer, rng):
    img = 0.5 * clean + rng.normal(0, 0.005, SHAPE)
    prob = make_scale_problem(img, 0.005, psf, TRUTH, shift_max=0.0, renderer=renderer)
    assert prob.free_names == ()
    res = levmar().fit(prob)
    assert res.success and res.params["amplitude"] == pytest.approx(0.5, rel=0.01)
    assert res.params["r_eff"] == TRUTH["r_eff"] and res.errors["r_eff"] == 0.0
    assert res.names == ("amplitude",)


def test_scale_problem_recovers_a_small_shift(psf, renderer, rng):
    moved = renderer.render({**TRUTH, "x_0": TRUTH["x_0"] + 0.4, "y_0": TRUTH["y_0"] - 0.3})
    prob = make_scale_problem(moved + rng.normal(0, 0.005, SHAPE), 0.005, psf, TRUTH, shift_max=2.0, renderer=renderer)
    assert prob.free_names == ("x_0", "y_0")
    res = levmar().fit(prob)
    assert res.params["x_0"] == pytest.approx(TRUTH["x_0"] + 0.4, abs=0.01)
    assert res.params["y_0"] == pytest.approx(TRUTH["y_0"] - 0.3, abs=0.01)
    assert not res.flags
    tight = make_scale_problem(moved, 0.005, psf, TRUTH, shift_max=0.1, renderer=renderer)
    assert levmar().fit(tight).flags & GALAXY_FLAGS.SHIFT_AT_BOUND


def test_scale_problem_allow_refit_frees_everything(psf, clean, renderer):
    prob = make_scale_problem(clean, 0.01, psf, TRUTH, allow_refit=True, renderer=renderer)
    assert set(prob.free_names) == {"x_0", "y_0", "r_eff", "n", "ellip", "theta"}
    np.testing.assert_allclose(prob.decode(prob.start_engine())["r_eff"], TRUTH["r_eff"])
    with pytest.raises(InputError, match="lack"):
        make_scale_problem(clean, 0.01, psf, {"x_0": 1.0})


# ------------------------------------------------------------------ start, data


def test_automatic_start_finds_the_galaxy_not_a_star(psf, renderer, rng):
    img = renderer.render(TRUTH) + 200 * renderer.point_image(4.0, 36.0) + rng.normal(0, 0.01, SHAPE)
    start = SersicProblem(img, 0.01, psf, renderer=renderer).start
    assert abs(start["x_0"] - TRUTH["x_0"]) < 1.0 and abs(start["y_0"] - TRUTH["y_0"]) < 1.0
    assert 0.5 * TRUTH["r_eff"] < start["r_eff"] < 2.0 * TRUTH["r_eff"]


def test_real_galaxy_cutout_fits(galaxy_dir, load_psf):
    """g260 in F150W with its stars and sky pedestal: a finite, unflagged fit near the middle."""
    h5py = pytest.importorskip("h5py")
    from sphot_core.stats import clipped_stats

    with h5py.File(galaxy_dir / "g260.h5") as f:
        img = f["F150W"][:]
    _, median, std = clipped_stats(img)
    res = levmar().fit(SersicProblem(img - median, std, load_psf("F150W"), solve_sky=True))
    print(res.params, res.flux, res.flux_err, res.chi2_dof)
    assert not res.flags & (GALAXY_FLAGS.NONFINITE | GALAXY_FLAGS.SINGULAR_COVARIANCE | GALAXY_FLAGS.NO_SIGNAL)
    ny, nx = img.shape
    assert abs(res.params["x_0"] - nx / 2) < 20 and abs(res.params["y_0"] - ny / 2) < 20
    assert 3 < res.params["r_eff"] < 100 and 0 < res.flux_err < 0.05 * res.flux
