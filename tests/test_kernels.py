"""Kernel families: rendering convention, shapes, parameters, registry integration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sphot_core.errors import ConfigError
from sphot_core.psf import PSFModel, gaussian_kernel
from sphot_core.registry import get_registry

OS = 4

CASES = [
    ("gaussian", {}, {"sigma": 0.9}),
    ("gaussian", {"elliptical": True}, {"sigma": 1.2, "ratio": 0.5, "theta": 0.7}),
    ("moffat", {}, {"alpha": 1.1, "beta": 2.5}),
    ("drizzle", {}, {"sigma": 0.4}),
    ("drizzle", {"fit_width": True}, {"width": 1.7, "sigma": 0.3}),
]


def family(name, options=None):
    return get_registry().create("kernel", name, options or {})


def moments(k):
    """Centroid offset from the middle element and the second-moment matrix (elements)."""
    c = k.shape[0] // 2
    yy, xx = np.indices(k.shape) - c
    mx, my = (k * xx).sum(), (k * yy).sum()
    cxx = (k * (xx - mx) ** 2).sum()
    cyy = (k * (yy - my) ** 2).sum()
    cxy = (k * (xx - mx) * (yy - my)).sum()
    return mx, my, np.array([[cxx, cxy], [cxy, cyy]])


@pytest.mark.parametrize("name,options,params", CASES)
def test_render_convention(name, options, params):
    """Stricter than the conformance checks (tests/test_conformance.py): unit sum to
    1e-12, centroid exactly on the middle element, nothing cut off at the edges."""
    fam = family(name, options)
    for p in (params, fam.start()):
        k = fam.render(p, OS)
        assert k.sum() == pytest.approx(1.0, abs=1e-12)
        mx, my, _ = moments(k)
        assert abs(mx) < 1e-9 and abs(my) < 1e-9
        # the kernel fits in its array: the outer ring holds a negligible fraction
        ring = k.copy()
        ring[1:-1, 1:-1] = 0
        assert ring.sum() < 1e-4


@pytest.mark.parametrize("name,options,params", CASES)
def test_parameter_names_and_exact_identity(name, options, params):
    fam = family(name, options)
    assert [p.name for p in fam.parameters()] == list(params)
    ident = fam.identity()
    if ident is not None:
        np.testing.assert_array_equal(fam.render(ident, OS), np.ones((1, 1)))


@pytest.mark.parametrize("sigma", [0.05, 0.9, 2.0])
@pytest.mark.parametrize("oversample", [1, 4])
def test_round_gaussian_is_the_shared_gaussian_kernel(sigma, oversample):
    """The round kernel is :func:`sphot_core.psf.gaussian_kernel` (sigma in elements),
    and the elliptical family with ratio 1 renders the same array."""
    k = family("gaussian").render({"sigma": sigma}, oversample)
    np.testing.assert_array_equal(k, gaussian_kernel(sigma * oversample, k.shape[0] // 2))
    ell = family("gaussian", {"elliptical": True}).render({"sigma": sigma, "ratio": 1.0, "theta": 0.3}, oversample)
    np.testing.assert_array_equal(ell, k)


@pytest.mark.parametrize("sigma", [0.3, 0.9, 2.0])
def test_gaussian_variance(sigma):
    _, _, cov = moments(family("gaussian").render({"sigma": sigma}, OS))
    assert cov[0, 0] == pytest.approx((sigma * OS) ** 2, rel=1e-3)
    assert cov[1, 1] == pytest.approx((sigma * OS) ** 2, rel=1e-3)
    assert abs(cov[0, 1]) < 1e-9


def test_elliptical_gaussian_axes_and_angle():
    """theta is CCW from +x with x = column: the major axis points along (cos, sin)."""
    theta, ratio, sigma = 0.6, 0.5, 1.5
    k = family("gaussian", {"elliptical": True}).render({"sigma": sigma, "ratio": ratio, "theta": theta}, OS)
    _, _, cov = moments(k)
    vals, vecs = np.linalg.eigh(cov)
    major = vecs[:, 1]  # (x, y) components
    angle = math.atan2(major[1], major[0]) % math.pi
    assert angle == pytest.approx(theta, abs=1e-3)
    assert math.sqrt(vals[1]) == pytest.approx(sigma * OS, rel=2e-3)
    assert math.sqrt(vals[0] / vals[1]) == pytest.approx(ratio, rel=2e-3)
    # ratio 1 is the round kernel whatever theta
    round_ = family("gaussian", {"elliptical": True}).render({"sigma": 1.0, "ratio": 1.0, "theta": 1.0}, OS)
    np.testing.assert_allclose(round_, family("gaussian").render({"sigma": 1.0}, OS), atol=1e-15)


def test_moffat_profile_and_truncation():
    alpha, beta = 1.3, 2.2
    fam = family("moffat", {"radius": 6.0})
    k = fam.render({"alpha": alpha, "beta": beta}, OS)
    c = k.shape[0] // 2
    # profile along +x at r = 0 and r = 2 px (8 elements)
    expected = (1 + (2.0 / alpha) ** 2) ** (-beta)
    assert k[c, c + 2 * OS] / k[c, c] == pytest.approx(expected, rel=1e-12)
    yy, xx = np.indices(k.shape) - c
    r = np.hypot(xx, yy) / OS
    assert np.all(k[r > 6.0] == 0) and np.all(k[r <= 6.0] > 0)
    assert k.shape[0] == 2 * 6 * OS + 1


def test_drizzle_box_is_exact_cell_overlap():
    k = family("drizzle").render({"sigma": 0.0}, OS)  # 1-pixel box only
    row = k[k.shape[0] // 2]
    expected = np.array([0.5, 1, 1, 1, 0.5]) / 4.0
    np.testing.assert_allclose(row / row.sum(), expected, atol=1e-15)


@pytest.mark.parametrize("width,sigma", [(1.0, 0.5), (2.0, 0.8)])
def test_drizzle_variance_adds(width, sigma):
    """Discrete convolution: the box's and the Gaussian's variances add exactly."""
    fam = family("drizzle", {"fit_width": True})
    _, _, cov = moments(fam.render({"width": width, "sigma": sigma}, OS))
    w = int(width * OS)  # even number of elements: cells |i| < w/2 full, |i| = w/2 half
    i = np.arange(-(w // 2) + 1, w // 2)
    box_var = ((i**2).sum() + (w / 2) ** 2) / w
    assert cov[0, 0] == pytest.approx(box_var + (sigma * OS) ** 2, rel=2e-5)
    assert cov[1, 1] == pytest.approx(cov[0, 0], rel=1e-12)


def test_invalid_parameters_raise():
    with pytest.raises(ConfigError, match="sigma"):
        family("gaussian").render({"sigma": -1.0}, OS)
    with pytest.raises(ConfigError, match="missing"):
        family("moffat").render({"alpha": 1.0}, OS)
    with pytest.raises(ConfigError, match="beta"):
        family("moffat").render({"alpha": 1.0, "beta": 0.5}, OS)
    with pytest.raises(ConfigError, match="not finite"):
        family("drizzle").render({"sigma": float("nan")}, OS)


def test_registry_options():
    assert len(family("gaussian", {"elliptical": True}).parameters()) == 3
    assert family("gaussian", {"max_sigma": 2.0}).parameters()[0].upper == 2.0
    with pytest.raises(ConfigError, match="unknown option"):
        family("gaussian", {"elliptic": True})
    names = get_registry().names("kernel")
    assert {"gaussian", "moffat", "drizzle"} <= set(names)


def test_blur_adds_in_quadrature_through_psfmodel():
    """library (*) K for a Gaussian library and kernel is a Gaussian of the summed variance."""
    s0, s = 1.1, 0.9
    r = np.arange(-60, 61) / OS
    g = np.exp(-0.5 * (r / s0) ** 2)
    lib = PSFModel.from_array(np.outer(g, g), OS)
    psf = lib.convolved(family("gaussian").render({"sigma": s}, OS))
    vals, _, _ = psf.stamps([0.0], [0.0], 15)
    yy, xx = np.mgrid[-15:16, -15:16]
    var = (vals[0] * xx**2).sum() / vals[0].sum()
    assert var == pytest.approx(s0**2 + s**2, rel=2e-3)
    assert psf.origin == (psf.array.shape[0] // 2, psf.array.shape[1] // 2)
