"""Sersic profile maths, models and the adaptive pixel quadrature (sphot_core.sersic)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.modeling.models import Sersic2D
from scipy import integrate, special

from sphot_core.errors import InputError
from sphot_core.sersic import (
    MODELS,
    SersicProfile,
    build_quadrature,
    keys_kernel,
    magnitude,
    model_spec,
    render_sersic,
    sersic_bn,
    sersic_enclosed_fraction,
    sersic_flux_gradient,
    sersic_radius_enclosing,
    sersic_total_flux,
    split_params,
)


def flux_in_rectangle(p: SersicProfile, x_lo, x_hi, y_lo, y_hi, n_phi=2048, n_t=1000) -> float:
    """Light of ``p`` inside a rectangle: the enclosed-light distribution over elliptical
    radius (quantiles of Gamma(2n)) times the fraction of each ellipse inside.

    Ellipses of elliptical radius rho are parametrised uniformly in the eccentric
    anomaly, along which the light of an elliptical profile is spread uniformly.
    """
    # light quantiles u: uniform up to 0.9, then uniform in -log10(1 - u) for the tail
    k = (np.arange(n_t) + 0.5) / n_t
    u = np.concatenate([0.9 * k, 1.0 - 10.0 ** -(1.0 + 11.0 * k)])
    du = np.concatenate([np.full(n_t, 0.9 / n_t), np.log(10.0) * 11.0 / n_t * 10.0 ** -(1.0 + 11.0 * k)])
    rho = p.r_eff * (special.gammaincinv(2 * p.n, u) / p.bn) ** p.n
    phi = (np.arange(n_phi) + 0.5) / n_phi * 2 * np.pi
    c, s = math.cos(p.theta), math.sin(p.theta)
    xa, ya = np.cos(phi), p.q * np.sin(phi)
    x = p.x_0 + rho[:, None] * (xa * c - ya * s)[None, :]
    y = p.y_0 + rho[:, None] * (xa * s + ya * c)[None, :]
    inside = ((x >= x_lo) & (x <= x_hi) & (y >= y_lo) & (y <= y_hi)).mean(axis=1)
    return p.total_flux * float(inside @ du)


# ------------------------------------------------------------------------ maths


@pytest.mark.parametrize("n", [0.3, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0])
def test_bn_puts_half_the_light_inside_r_eff(n):
    b = sersic_bn(n)
    assert special.gammainc(2 * n, b) == pytest.approx(0.5, abs=1e-12)
    assert sersic_enclosed_fraction(3.0, 3.0, n) == pytest.approx(0.5, abs=1e-12)
    assert sersic_radius_enclosing(0.5, 3.0, n) == pytest.approx(3.0, rel=1e-10)


@pytest.mark.parametrize("n,ellip", [(0.5, 0.0), (1.0, 0.3), (4.0, 0.6)])
def test_total_flux_matches_numerical_integral(n, ellip):
    p = SersicProfile(0.0, 0.0, 2.5, 3.0, n, ellip, 0.4)
    # integral over the plane: 2 pi q int r I(r) dr along the major axis
    radial, _ = integrate.quad(lambda r: r * p.radial(r), 0, np.inf, limit=400)
    assert p.total_flux == pytest.approx(2 * np.pi * p.q * radial, rel=1e-8)
    assert sersic_total_flux(2.5, 3.0, n, ellip) == pytest.approx(p.total_flux, rel=1e-12)


def test_flux_gradient_matches_finite_differences():
    args = dict(amplitude=1.7, r_eff=4.0, n=2.3, ellip=0.35)
    grad = sersic_flux_gradient(**args)
    for name, value in args.items():
        h = 1e-6 * value
        up = sersic_total_flux(**{**args, name: value + h})
        down = sersic_total_flux(**{**args, name: value - h})
        assert grad[name] == pytest.approx((up - down) / (2 * h), rel=1e-6)


def test_magnitude_and_error():
    mag, err = magnitude(100.0, 5.0, 25.0)
    assert mag == pytest.approx(25.0 - 5.0)
    assert err == pytest.approx(2.5 / np.log(10) * 0.05)
    assert all(np.isnan(magnitude(-1.0, 1.0, 25.0)))
    assert all(np.isnan(magnitude(10.0, 1.0, None)))


def test_profile_matches_astropy_sersic2d():
    """Parameter convention: amplitude at r_eff, r_eff along the major axis, ellip, theta CCW."""
    p = SersicProfile(10.3, 7.8, 3.0, 4.0, 2.7, 0.45, 2.1)
    ref = Sersic2D(amplitude=3.0, r_eff=4.0, n=2.7, x_0=10.3, y_0=7.8, ellip=0.45, theta=2.1)
    y, x = np.mgrid[0:20, 0:25].astype(float)
    np.testing.assert_allclose(p(x, y), ref(x, y), rtol=1e-12)
    np.testing.assert_allclose(p.grid(np.arange(25.0), np.arange(20.0)), ref(x, y), rtol=1e-12)
    # amplitude is the surface brightness at r_eff along the major axis (theta CCW from +x)
    xe, ye = 10.3 + 4.0 * np.cos(2.1), 7.8 + 4.0 * np.sin(2.1)
    assert p(xe, ye) == pytest.approx(3.0, rel=1e-12)
    assert p.elliptical_radius(xe, ye) == pytest.approx(4.0)


def test_invalid_profile_raises_input_error():
    with pytest.raises(InputError, match="r_eff"):
        SersicProfile.from_params({"x_0": 1, "y_0": 1, "amplitude": 1, "r_eff": -1, "n": 2, "ellip": 0.1, "theta": 0})
    with pytest.raises(InputError, match="missing"):
        SersicProfile.from_params({"x_0": 1, "y_0": 1})


def test_minor_scale_and_sharp_radius():
    p = SersicProfile(0, 0, 1, 10.0, 4.0, 0.5, 0.0)
    # the local log-slope scale across the minor axis, checked numerically
    r, h = 3.0, 1e-5
    slope = (np.log(p.radial(r + h)) - np.log(p.radial(r - h))) / (2 * h)
    assert p.minor_scale(r) == pytest.approx(p.q / abs(slope), rel=1e-6)
    rs = p.sharp_radius(1.0)
    assert p.minor_scale(rs) == pytest.approx(1.0, rel=1e-9)
    # an n < 1 profile is sharp at its edge: the whole profile counts
    flat = SersicProfile(0, 0, 1, 1.0, 0.3, 0.0, 0.0)
    assert flat.sharp_radius(1.0) == pytest.approx(sersic_radius_enclosing(1 - 1e-5, 1.0, 0.3))


def test_keys_kernel_is_interpolating_partition_of_unity():
    t = np.linspace(0, 1, 11)
    total = sum(keys_kernel(t - k) for k in range(-2, 4))
    np.testing.assert_allclose(total, 1.0, atol=1e-14)
    assert keys_kernel(0.0) == 1.0 and keys_kernel(1.0) == 0.0 and keys_kernel(2.0) == 0.0
    # zero second moment: assigning a smooth profile by Keys weights does not blur it
    x = np.linspace(-2, 2, 40001)
    assert np.trapezoid(x * x * keys_kernel(x), x) == pytest.approx(0.0, abs=1e-8)


# ------------------------------------------------------------------------ models


def test_models_and_parameter_names():
    assert MODELS["sersic"].param_names == ("x_0", "y_0", "amplitude", "r_eff", "n", "ellip", "theta")
    db = model_spec("disk+bulge")
    assert db.linear == ("amplitude_disk", "amplitude_bulge")
    assert db.fixed_defaults == {"n_disk": 1.0}
    assert model_spec("sersic+point").linear == ("amplitude", "flux_point")
    with pytest.raises(InputError, match="disk\\+bulge"):
        model_spec("spiral")
    assert split_params({"r_eff_disk": 3}).name == "disk+bulge"
    assert split_params({"flux_point": 3}).name == "sersic+point"


def test_model_total_flux_adds_components():
    params = {
        "x_0": 5,
        "y_0": 5,
        "amplitude_disk": 0.5,
        "r_eff_disk": 6,
        "ellip_disk": 0.3,
        "theta_disk": 0.1,
        "amplitude_bulge": 2.0,
        "r_eff_bulge": 1.5,
        "n_bulge": 3.0,
        "ellip_bulge": 0.1,
        "theta_bulge": 0.2,
    }
    expect = sersic_total_flux(0.5, 6, 1.0, 0.3) + sersic_total_flux(2.0, 1.5, 3.0, 0.1)
    assert MODELS["disk+bulge"].total_flux(params) == pytest.approx(expect)


# -------------------------------------------------------------------- rendering


@pytest.mark.parametrize("n", [0.3, 0.5, 1.0, 2.0, 4.0, 6.0, 8.0])
@pytest.mark.parametrize("r_eff", [0.5, 2.0, 10.0, 50.0])
def test_pixel_rendering_conserves_flux(n, r_eff):
    """Pixel integrals sum to the analytic light inside the image within 1e-4."""
    shape = (201, 201)
    p = SersicProfile(100.3, 99.8, 1.0, r_eff, n, 0.4, 0.7)
    img = render_sersic(shape, p)
    ref = flux_in_rectangle(p, -0.5, shape[1] - 0.5, -0.5, shape[0] - 0.5)
    assert img.sum() == pytest.approx(ref, rel=1e-4)


def test_pixel_rendering_matches_supersampled_pixels():
    """Each pixel holds the integral of the profile over it (cusp and wings)."""
    p = SersicProfile(7.3, 6.6, 1.0, 2.0, 3.0, 0.3, 0.5)
    img = render_sersic((15, 15), p)
    k = 64
    sub = (np.arange(k) + 0.5) / k - 0.5
    for j, i in [(7, 7), (6, 7), (9, 4), (2, 12)]:
        ref = p(i + sub[None, :], j + sub[:, None]).mean()
        assert img[j, i] == pytest.approx(ref, rel=3e-3), (j, i)


def test_quadrature_refines_only_the_cusp():
    p = SersicProfile(20.2, 20.4, 1.0, 8.0, 4.0, 0.2, 0.3)
    quad, masses = build_quadrature(p, 0.0, 0.0, 1.0, (41, 41), atol=1e-6 * p.total_flux)
    assert quad.n_leaves > 0
    # the sub-cells cover the cusp zone (where the profile is unresolved, plus its
    # taper), a small part of the image
    reach = p.elliptical_radius(quad.leaf_x, quad.leaf_y)
    assert reach.max() < sum(quad.zone) + 1.0 / p.q
    assert quad.zone[0] == pytest.approx(p.sharp_radius(3.0))
    roots = np.unique(np.round(quad.leaf_x) + 1000 * np.round(quad.leaf_y))
    assert roots.size < 0.3 * 41 * 41
    # reusing the quadrature for a nearby profile changes the masses smoothly
    moved = SersicProfile(20.2 + 1e-6, 20.4, 1.0, 8.0, 4.0, 0.2, 0.3)
    rebuilt = build_quadrature(moved, 0.0, 0.0, 1.0, (41, 41), atol=1e-6 * p.total_flux)[1]
    reused = quad.masses(moved)
    np.testing.assert_allclose(reused, masses, rtol=1e-4, atol=1e-9 * masses.max())
    np.testing.assert_allclose(rebuilt, reused, rtol=0, atol=1e-4 * masses.max())
