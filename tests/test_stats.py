"""Noise statistics: the error factor for spatially correlated residuals."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sphot_core.stats import correlated_error_factor


def _galaxy(shape=(96, 96)):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    return 50.0 * np.exp(-np.hypot(xx - 47.3, yy - 48.1) / 6.0)


def _correlated_noise(rng, shape, kernel_sigma):
    """Unit-variance Gaussian noise smoothed by a Gaussian kernel (like a resampled
    mosaic's), rescaled to unit variance again."""
    w = ndimage.gaussian_filter(rng.normal(size=shape), kernel_sigma, mode="wrap")
    return w / w.std() if kernel_sigma > 0 else w


@pytest.mark.parametrize("kernel_sigma", [0.0, 0.8, 1.5])
def test_amplitude_scatter_matches_the_corrected_error(kernel_sigma):
    """Fit the amplitude of a known model to many noise realisations by weighted least
    squares with independent-pixel weights: the scatter of the amplitudes is the
    independent-pixel error times the factor (within the sampling error of 60
    realisations); with white noise the factor is 1."""
    rng = np.random.default_rng(11)
    model = _galaxy()
    shape = model.shape
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    sky_region = np.hypot(xx - 47.3, yy - 48.1) > 30
    noise = np.ones(shape)
    naive = 1.0 / np.sqrt(np.sum(model**2))
    amps, factors = [], []
    for _ in range(60):
        z = _correlated_noise(rng, shape, kernel_sigma)
        data = model + z
        amp = np.sum(model * data) / np.sum(model**2)
        amps.append(amp)
        factors.append(correlated_error_factor(data - amp * model, noise, sky_region, model))
    scatter = np.std(amps, ddof=1)
    factor = float(np.median(factors))
    if kernel_sigma == 0:
        assert factor == pytest.approx(1.0, abs=0.08)
    else:
        # Gaussian-smoothed noise: sum of xi over lags = 4 pi kernel_sigma^2
        assert factor == pytest.approx(np.sqrt(4 * np.pi) * kernel_sigma, rel=0.15)
        assert scatter / naive > 1.5  # the independent-pixel error is too small
    assert scatter / (naive * factor) == pytest.approx(1.0, abs=0.25)


def test_factor_is_one_without_enough_pixels_and_never_below_one():
    rng = np.random.default_rng(3)
    model = _galaxy()
    tiny = np.zeros(model.shape, dtype=bool)
    tiny[:5, :5] = True
    assert correlated_error_factor(rng.normal(size=model.shape), 1.0, tiny, model) == 1.0
    # anti-correlated residual (a checkerboard): the factor stays 1
    yy, xx = np.mgrid[0:96, 0:96]
    checker = np.where((xx + yy) % 2 == 0, 1.0, -1.0)
    assert correlated_error_factor(checker, 1.0, np.ones(model.shape, dtype=bool), model) == 1.0
    # NaN pixels are ignored, not propagated
    r = _correlated_noise(rng, model.shape, 1.0)
    r[10:20, :] = np.nan
    f = correlated_error_factor(r, np.ones(model.shape), np.ones(model.shape, dtype=bool), model)
    assert np.isfinite(f) and f > 2.0
