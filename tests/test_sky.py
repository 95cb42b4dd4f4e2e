"""Sky estimators: robust ``plane``, ``constant`` and ``none``."""

from __future__ import annotations

import numpy as np
import pytest

from sphot_core.errors import ConfigError, FitError
from sphot_core.registry import get_registry

SHAPE = (200, 180)


def _sky(name, options=None):
    return get_registry().create("sky", name, options or {})


def _residual(rng, level=0.3, sx=2e-3, sy=-1.5e-3, sigma=1.0):
    """A tilted plane + noise + positive outliers (star residuals) + a NaN wedge."""
    yy, xx = np.indices(SHAPE)
    truth = level + sx * (xx - (SHAPE[1] - 1) / 2) + sy * (yy - (SHAPE[0] - 1) / 2)
    r = truth + rng.normal(0, sigma, SHAPE)
    hot = rng.integers(0, r.size, 600)
    r.flat[hot] += rng.uniform(5, 200, hot.size)  # star residuals
    ang = np.arctan2(yy - 100, xx - 90)
    r[(ang > 0.3) & (ang < 1.9)] = np.nan
    return r, truth


def test_plane_recovers_level_and_slopes_without_edge_bias(rng):
    r, truth = _residual(rng)
    res = _sky("plane").fit(r)
    p = res.params
    assert res.method == "plane" and res.image.shape == SHAPE and np.all(np.isfinite(res.image))
    n = np.isfinite(r).sum()
    # level and slopes within a few standard errors (noise 1, about 25000 pixels)
    assert p["level"] == pytest.approx(0.3, abs=4 / np.sqrt(n))
    assert p["level_err"] == pytest.approx(1 / np.sqrt(n), rel=0.3)
    span = np.sqrt(n / 12) * SHAPE[1]  # sum over pixels of (x - x_ref)^2 ~ n * L^2 / 12
    assert p["slope_x"] == pytest.approx(2e-3, abs=5 / span)
    assert p["slope_y"] == pytest.approx(-1.5e-3, abs=5 / span)
    # no edge or corner bias: the sky is right everywhere, corners included
    err = np.abs(res.image - truth)
    assert err.max() < 0.05
    for cy, cx in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        assert err[cy, cx] < 0.05
    assert p["n_clipped"] >= 500  # the star residuals were rejected


def test_constant_and_noise_weighting(rng):
    noise = np.where(np.arange(SHAPE[1])[None, :] < 90, 1.0, 10.0) * np.ones((SHAPE[0], 1))
    r = 0.5 + rng.normal(0, 1, SHAPE) * noise
    res = _sky("constant").fit(r, noise=noise)
    assert res.method == "constant" and np.all(res.image == res.params["level"])
    # weighted by 1/noise^2: the error is that of the quiet half alone
    n_quiet = (noise == 1).sum()
    assert res.params["level_err"] == pytest.approx(1 / np.sqrt(n_quiet), rel=0.1)
    assert res.params["level"] == pytest.approx(0.5, abs=4 / np.sqrt(n_quiet))
    mask = np.zeros(SHAPE, bool)
    mask[:, :90] = True
    masked = _sky("constant").fit(r, noise=noise, mask=mask)
    assert masked.params["level_err"] == pytest.approx(10 / np.sqrt(SHAPE[0] * 90), rel=0.1)


def test_none_and_failures(rng):
    res = _sky("none").fit(rng.normal(size=SHAPE))
    assert not res.image.any() and res.level == 0.0
    with pytest.raises(FitError, match="usable pixels"):
        _sky("plane").fit(np.full(SHAPE, np.nan))
    with pytest.raises(ConfigError):
        _sky("plane", {"clip_sigma": -1.0})
    with pytest.raises(ConfigError):
        _sky("constant", {"smoothing": 3})
