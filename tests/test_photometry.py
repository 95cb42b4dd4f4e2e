"""The shared point-source machinery (sphot_core.photometry) and the noise statistics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, sparse

from sphot_core import photometry as ph
from sphot_core.psf import PSFModel
from sphot_core.stats import background_sigma, noise_map, robust_sigma

GAUSS_SIGMA = 1.3  # image pixels


@pytest.fixture(scope="module")
def gauss_psf():
    """A round Gaussian effective PSF, 4x oversampled (analytic Cramer-Rao bounds)."""
    os_ = 4
    r = (np.arange(-60, 61)) / os_
    g = np.exp(-0.5 * (r / GAUSS_SIGMA) ** 2)
    return PSFModel.from_array(np.outer(g, g), os_, filter="gauss")


def _system(image, sigma=1.0):
    return ph.PixelSystem.build(image, np.full(image.shape, sigma), np.isfinite(image))


# ------------------------------------------------------------------ statistics


def test_background_sigma_not_inflated_by_stars(load_psf, rng):
    psf = load_psf("F150W")
    n = 400
    x, y = rng.uniform(0, 127, n), rng.uniform(0, 127, n)
    flux = 10.0 / (1 - rng.random(n))  # heavy power-law tail
    img, _ = ph.simulate_star_field((128, 128), psf, x, y, flux, 1.0, rng)
    # half the pixels carry > 0.3 sigma of star light: the plain MAD is inflated by 20 %,
    # the lower-half estimate by less than 8 %
    assert robust_sigma(img) > 1.15
    assert 0.95 < background_sigma(img) < 1.08
    assert background_sigma(rng.normal(0, 2.0, 20000)) == pytest.approx(2.0, rel=0.03)


def test_noise_map_follows_a_varying_noise(rng):
    sigma = np.where(np.arange(128)[None, :] < 64, 1.0, 3.0) * np.ones((128, 1))
    img = rng.normal(0, 1, (128, 128)) * sigma
    img[:10, :10] = np.nan
    nm = noise_map(img, box_size=16)
    assert nm.shape == img.shape and np.all(np.isfinite(nm))
    assert np.median(nm[:, :48]) == pytest.approx(1.0, rel=0.08)
    assert np.median(nm[:, 80:]) == pytest.approx(3.0, rel=0.08)


# ------------------------------------------------------------------ stamp sizes


def test_stamp_halves_hold_every_wing_pixel_above_tolerance(load_psf):
    psf = load_psf("F150W")
    flux = np.array([0.01, 30.0, 1e3, 1e5])
    tol = 0.01
    halves = ph.stamp_halves(psf, flux, 1.0, tol, minimum=2)
    assert np.all(np.diff(halves) >= 0) and halves[0] == 2 and halves[-1] <= psf.half_extent + 1
    big = psf.half_extent + 1
    for f, h, x0 in zip(flux, halves, (0.3, -0.45, 0.1, 0.49)):
        full, ix, iy = psf.stamps([x0], [0.2], big)
        outside = np.ones_like(full[0], dtype=bool)
        outside[big - h : big + h + 1, big - h : big + h + 1] = False
        assert f * np.abs(full[0][outside]).max(initial=0.0) <= tol * 1.0 + 1e-12


def test_cached_psf_returns_the_same_stamps(load_psf):
    psf = load_psf("F150W")
    cached = ph.CachedPSF(psf)
    x, y = np.array([3.2, 10.7]), np.array([4.4, 8.5])
    a = psf.stamps(x, y, 5)
    for _ in range(2):
        b = cached.stamps(x, y, 5)
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    assert cached.fwhm == psf.fwhm


# --------------------------------------------------------------------- solvers


def test_nnls_gram_matches_scipy_nnls(rng):
    for trial in range(5):
        A = rng.normal(size=(60, 25))
        b = rng.normal(size=60)
        ref, _ = optimize.nnls(A, b)
        f, info = ph.nnls_gram(sparse.csc_matrix(A.T @ A), A.T @ b)
        assert info["converged"]
        assert np.all(f >= 0) and np.any(f == 0)
        np.testing.assert_allclose(f, ref, atol=1e-7)


def test_nnls_gram_leaves_signed_variables_free(rng):
    """Signed variables (sky offsets) may go negative; the others stay >= 0."""
    A = rng.normal(size=(80, 12))
    truth = np.r_[np.abs(rng.normal(size=10)), -3.0, 2.0]
    truth[:3] = 0.0
    b = A @ truth + 0.01 * rng.normal(size=80)
    signed = np.r_[np.zeros(10, bool), True, True]
    f, info = ph.nnls_gram(sparse.csc_matrix(A.T @ A), A.T @ b, signed=signed)
    assert info["converged"] and f[10] < 0 and np.all(f[:10] >= 0)
    # the same as NNLS with the signed columns split into +/- pairs
    ref, _ = optimize.nnls(np.c_[A, -A[:, 10:]], b)
    np.testing.assert_allclose(f, np.r_[ref[:10], ref[10:12] - ref[12:]], atol=1e-6)


def test_solve_fluxes_with_a_galaxy_and_a_sky_column(gauss_psf):
    """Stars on a galaxy and a sky offset: one joint solve recovers all three exactly."""
    shape = (64, 64)
    yy, xx = np.mgrid[0:64, 0:64]
    galaxy = 50.0 * np.exp(-np.hypot(xx - 31.7, yy - 32.4) / 6.0)
    x = np.array([30.0, 36.2, 12.5])
    y = np.array([33.0, 29.1, 50.2])
    flux = np.array([400.0, 150.0, 90.0])
    img = ph.render_sources(shape, gauss_psf, x, y, flux, 12) + 0.7 * galaxy - 2.5
    system = _system(img, 1.0)
    sol = ph.solve_fluxes(system, gauss_psf, x, y, flux * 2, fixed_halves=12,
                          extra=np.array([galaxy, np.ones(shape)]), extra_signed=[False, True])
    np.testing.assert_allclose(sol.flux, flux, rtol=1e-6)
    np.testing.assert_allclose(sol.extra_flux, [0.7, -2.5], rtol=1e-6)
    # errors from the full normal matrix: the stars' include their covariance with the galaxy
    A = np.c_[ph.design(gauss_psf, x, y, 12, system).toarray(), galaxy.ravel(), np.ones(64 * 64)]
    expect = np.sqrt(np.diag(np.linalg.inv(A.T @ A)))
    np.testing.assert_allclose(sol.flux_errors(), expect[:3], rtol=1e-5)
    np.testing.assert_allclose(sol.extra_errors(), expect[3:], rtol=1e-5)
    alone = ph.solve_fluxes(system, gauss_psf, x, y, flux, fixed_halves=12).flux_errors()
    assert sol.flux_errors()[0] > alone[0]
    with pytest.raises(Exception, match="extra must have shape"):
        ph.solve_fluxes(system, gauss_psf, x, y, flux, extra=np.ones((1, 5, 5)))


def test_inverse_diagonal(rng):
    A = rng.normal(size=(80, 30))
    G = A.T @ A
    np.testing.assert_allclose(ph.inverse_diagonal(sparse.csc_matrix(G), block=7), np.diag(np.linalg.inv(G)), rtol=1e-6)


def test_solve_fluxes_exact_on_noiseless_blends(gauss_psf):
    x = np.array([20.0, 22.1, 40.3, 41.2])
    y = np.array([20.5, 21.0, 30.0, 30.4])
    flux = np.array([500.0, 120.0, 80.0, 0.0])
    img = ph.render_sources((64, 64), gauss_psf, x, y, flux, 12)
    system = _system(img, 2.0)
    sol = ph.solve_fluxes(system, gauss_psf, x, y, flux, fixed_halves=12)
    np.testing.assert_allclose(sol.flux, flux, atol=1e-6)
    # errors: diagonal of the inverse normal matrix of the sources with positive flux
    A = ph.design(gauss_psf, x[:3], y[:3], 12, system).toarray()
    expect = np.sqrt(np.diag(np.linalg.inv(A.T @ A)))
    err = sol.flux_errors()
    np.testing.assert_allclose(err[:3], expect, rtol=1e-6)
    assert np.isnan(err[3])
    assert np.isfinite(sol.flux_errors(all_sources=True)).all()


def test_fit_positions_recovers_a_blended_pair_and_respects_bounds(gauss_psf):
    x = np.array([30.2, 32.9])
    y = np.array([30.6, 31.3])
    flux = np.array([900.0, 400.0])
    img = ph.render_sources((64, 64), gauss_psf, x, y, flux, 12)
    system = _system(img)
    out = ph.fit_positions(system, gauss_psf, x + [0.3, -0.25], y + [-0.2, 0.3], flux, bound=1.0, core_half=4, halves=12, iterations=8)
    np.testing.assert_allclose(out["x"], x, atol=2e-3)
    np.testing.assert_allclose(out["y"], y, atol=2e-3)
    np.testing.assert_allclose(out["flux"], flux, rtol=1e-3)
    assert not out["at_bound"].any()
    pinned = ph.fit_positions(system, gauss_psf, x + 0.6, y, flux, bound=0.2, core_half=4, halves=12, iterations=8)
    assert np.all(np.abs(pinned["x"] - (x + 0.6)) <= 0.2 + 1e-12)
    assert pinned["at_bound"].all()


def test_cramer_rao_matches_the_gaussian_formulae(gauss_psf):
    flux, sigma = 1000.0, 2.0
    sf, sx, sy = ph.cramer_rao(gauss_psf, [32.3], [31.8], flux, np.full((64, 64), sigma), np.ones((64, 64), bool), 14)
    s = GAUSS_SIGMA
    assert sf[0] == pytest.approx(sigma * np.sqrt(4 * np.pi) * s, rel=0.02)  # sqrt(4 pi) s sigma
    assert sx[0] == pytest.approx(np.sqrt(8 * np.pi) * s**2 * sigma / flux, rel=0.02)
    assert sy[0] == pytest.approx(sx[0], rel=1e-3)


def test_position_fitting_bias_is_removed(load_psf, rng):
    """Free positions bias fluxes up by sigma_F^2/F; debias_flux removes it."""
    psf = load_psf("F150W")
    g = np.arange(8.0, 250.0, 16.0)
    x, y = (a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(g, g))
    shape = (256, 256)
    unit, _, _ = ph.cramer_rao(psf, x, y, np.ones(x.size), np.ones(shape), np.ones(shape, bool), 6, core_half=2)
    flux = 8.0 * unit  # S/N 8 within the fit box
    raw, fixed = [], []
    for _ in range(3):
        img, _ = ph.simulate_star_field(shape, psf, x, y, flux, 1.0, rng)
        system = _system(img)
        out = ph.fit_positions(system, ph.CachedPSF(psf), x, y, flux, bound=1.5, core_half=2, halves=6, iterations=4)
        sf, _, _ = ph.cramer_rao(psf, out["x"], out["y"], out["flux"], system.noise, system.valid, 6, core_half=2)
        raw.append(out["flux"] / flux)
        fixed.append(ph.debias_flux(out["flux"], sf) / flux)
    raw, fixed = np.concatenate(raw), np.concatenate(fixed)
    err = raw.std() / np.sqrt(raw.size)
    assert raw.mean() - 1 > 0.008  # expected +1/8**2 = 1.6 %
    assert abs(fixed.mean() - 1) < max(3 * err, 0.006)


# ------------------------------------------------------------------- detection


def test_dedup_keeps_the_stronger_and_drops_references():
    x = np.array([10.0, 10.3, 20.0, 30.0])
    y = np.array([10.0, 10.1, 20.0, 30.0])
    keep = ph.dedup(x, y, [1.0, 5.0, 1.0, 1.0], ref_x=[30.2], ref_y=[29.9], radius=0.5)
    np.testing.assert_array_equal(keep, [False, True, True, False])


def test_match_sources_is_one_to_one():
    ir, im = ph.match_sources([0.0, 1.0], [0.0, 0.0], [0.1, 0.2, 5.0], [0.0, 0.0, 0.0], 1.0)
    assert sorted(zip(ir.tolist(), im.tolist())) == [(0, 0), (1, 1)]


@pytest.mark.parametrize("method", ["dao", "peaks"])
def test_detect_finds_stars_and_skips_nodata(gauss_psf, rng, method):
    x = np.array([15.3, 40.8, 50.1])
    y = np.array([20.2, 44.6, 12.9])
    img = ph.render_sources((64, 64), gauss_psf, x, y, [300.0, 200.0, 250.0], 10) + rng.normal(0, 1, (64, 64))
    img[5:20, 45:58] = np.nan  # covers the third star
    valid = np.isfinite(img)
    stat = ph.detection_image(img, np.ones(img.shape), valid, gauss_psf, method)
    dx, dy, _ = ph.detect(stat, valid, gauss_psf, 8.0, method=method)
    ir, _ = ph.match_sources(x, y, dx, dy, 0.5)
    assert sorted(ir.tolist()) == [0, 1]
    assert dx.size == 2


# ------------------------------------------------------------------ diagnostics


def test_spread_model_separates_stars_from_compact_galaxies(load_psf, rng):
    psf = load_psf("F150W")
    g = np.arange(10.0, 118.0, 12.0)
    x, y = (a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(g, g))
    flux = np.full(x.size, 400.0)
    shape = (128, 128)
    noise = np.ones(shape)
    valid = np.ones(shape, bool)
    img, _ = ph.simulate_star_field(shape, psf, x, y, flux, 1.0, rng)
    zero = np.zeros(shape)
    s, e = ph.spread_model(img - ph.render_sources(shape, psf, x, y, flux, 20), noise, valid, psf, x, y, flux, 4)
    assert abs(np.mean(s)) < 3 * np.std(s) / np.sqrt(s.size)  # zero for point sources
    assert np.std(s / e) == pytest.approx(1.0, abs=0.25)  # error propagated honestly
    # a compact galaxy: the PSF convolved with an exponential of scale FWHM/4
    wide = psf.convolved(ph._exponential_kernel(psf.fwhm * psf.oversample / 4))
    gal, _ = ph.simulate_star_field(shape, wide, x, y, flux, 1.0, rng)
    sg, eg = ph.spread_model(gal - ph.render_sources(shape, psf, x, y, flux, 20), noise, valid, psf, x, y, flux, 4)
    assert np.all(sg > 3 * eg)
    # a single hot pixel is sharper than the PSF: negative
    hot = zero.copy()
    hot[64, 64] = 400.0
    sh, _ = ph.spread_model(hot - psf.render(shape, [64.0], [64.0], [400.0], 20), noise, valid, psf, [64.0], [64.0], [400.0], 4)
    assert sh[0] < 0


def test_quality_cuts_each_cut_counts():
    n = 40
    base = {
        "x_err": np.full(n, 0.1), "y_err": np.full(n, 0.1), "z_centre": np.zeros(n), "chi": np.ones(n),
        "cfit": np.linspace(-0.01, 0.01, n), "drift": np.linspace(0.05, 0.1, n), "flux": np.full(n, 100.0),
        "flux_err": np.full(n, 5.0),
    }
    keep, counts = ph.quality_cuts(base, ph.CutSettings())
    assert keep.all() and counts["rejected"] == 0
    bad = {k: v.copy() for k, v in base.items()}
    bad["x_err"][0] = 3.0  # pos_err
    bad["z_centre"][1] = -10.0  # strong central over-subtraction
    bad["cfit"][2] = -0.5  # cfit far below the others
    bad["drift"][3] = 1.0  # drifted far
    bad["flux"][4] = 2.0  # S/N 0.4
    keep, counts = ph.quality_cuts(bad, ph.CutSettings())
    np.testing.assert_array_equal(np.flatnonzero(~keep), [0, 1, 2, 3, 4])
    assert counts == {"pos_err": 1, "res_cen": 1, "cfit": 1, "drift": 1, "snr": 1, "rejected": 5}


def test_finalize_model_is_the_table_rendered(gauss_psf, rng):
    x = np.array([10.2, 30.7, 31.9])
    y = np.array([12.1, 30.0, 31.4])
    flux = np.array([50.0, 400.0, 200.0])
    img, _ = ph.simulate_star_field((48, 48), gauss_psf, x, y, flux, 1.0, rng)
    img[0:5, :] = np.nan
    system = _system(img)
    res = ph.finalize(img, system, gauss_psf, x, y, flux, np.ones(3), 0, tolerance=0.01, fit_half=2)
    halves = ph.stamp_halves(gauss_psf, flux, 1.0, 0.01, 2)
    np.testing.assert_array_equal(res.model, ph.model_image(img.shape, gauss_psf, x, y, flux, halves))
    # all the light is in the model (wings beyond the stamps included, error < tolerance)
    full = gauss_psf.render(img.shape, x, y, flux, half=gauss_psf.half_extent)
    assert np.abs(res.model - full).max() < 0.01
    assert abs(res.model.sum() - full.sum()) < 1e-3 * flux.sum()
    t = res.sources
    assert list(t.id) == [1, 2, 3]
    from sphot_core.flags import SOURCE_FLAGS

    assert t.flags[1] & SOURCE_FLAGS.BLENDED and t.flags[2] & SOURCE_FLAGS.BLENDED
    assert not t.flags[0] & SOURCE_FLAGS.BLENDED
    assert np.all(np.isfinite(t.spread_model)) and np.all(np.isfinite(t.x_err)) and np.all(t.qfit >= 0)
