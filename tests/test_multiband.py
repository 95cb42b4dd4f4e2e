"""Wavelength-dependent shape across bands ([core] wavelength_shape) on known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sphot_core import engine, multiband
from sphot_core.config import load_config
from sphot_core.data import Band, Galaxy
from sphot_core.errors import ConfigError
from sphot_core.problem import make_scale_problem
from sphot_core.psf import SersicRenderer
from sphot_core.sersic import sersic_total_flux
from sphot_core.testing import _gaussian_psf

SHAPE = (71, 71)
#: filter -> (PSF FWHM in px, total flux)
BANDS = {"F090W": (1.6, 300.0), "F150W": (2.2, 500.0), "F277W": (3.0, 800.0), "F444W": (4.0, 700.0)}
#: the truth: n and ln(r_eff) linear in x = ln(lambda / lambda_F150W)
N0, N1 = 2.5, 1.2
LNR0, LNR1 = math.log(8.0), -0.35
GEOMETRY = {"x_0": 35.2, "y_0": 34.7, "ellip": 0.35, "theta": 0.6}


def _x(flt):
    return math.log(multiband.PIVOT_MICRON[flt] / multiband.PIVOT_MICRON["F150W"])


def _truth(flt):
    x = _x(flt)
    return {**GEOMETRY, "n": N0 + N1 * x, "r_eff": math.exp(LNR0 + LNR1 * x)}


def _galaxy(seed=3, sigma=0.02):
    """Bands rendered with the truth law, fitted as a scale fit would (shape pinned to
    the base band's)."""
    rng = np.random.default_rng(seed)
    base = dict(_truth("F150W"), amplitude=1.0)
    bands = {}
    true_flux = {}
    for flt, (fwhm, flux) in BANDS.items():
        psf = _gaussian_psf(fwhm)
        renderer = SersicRenderer(SHAPE, psf)
        t = _truth(flt)
        amplitude = flux / sersic_total_flux(1.0, t["r_eff"], t["n"], t["ellip"])
        image = renderer.render(dict(t, amplitude=amplitude), "sersic") + rng.normal(0.0, sigma, SHAPE)
        true_flux[flt] = flux
        noise = np.full(SHAPE, sigma)
        problem = make_scale_problem(image, noise, psf, base, shift_max=0.0)
        band = Band(filter=flt, data=image, psf=psf, noise=noise)
        band.sersic = problem.finalize(np.zeros(0), success=True, optimizer="linear")
        band.galaxy_model = renderer.render(band.sersic.params, "sersic")
        band.star_model = np.zeros(SHAPE)
        band.sky_model = np.zeros(SHAPE)
        band.status = "done"
        bands[flt] = band
    galaxy = Galaxy(name="law", bands=bands, base_filter="F150W", meta={"base_params": base})
    return galaxy, true_flux


def _colour_errors(galaxy, true_flux):
    def mag(flux):
        return -2.5 * math.log10(flux)

    base = galaxy.bands["F150W"].sersic.flux
    return {
        f: (mag(b.sersic.flux) - mag(base)) - (mag(true_flux[f]) - mag(true_flux["F150W"]))
        for f, b in galaxy.bands.items()
    }


@pytest.fixture(scope="module")
def config():
    return load_config(use_user_config=False).with_overrides({"core.wavelength_shape": True})


def test_law_recovers_a_colour_gradient(config):
    galaxy, true_flux = _galaxy()
    pinned = _colour_errors(galaxy, true_flux)
    # the premise: a shape pinned to the base band biases the colours of this galaxy
    assert max(abs(v) for v in pinned.values()) > 0.05
    law = multiband.fit_wavelength_shape(galaxy, config)
    assert law["n"] == pytest.approx([N0, N1], abs=0.05)
    assert law["ln_r_eff"] == pytest.approx([LNR0, LNR1], abs=0.02)
    assert law["loss"] < law["loss_start"]
    errors = _colour_errors(galaxy, true_flux)
    assert max(abs(v) for v in errors.values()) < 0.01, errors
    for flt, band in galaxy.bands.items():
        truth = _truth(flt)
        assert band.sersic.params["n"] == pytest.approx(truth["n"], abs=0.06)
        assert band.sersic.params["r_eff"] == pytest.approx(truth["r_eff"], rel=0.03)
        # geometry untouched, brightness solved linearly, model re-rendered
        for k in GEOMETRY:
            assert band.sersic.params[k] == pytest.approx(GEOMETRY[k])
        assert band.sersic.optimizer == "wavelength"
        rendered = SersicRenderer(SHAPE, band.psf).render(band.sersic.params, "sersic")
        np.testing.assert_allclose(band.galaxy_model, rendered, rtol=1e-9, atol=1e-12)
        assert band.history[-1]["stage"] == "wavelength"


def test_degree_zero_is_one_common_shape(config):
    galaxy, _ = _galaxy()
    cfg = config.with_overrides({"core.wavelength_degree_n": 0, "core.wavelength_degree_r_eff": 0})
    law = multiband.fit_wavelength_shape(galaxy, cfg)
    assert len(law["n"]) == 1 and len(law["ln_r_eff"]) == 1
    values = {(round(b.sersic.params["n"], 9), round(b.sersic.params["r_eff"], 9)) for b in galaxy.bands.values()}
    assert len(values) == 1


def test_degree_is_capped_by_the_number_of_wavelengths(config):
    galaxy, _ = _galaxy()
    for flt in ("F090W", "F444W"):
        del galaxy.bands[flt]
    law = multiband.fit_wavelength_shape(galaxy, config.with_overrides({"core.wavelength_degree_n": 3}))
    assert len(law["n"]) == 2  # two wavelengths determine at most a line


def test_wavelengths_table_and_errors(config):
    assert multiband.wavelength_of("F150W") == pytest.approx(1.501)
    assert multiband.wavelength_of("f150w") == pytest.approx(1.501)
    assert multiband.wavelength_of("F150W", {"F150W": 1.5}) == 1.5
    with pytest.raises(ConfigError, match=r"\[wavelengths\] F999X"):
        multiband.wavelength_of("F999X")
    cfg = config.with_overrides({"wavelengths.F999X": 2.0})
    assert cfg.wavelengths == {"F999X": 2.0}
    with pytest.raises(ConfigError, match=r"\[wavelengths\].*F999X.*positive"):
        config.with_overrides({"wavelengths.F999X": -1.0})


def test_unknown_wavelength_fails_before_any_fit(config, monkeypatch):
    galaxy, _ = _galaxy()
    for band in galaxy.bands.values():
        band.status = "pending"
    monkeypatch.delitem(multiband.PIVOT_MICRON, "F444W")
    with pytest.raises(ConfigError, match="F444W"):
        engine.run(galaxy, config, jobs=1)
    assert all(b.status == "pending" for b in galaxy.bands.values())
