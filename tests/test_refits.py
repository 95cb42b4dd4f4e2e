"""The refit strategies ``nnls``, ``iterative`` and ``none``."""

from __future__ import annotations

import numpy as np
import pytest

from sphot_core import photometry as ph
from sphot_core.data import SourceTable
from sphot_core.errors import ConfigError, InputError
from sphot_core.flags import SOURCE_FLAGS
from sphot_core.registry import get_registry

SHAPE = (72, 72)


@pytest.fixture
def blend_field(load_psf, rng):
    """Close pairs and a faint companion next to a bright star (real F150W PSF, sigma 1)."""
    psf = load_psf("F150W")
    x = np.array([20.3, 22.4, 45.1, 46.0, 30.2, 55.7, 33.4])
    y = np.array([20.8, 21.5, 44.6, 46.2, 55.1, 15.3, 56.9])
    flux = np.array([800.0, 300.0, 500.0, 450.0, 3000.0, 150.0, 120.0])
    img, _ = ph.simulate_star_field(SHAPE, psf, x, y, flux, 1.0, rng)
    return psf, img, x, y, flux


def _table(x, y, flux):
    return SourceTable.from_columns(x, y, flux, flux_err=np.full(np.size(x), np.nan))


def _refit(name, options=None):
    return get_registry().create("refit", name, options or {})


def test_nnls_joint_fluxes_errors_and_model(blend_field):
    psf, img, x, y, flux = blend_field
    noise = np.ones(SHAPE)
    # start from fluxes off by a factor two: the joint solve does not care
    res = _refit("nnls", {"leftover_max_iterations": 0, "flux_bias_correction": False}).refit(
        img, noise, psf, _table(x, y, 2 * flux)
    )
    s = res.sources
    assert len(s) == x.size and np.all(s.flux > 0)
    assert np.all(np.abs(s.flux - flux) < 4 * s.flux_err)
    # errors from the final design: diagonal of the inverse normal matrix
    core = ph.fit_half_size(psf)
    halves = ph.stamp_halves(psf, s.flux, 1.0, ph.DEFAULT_STAMP_TOLERANCE, core)
    system = ph.PixelSystem.build(img, noise, np.ones(SHAPE, bool))
    A = ph.design(psf, x, y, halves, system).toarray()
    np.testing.assert_allclose(s.flux_err, np.sqrt(np.diag(np.linalg.inv(A.T @ A))), rtol=0.02)
    # the model is the table rendered
    rendered = ph.render_table(SHAPE, psf, s.x, s.y, s.flux, noise, np.ones(SHAPE, bool),
                               tolerance=ph.DEFAULT_STAMP_TOLERANCE, fit_half=core)
    np.testing.assert_array_equal(res.model, rendered)


def test_nnls_adds_leftovers_and_drops_spurious(blend_field):
    psf, img, x, y, flux = blend_field
    # the table misses the faint companion (index 6) and has a spurious source on empty sky
    given = _table(np.r_[x[:6], 10.0], np.r_[y[:6], 62.0], np.r_[flux[:6], 50.0])
    res = _refit("nnls").refit(img, np.ones(SHAPE), psf, given)
    s = res.sources
    assert res.stats["leftovers_added"][0] >= 1 and res.stats["dropped_zero_flux"] <= 1
    ir, im = ph.match_sources(x, y, s.x, s.y, 0.5)
    assert 6 in ir  # the companion was found ...
    k = im[list(ir).index(6)]
    assert s.flags[k] & SOURCE_FLAGS.LEFTOVER
    assert abs(s.flux[k] - flux[6]) < 4 * s.flux_err[k]
    # ... and the spurious source went to (near) zero flux and left the table, or is insignificant
    spurious = np.hypot(s.x - 10.0, s.y - 62.0) < 0.5
    assert not spurious.any() or s.flux[spurious][0] < 3 * s.flux_err[spurious][0]
    assert np.all(s.flux > 0)


def test_iterative_recovers_positions_within_bounds(blend_field):
    psf, img, x, y, flux = blend_field
    rng = np.random.default_rng(2)
    x0 = x + rng.uniform(-0.4, 0.4, x.size)
    y0 = y + rng.uniform(-0.4, 0.4, x.size)
    res = _refit("iterative", {"xy_bounds": 1.0}).refit(img, np.ones(SHAPE), psf, _table(x0, y0, flux))
    s = res.sources
    ir, im = ph.match_sources(x, y, s.x, s.y, 0.5)
    assert ir.size == x.size
    assert np.all(np.hypot(s.x[im] - x[ir], s.y[im] - y[ir]) < 5 * np.hypot(s.x_err[im], s.y_err[im]) + 0.02)
    assert np.all(np.abs(s.flux[im] - flux[ir]) < 4 * s.flux_err[im])
    # a tight bound holds positions within it and flags them
    tight = _refit("iterative", {"xy_bounds": 0.05, "max_iterations": 1}).refit(img, np.ones(SHAPE), psf, _table(x0, y0, flux))
    t = tight.sources
    assert np.all(np.abs(t.x - x0[: len(t)]) <= 0.05 + 1e-9) and np.all(np.abs(t.y - y0[: len(t)]) <= 0.05 + 1e-9)
    assert np.count_nonzero(t.flags & SOURCE_FLAGS.POSITION_AT_BOUND) >= 5
    # xy_bounds = 0 pins the positions
    pinned = _refit("iterative", {"xy_bounds": 0.0, "max_iterations": 1}).refit(img, np.ones(SHAPE), psf, _table(x0, y0, flux))
    np.testing.assert_array_equal(pinned.sources.x, x0)
    assert not np.any(pinned.sources.flags & SOURCE_FLAGS.POSITION_AT_BOUND)


