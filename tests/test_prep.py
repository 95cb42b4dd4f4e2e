"""Preparation: size guess and the auto-crop (factor x size, with a minimum side)."""

import numpy as np
import pytest

from sphot_core.config import load_config
from sphot_core.data import Band, Galaxy
from sphot_core.errors import ConfigError
from sphot_core.prep import auto_crop, guess_galaxy, prepare
from sphot_core.testing import _gaussian_psf

SHAPE = (201, 231)  # rows, columns
CENTRE = (140.0, 95.0)  # x, y
SIGMA = 4.0


def _galaxy(seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    blob = 50.0 * np.exp(-0.5 * ((xx - CENTRE[0]) ** 2 + (yy - CENTRE[1]) ** 2) / SIGMA**2)
    data = blob + rng.normal(0, 0.05, SHAPE)  # the noise makes the crop's position checkable
    band = Band("F150W", data, psf=_gaussian_psf())
    return Galaxy("g", {"F150W": band}, base_filter="F150W", input_shape=SHAPE)


def test_size_guess_of_a_gaussian_blob():
    band = _galaxy().bands["F150W"]
    guess = guess_galaxy(band.data, band.mask, psf_fwhm=band.psf.fwhm)
    assert (guess.x, guess.y) == pytest.approx(CENTRE, abs=0.1)
    assert guess.size == pytest.approx(SIGMA, rel=0.25)


@pytest.mark.parametrize("min_size, side", [(31, 2 * int(np.ceil(8 * 4.0)) + 1), (101, 101), (161, 161)])
def test_auto_crop_side_is_factor_times_size_but_at_least_the_minimum(min_size, side):
    galaxy = _galaxy()
    band = galaxy.bands["F150W"]
    guess = guess_galaxy(band.data, band.mask, psf_fwhm=band.psf.fwhm)
    guess = type(guess)(CENTRE[0], CENTRE[1], 4.0, guess.ellip, guess.theta, guess.background, guess.flux)
    out, moved = auto_crop(galaxy, guess, 8.0, min_size)
    ny, nx = out.shape
    x0, y0 = out.crop_offset
    # centred on the guess, clipped to the image
    assert x0 == max(0, 140 - side // 2) and nx == min(SHAPE[1], 140 + side // 2 + 1) - x0
    assert y0 == max(0, 95 - side // 2) and ny == min(SHAPE[0], 95 + side // 2 + 1) - y0
    if min_size == 101:
        assert (nx, ny) == (101, 101)  # fits inside the image
    if min_size == 161:
        assert x0 == 60 and nx == 161 and (y0, ny) == (15, 161)
    # the crop is the matching part of the input, and the guess moves with it
    np.testing.assert_array_equal(out.bands["F150W"].data, band.data[y0 : y0 + ny, x0 : x0 + nx])
    assert (moved.x + x0, moved.y + y0) == pytest.approx(CENTRE)


def test_prepare_uses_the_configured_minimum_and_records_the_crop():
    small = load_config(use_user_config=False).with_overrides({"prep.auto_crop_min_size": 31})
    large = load_config(use_user_config=False).with_overrides({"prep.auto_crop_min_size": 181})
    g1, guess1 = prepare(_galaxy(), small)
    g2, guess2 = prepare(_galaxy(), large)
    assert g1.shape[0] < 101 and g1.shape[1] < 101  # factor 8 x a ~4 px size
    assert g2.shape == (181, 181)
    for g, guess in ((g1, guess1), (g2, guess2)):
        assert g.meta["crop_shape"] == list(g.shape)
        assert g.meta["crop_offset"] == list(g.crop_offset)
        assert g.meta["centre_guess"] == pytest.approx([guess.x + g.crop_offset[0], guess.y + g.crop_offset[1]])
        assert g.meta["centre_guess"] == pytest.approx(CENTRE, abs=0.1)


def test_minimum_crop_below_the_floor_is_refused():
    with pytest.raises(ConfigError, match=r"\[prep\]: auto_crop_min_size must be >= 31, got 11"):
        load_config(use_user_config=False).with_overrides({"prep.auto_crop_min_size": 11})
