"""The ``ladder`` and ``forced`` point-source fitters on simulated fields made with the real PSFs.

The acceptance numbers of issue 4 are tested here in reduced form (a 128 x 128 field
with the stellar density of the 1500-star 255 x 255 field); the full-size numbers come
from ``benchmarks/bench_point_sources.py``.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import signal

from sphot_core import photometry as ph
from sphot_core.errors import ConfigError, DegenerateCutoutError, FitError, InputError
from sphot_core.flags import SOURCE_FLAGS
from sphot_core.registry import get_registry
from sphot_core.stages import RefitStrategy

SHAPE = (128, 128)
CENTRE = (63.6, 64.2)


def _galaxy(psf):
    """PSF-convolved Sersic image (any galaxy will do: it is subtracted exactly)."""
    from astropy.modeling.models import Sersic2D

    yy, xx = np.indices(SHAPE)
    model = Sersic2D(amplitude=2.0, r_eff=10.0, n=1.5, x_0=CENTRE[0], y_0=CENTRE[1], ellip=0.3, theta=0.5)
    return signal.fftconvolve(model(xx, yy), psf.grid_kernel, mode="same")


def _field(psf, seed, n=375, wedge=False):
    """Stars with power-law fluxes (S/N 5 to 30000) + galaxy + unit noise; returns the truth."""
    rng = np.random.default_rng(seed)
    sf = 1.0 / np.sqrt(np.sum(psf.grid_kernel**2))
    u = rng.random(n)
    flux = 1.0 / (1.0 / (5 * sf) - u * (1.0 / (5 * sf) - 1.0 / (3e4 * sf)))
    x = rng.uniform(-0.5, SHAPE[1] - 0.5, n)
    y = rng.uniform(-0.5, SHAPE[0] - 0.5, n)
    stars, _ = ph.simulate_star_field(SHAPE, psf, x, y, flux, 1.0, rng)
    galaxy = _galaxy(psf)
    data = stars + galaxy
    region = np.ones(SHAPE, bool)
    if wedge:
        yy, xx = np.indices(SHAPE)
        ang = np.degrees(np.arctan2(yy - CENTRE[1], xx - CENTRE[0])) % 360
        region = ~((ang >= 200) & (ang < 320))
        data = np.where(region, data, np.nan)
    yy, xx = np.indices(SHAPE)
    exclude = np.hypot(xx - CENTRE[0], yy - CENTRE[1]) <= 1.5 * psf.fwhm
    cr, _, _ = ph.cramer_rao(psf, x, y, flux, np.ones(SHAPE), np.ones(SHAPE, bool), ph.stamp_halves(psf, flux, 1.0, 1e-3))
    return dict(image=data - galaxy, x=x, y=y, flux=flux, cr=cr, snr=flux / cr, exclude=exclude, region=region)


def _ladder_nnls(field, psf, sky_step=True):
    """ladder + nnls, then (as the engine does) a constant sky on the residual and a refit."""
    reg = get_registry()
    lad = reg.create("point_sources", "ladder", {})
    res = lad.fit(field["image"], None, psf, exclude=field["exclude"], refit=reg.create("refit", "nnls", {}))
    if not sky_step:
        return res
    sky = reg.create("sky", "constant", {}).fit(field["image"] - res.model)
    return lad.fit(field["image"] - sky.image, None, psf, exclude=field["exclude"], refit=reg.create("refit", "nnls", {}))


def _check_acceptance(field, res, psf):
    s = res.sources
    x, y, flux, snr = field["x"], field["y"], field["flux"], field["snr"]
    inreg = ph.pixel_value(field["region"], x, y, fill=False)
    far = np.hypot(x - CENTRE[0], y - CENTRE[1]) > psf.fwhm
    sel = (snr > 10) & far & inreg
    ir, im = ph.match_sources(x, y, s.x, s.y, 1.0)
    matched = np.zeros(x.size, bool)
    matched[ir] = True
    assert sel.sum() > 100
    assert matched[sel].mean() >= 0.95  # completeness
    m = sel[ir]
    assert abs(np.median(s.flux[im][m] / flux[ir][m]) - 1) < 0.01  # median flux ratio
    assert np.all(s.flux > 0)  # nnls: no negative (nor zero) fluxes
    fake = np.ones(len(s), bool)
    fake[im] = False
    bright = s.flux / s.flux_err > 10
    assert fake[bright].sum() < 0.01 * bright.sum()  # false detections
    # flux scatter of isolated stars against the Cramer-Rao bound
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
    np.fill_diagonal(d, np.inf)
    iso = ~((d < 1.5 * psf.fwhm) | ((d < 3 * psf.fwhm) & (snr[None, :] > 3))).any(axis=1)
    k = iso[ir] & m
    assert k.sum() >= 20
    assert np.std((s.flux[im][k] - flux[ir][k]) / field["cr"][ir][k]) <= 1.2


def test_crowded_field_acceptance(load_psf):
    psf = load_psf("F150W")
    field = _field(psf, seed=3)
    res = _ladder_nnls(field, psf)
    _check_acceptance(field, res, psf)
    s = res.sources
    # no source in the galaxy-centre exclusion, no duplicates
    assert not ph.pixel_value(field["exclude"], s.x, s.y, fill=False).any()
    d = np.hypot(s.x[:, None] - s.x[None, :], s.y[:, None] - s.y[None, :])
    np.fill_diagonal(d, np.inf)
    assert d.min() > 0.5 * psf.sigma
    # the model image is the table rendered with the stamp rule; the wings left out of
    # the stamps stay below 1 % of the noise per source
    full = psf.render(SHAPE, s.x, s.y, s.flux, half=psf.half_extent)
    assert np.median(np.abs(res.model - full)) < 0.02
    # stats for the log
    st = res.stats
    assert st["n_sources"] == len(s) and len(st["detected"]) == st["passes_run"]
    assert st["cuts"]["rejected"] <= sum(v for k, v in st["cuts"].items() if k != "rejected")
    assert np.all(np.isfinite(s.spread_model)) and np.all(np.isfinite(s.flux_err))


def test_nan_wedge(load_psf):
    psf = load_psf("F150W")
    field = _field(psf, seed=4, wedge=True)
    assert np.isnan(field["image"]).mean() > 0.3
    res = _ladder_nnls(field, psf)
    s = res.sources
    assert len(s) > 100
    assert not ph.pixel_value(~field["region"], s.x, s.y, fill=True).any()  # nothing on NaN
    _check_acceptance(field, res, psf)


def test_flux_errors_are_honest(load_psf):
    """Pull distribution of isolated stars over repeated noise realisations."""
    psf = load_psf("F150W")
    rng = np.random.default_rng(11)
    g = np.arange(10.0, 120.0, 16.0)
    x, y = (a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(g, g))
    unit, _, _ = ph.cramer_rao(psf, x, y, np.ones(x.size), np.ones(SHAPE), np.ones(SHAPE, bool), 40)
    flux = np.exp(rng.uniform(np.log(10), np.log(200), x.size)) * unit
    reg = get_registry()
    lad = reg.create("point_sources", "ladder", {})
    nnls = reg.create("refit", "nnls", {})
    pulls = []
    for _ in range(12):
        img, _ = ph.simulate_star_field(SHAPE, psf, x, y, flux, 1.0, rng)
        s = lad.fit(img, None, psf, refit=nnls).sources
        ir, im = ph.match_sources(x, y, s.x, s.y, 1.0)
        assert ir.size >= x.size - 1
        pulls.append((s.flux[im] - flux[ir]) / s.flux_err[im])
    pulls = np.concatenate(pulls)
    assert 0.85 <= pulls.std() <= 1.2
    assert abs(pulls.mean()) < 0.15


@pytest.mark.parametrize("detector", ["peaks", "dao"])
def test_undersampled_psf_without_refit(load_psf, rng, detector):
    """F090W (FWHM 1.06 px): every resolved star found and measured by the ladder alone."""
    psf = load_psf("F090W")
    g = np.arange(8.0, 90.0, 13.0)
    x, y = (a.ravel() + rng.uniform(-3, 3, a.size) for a in np.meshgrid(g, g))
    flux = rng.uniform(200, 2000, x.size)
    img, _ = ph.simulate_star_field((96, 96), psf, x, y, flux, 1.0, rng)
    res = get_registry().create("point_sources", "ladder", {"detector": detector}).fit(img, np.ones(img.shape), psf)
    s = res.sources
    ir, im = ph.match_sources(x, y, s.x, s.y, 0.2)
    assert ir.size == x.size and len(s) == x.size
    assert res.stats["cuts"]["rejected"] == 0
    assert np.median(s.flux[im] / flux[ir]) == pytest.approx(1.0, abs=0.02)
    rendered = ph.render_table(img.shape, psf, s.x, s.y, s.flux, np.ones(img.shape), np.ones(img.shape, bool),
                               tolerance=ph.DEFAULT_STAMP_TOLERANCE, fit_half=ph.fit_half_size(psf))
    np.testing.assert_array_equal(res.model, rendered)


class _Broken(RefitStrategy):
    def refit(self, image, noise, psf, sources, *, mask=None, exclude=None):
        raise RuntimeError("boom")


def test_failing_refit_falls_back_or_raises(load_psf, rng, caplog):
    psf = load_psf("F814W")
    img, _ = ph.simulate_star_field((64, 64), psf, [20.3, 40.6], [30.1, 22.8], [500.0, 800.0], 1.0, rng)
    reg = get_registry()
    with caplog.at_level(logging.INFO, logger="sphot_plugins.point_sources"):
        res = reg.create("point_sources", "ladder", {}).fit(img, None, psf, refit=_Broken())
    assert len(res.sources) == 2 and "boom" in res.stats["refit_failed"]
    assert any("rejected by cuts" in r.getMessage() for r in caplog.records)
    with pytest.raises(FitError, match="boom"):
        reg.create("point_sources", "ladder", {"raise_error": True}).fit(img, None, psf, refit=_Broken())


def test_ladder_input_errors(load_psf):
    psf = load_psf("F814W")
    reg = get_registry()
    with pytest.raises(DegenerateCutoutError):
        reg.create("point_sources", "ladder", {}).fit(np.full((32, 32), np.nan), None, psf)
    with pytest.raises(ConfigError, match="th_max"):
        reg.create("point_sources", "ladder", {"th_max": 2.0, "th_min": 5.0})
    with pytest.raises(ConfigError):
        reg.create("point_sources", "ladder", {"detector": "sextractor"})
    with pytest.raises(ConfigError, match="Did you mean"):
        reg.create("point_sources", "ladder", {"th_mni": 3.0})


def test_forced_photometry(load_psf, rng):
    psf = load_psf("F150W")
    shape = (80, 80)
    x = np.array([20.2, 21.4, 50.7, 60.3, 70.0, -3.0, 30.0])
    y = np.array([20.6, 21.9, 40.1, 60.8, 12.2, 10.0, 70.0])
    flux = np.array([400.0, 150.0, 600.0, 0.0, 250.0, 300.0, 500.0])
    img, _ = ph.simulate_star_field(shape, psf, x[:5], y[:5], flux[:5], 1.0, rng)
    img[65:75, 25:35] = np.nan  # the last position sits on no data
    exclude = np.zeros(shape, bool)
    exclude[55:66, 55:66] = True
    res = get_registry().create("point_sources", "forced", {}).fit(
        img, None, psf, exclude=exclude, positions=(x, y)
    )
    s = res.sources
    assert list(s.id) == [1, 2, 3, 4, 5]  # outside (6) and on NaN (7) are not measured
    assert res.stats["outside"] == 1 and res.stats["on_nodata"] == 1
    np.testing.assert_array_equal(s.x, x[:5])
    assert np.all(s.flux >= 0)
    assert np.all(s.flags & SOURCE_FLAGS.FORCED)
    assert s.flags[3] & SOURCE_FLAGS.NEAR_GALAXY_CENTRE and s.flags[3] & SOURCE_FLAGS.LOW_SNR
    k = [0, 1, 2, 4]
    assert np.all(np.abs(s.flux[k] - flux[k]) < 4 * s.flux_err[k])
    assert np.all(np.isfinite(s.flux_err))
    empty = get_registry().create("point_sources", "forced", {}).fit(img, None, psf, positions=([], []))
    assert len(empty.sources) == 0 and not empty.model.any()
    with pytest.raises(InputError):
        get_registry().create("point_sources", "forced", {}).fit(img, None, psf)