def test_iterative_is_robust_to_nan_regions(blend_field):
    psf, img, x, y, flux = blend_field
    img = img.copy()
    img[:, 40:] = np.nan  # half the image, over the pair at x = 45
    img[50:60, 25:33] = np.nan  # the bright star's core, next to its faint companion
    given = _table(x[[0, 1, 2, 6]], y[[0, 1, 2, 6]], flux[[0, 1, 2, 6]])
    res = _refit("iterative").refit(img, np.ones(SHAPE), psf, given)
    s = res.sources
    assert res.stats["dropped_on_nodata"] == 1  # the source given at x = 45
    assert np.all(np.isfinite(s.flux)) and np.all(s.flux > 0)
    assert not ph.pixel_value(~np.isfinite(img), s.x, s.y, fill=True).any()
    companion = np.hypot(s.x - x[6], s.y - y[6]) < 1
    assert companion.sum() == 1 and s.flags[companion][0] & SOURCE_FLAGS.NEAR_NODATA


def test_iterative_drops_catastrophic_fluxes(blend_field):
    psf, img, x, y, flux = blend_field
    # a source given with 1/1000 of the flux at a real star's place: its fit explodes
    given = _table(np.r_[x[:4], x[4] + 0.2], np.r_[y[:4], y[4]], np.r_[flux[:4], flux[4] / 1000])
    res = _refit("iterative", {"xy_bounds": 0.5, "max_iterations": 1}).refit(img, np.ones(SHAPE), psf, given)
    assert res.stats["catastrophic"] == 1
    assert len(res.sources) == 4


def test_none_keeps_the_table(blend_field):
    psf, img, x, y, flux = blend_field
    given = SourceTable.from_columns(x, y, flux, flux_err=np.full(x.size, 3.0))
    # default options: ``none`` never corrects the fluxes again (the engine applies it to
    # its own output every warm iteration, so a correction would compound)
    res = _refit("none").refit(img, np.ones(SHAPE), psf, given)
    np.testing.assert_array_equal(res.sources.flux, flux)
    np.testing.assert_array_equal(res.sources.flux_err, 3.0)
    full = psf.render(SHAPE, x, y, flux, half=psf.half_extent)
    assert np.abs(res.model - full).max() < ph.DEFAULT_STAMP_TOLERANCE
    again = _refit("none").refit(img, np.ones(SHAPE), psf, res.sources)
    np.testing.assert_array_equal(again.sources.flux, flux)


def test_ladder_corrects_the_flux_bias_once(blend_field):
    psf, img, *_ = blend_field
    ladder = get_registry().create("point_sources", "ladder", {})
    raw = get_registry().create("point_sources", "ladder", {"flux_bias_correction": False})
    alone = ladder.fit(img, np.ones(SHAPE), psf)
    with_none = ladder.fit(img, np.ones(SHAPE), psf, refit=_refit("none"))
    uncorrected = raw.fit(img, np.ones(SHAPE), psf)
    # the same table, whether returned directly or through ``none``
    np.testing.assert_allclose(with_none.sources.flux, alone.sources.flux, rtol=1e-12)
    # and corrected exactly once: f - sigma**2 / f, the faint sources the most
    f0, s0 = uncorrected.sources.flux, uncorrected.sources.flux_err
    np.testing.assert_allclose(alone.sources.flux, ph.debias_flux(f0, s0), rtol=1e-9)
    assert np.all(alone.sources.flux < f0)


def test_refit_options_and_inputs(blend_field):
    psf, img, x, y, flux = blend_field
    with pytest.raises(ConfigError):
        _refit("nnls", {"leftover_box_size": 1})
    with pytest.raises(ConfigError):
        _refit("iterative", {"catastrophic_flux_factor": 0.5})
    # without a noise map the refit estimates one (the engine may not have one yet)
    est = _refit("nnls").refit(img, None, psf, _table(x, y, flux))
    assert len(est.sources) == x.size and np.all(est.sources.flux_err > 0)
    with pytest.raises(InputError):
        _refit("nnls").refit(img, np.ones((3, 3)), psf, _table(x, y, flux))
    empty = _refit("nnls").refit(np.zeros(SHAPE), np.ones(SHAPE), psf, SourceTable.empty())
    assert len(empty.sources) == 0 and not empty.model.any()


def test_warm_refit_keeps_provenance_and_refreshes_flags(blend_field):
    """A refit of its own previous table (the engine's warm iterations)."""
    psf, img, x, y, flux = blend_field
    noise = np.ones(SHAPE)
    stale = SOURCE_FLAGS.LEFTOVER | SOURCE_FLAGS.EDGE | SOURCE_FLAGS.SINGULAR
    given = SourceTable.from_columns(x, y, flux, flags=np.r_[stale, np.zeros(x.size - 1, dtype=int)])
    first = _refit("nnls").refit(img, noise, psf, given)
    s = first.sources
    k = np.argmin(np.hypot(s.x - x[0], s.y - y[0]))
    assert s.flags[k] & SOURCE_FLAGS.LEFTOVER  # provenance kept
    assert not s.flags[k] & (SOURCE_FLAGS.EDGE | SOURCE_FLAGS.SINGULAR)  # recomputed, not stale
    again = _refit("nnls").refit(img, noise, psf, s)
    np.testing.assert_allclose(again.sources.flux[: len(s)], s.flux, rtol=0.02)
