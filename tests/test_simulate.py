"""The simulated fields: the S/N definition per band, the noise, the truth record."""

import numpy as np
import pytest

from sphot_core.sersic import sersic_enclosed_fraction
from sphot_core.simulate import DEFAULT_COLOURS, render_sersic_reference, simulate_field

FILTERS = ("F555W", "F150W", "F277W")


def _snr_and_noise(field, band):
    """Measured S/N of the galaxy in ``band`` (flux within the 2 r_eff ellipse of the
    noiseless galaxy over sigma sqrt(area)) and the measured noise sigma."""
    t = field["truth"]
    tb = t["bands"][band]
    g = t["galaxy"]
    shape = tuple(t["shape"])
    galaxy = render_sersic_reference(shape, field["psfs"][band], {**g, "amplitude": tb["amplitude"], "x_0": tb["x_0"], "y_0": tb["y_0"]})
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    c = (shape[0] - 1) / 2.0
    sky = tb["sky"]["c0"] + tb["sky"]["cx"] * (xx - c) + tb["sky"]["cy"] * (yy - c)
    noise = field["images"][band] - galaxy - sky
    sigma = np.nanstd(noise)
    inside = sersic_enclosed_fraction(2 * g["r_eff"], g["r_eff"], g["n"])
    area = np.pi * (2 * g["r_eff"]) ** 2 * (1 - g["ellip"])
    return tb["flux"] * inside / (sigma * np.sqrt(area)), sigma


@pytest.mark.parametrize("every_band", [False, True])
def test_snr_per_band(every_band):
    """``snr`` holds in the base band; elsewhere it scales as 10**(-0.2 colour), or
    stays ``snr`` with ``snr_every_band``; the truth records it."""
    field = simulate_field(FILTERS, n_stars=0, size=101, seed=4, snr=120.0, snr_every_band=every_band, nan_edges=False)
    for band in FILTERS:
        expected = 120.0 * (1.0 if every_band else 10 ** (-0.2 * DEFAULT_COLOURS[band]))
        measured, sigma = _snr_and_noise(field, band)
        tb = field["truth"]["bands"][band]
        assert tb["snr"] == pytest.approx(expected)
        assert sigma == pytest.approx(tb["noise_sigma"], rel=0.03)
        assert measured == pytest.approx(expected, rel=0.03)
    # the default makes the red galaxy shallow in the blue band: S/N well below the base band's
    if not every_band:
        assert field["truth"]["bands"]["F555W"]["snr"] < 0.5 * 120.0


def test_star_fluxes_follow_the_band_noise():
    """Star fluxes are in units of each band's noise: at equal star colour the same
    stars are as significant in every band, whatever the galaxy's S/N there."""
    a = simulate_field(FILTERS, n_stars=50, size=61, seed=2, snr=100.0)
    b = simulate_field(FILTERS, n_stars=50, size=61, seed=2, snr=100.0, snr_every_band=True)
    for band in FILTERS:
        ta, tb = a["truth"]["bands"][band], b["truth"]["bands"][band]
        np.testing.assert_allclose(np.array(ta["star_flux"]) / ta["noise_sigma"], np.array(tb["star_flux"]) / tb["noise_sigma"], rtol=1e-12)


def test_star_free_radius_keeps_only_the_bright_stars_out():
    """``star_free_radius`` keeps every star off the galaxy centre; with
    ``star_free_min_flux`` only the bright ones, the faint ones stay evenly spread, and
    the rest of the field is the one drawn without it."""
    kw = dict(filters=("F150W",), n_stars=3000, size=101, seed=5, snr=100.0, star_free_radius=15.0)
    holes = simulate_field(**kw)["truth"]
    faint_in = simulate_field(**kw, star_free_min_flux=20.0)["truth"]
    g = holes["galaxy"]
    for truth in (holes, faint_in):
        sigma = truth["bands"]["F150W"]["noise_sigma"]
        rel = np.array(truth["bands"]["F150W"]["star_flux"]) / sigma
        r = np.hypot(np.array(truth["stars"]["x"]) - g["x_0"], np.array(truth["stars"]["y"]) - g["y_0"])
        assert not np.any((r < 15.0) & (rel >= 20.0))
        inside = np.sum((r < 15.0) & (rel < 20.0))
        expected = np.sum(rel < 20.0) * np.pi * 15.0**2 / 101**2
        if truth is holes:
            assert inside == 0
        else:
            assert abs(inside - expected) < 4 * np.sqrt(expected), (inside, expected)
    # the same fluxes, colours, noise and sky: only the stars' positions differ
    assert faint_in["bands"]["F150W"]["star_flux"] == holes["bands"]["F150W"]["star_flux"]
    assert faint_in["bands"]["F150W"]["sky"] == holes["bands"]["F150W"]["sky"]
