"""The PSF convention: origin, normalisation, sampling on the image grid, stamps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, special

from sphot_core.errors import InputError
from sphot_core.psf import PSFModel, add_stamps, gaussian_kernel

REAL = ("F090W", "F150W", "F160W", "F277W", "F555W", "F814W")


def gaussian(n, sigma, cx=0.0, cy=0.0):
    y, x = np.mgrid[:n, :n] - n // 2
    return np.exp(-0.5 * ((x - cx) ** 2 + (y - cy) ** 2) / sigma**2)


def asymmetric(n=81):
    """Core at the middle element plus a faint lobe: centroid != origin."""
    return gaussian(n, 5.0) + 0.4 * gaussian(n, 7.0, cx=9.0, cy=-5.0)


def test_origin_is_the_middle_element_not_the_centroid():
    psf = PSFModel.from_array(asymmetric(), 4)
    assert psf.origin == (40, 40)
    dx, dy = psf.centroid_offset
    assert dx > 0.5 and dy < -0.3  # the lobe pulls the centroid, not the origin
    # a source at an integer pixel reproduces the in-phase samples exactly
    k = psf.grid_kernel
    h = k.shape[0] // 2
    img = psf.render((41, 41), [20.0], [20.0], [1.0], half=h)
    assert np.allclose(img[20 - h : 21 + h, 20 - h : 21 + h], k, atol=1e-14)
    # and its light centroid is (x, y) + centroid offset
    yy, xx = np.indices(img.shape)
    assert (xx * img).sum() / img.sum() == pytest.approx(20.0 + dx, abs=0.02)
    assert (yy * img).sum() / img.sum() == pytest.approx(20.0 + dy, abs=0.02)


@pytest.mark.parametrize("shape_origin", [((81, 81), (40, 40)), ((79, 79), (39, 39))])
def test_grid_kernel_is_sampled_in_phase_with_the_origin(shape_origin):
    (n, _), origin = shape_origin
    a = asymmetric(n)
    psf = PSFModel.from_array(a, 4)
    k = psf.grid_kernel
    sub = a[origin[0] % 4 :: 4, origin[1] % 4 :: 4]
    assert np.isclose(k.max() / k.sum(), sub.max() / sub.sum())
    h = k.shape[0] // 2
    assert k[h, h] == pytest.approx(a[origin] / sub.sum())
    assert k.sum() == pytest.approx(1.0)
    assert k.shape[0] % 2 == 1


def test_normalisation_ignores_the_input_scale():
    a = gaussian(41, 6.0)
    p1 = PSFModel.from_array(a, 4)
    p2 = PSFModel.from_array(a * 16.7, 4)
    assert np.allclose(p1.array, p2.array)


def test_even_size_needs_an_origin():
    a = gaussian(40, 5.0)
    with pytest.raises(InputError, match="even shape"):
        PSFModel.from_array(a, 4)
    psf = PSFModel.from_array(a, 4, origin=(20, 20))
    assert psf.origin == (20, 20)
    k = psf.grid_kernel
    assert k.shape[0] % 2 == 1 and k.sum() == pytest.approx(1.0)
    with pytest.raises(InputError, match="outside"):
        PSFModel.from_array(a, 4, origin=(50, 3))


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.ones(9), "2-D"),
        (np.full((9, 9), np.nan), "NaN"),
        (np.zeros((9, 9)), "non-positive"),
        (-np.ones((9, 9)), "non-positive"),
    ],
)
def test_bad_psf_arrays(bad, match):
    with pytest.raises(InputError, match=match):
        PSFModel.from_array(bad, 1, filter="F150W", source="x.npy")


def test_bad_oversampling():
    with pytest.raises(InputError, match="oversampling"):
        PSFModel.from_array(gaussian(9, 1.0), 2.5)
    with pytest.raises(InputError, match="oversampling"):
        PSFModel.from_array(gaussian(9, 1.0), 0)


def test_optical_psf_is_integrated_over_the_pixel():
    """Optical PSF elements hold the light of their sub-pixel cell (as in WebbPSF-style
    oversampled files); the effective PSF integrates one image pixel of them."""
    sigma_el = 2.0  # 0.5 image pixel
    edges = (np.arange(62) - 30.5) / np.sqrt(2) / sigma_el
    cell = np.diff(special.erf(edges)) / 2
    psf = PSFModel.from_array(np.outer(cell, cell), 4, kind="optical")
    s = sigma_el / 4

    def box(u):  # 1-D Gaussian integrated over one pixel centred at offset u
        return 0.5 * (special.erf((u + 0.5) / (np.sqrt(2) * s)) - special.erf((u - 0.5) / (np.sqrt(2) * s)))

    k = psf.grid_kernel
    h = k.shape[0] // 2
    for du in (0, 1):
        expected = box(0.0) * box(float(du))
        assert k[h, h + du] == pytest.approx(expected, rel=5e-3)
    eff = PSFModel.from_array(gaussian(61, sigma_el), 4)
    assert eff.grid_kernel.max() > k.max()  # the pixel response broadens it


def test_fwhm_and_sigma_of_a_gaussian():
    psf = PSFModel.from_array(gaussian(201, 8.0), 4)
    assert psf.fwhm == pytest.approx(2.3548 * 2.0, rel=0.01)
    assert psf.sigma == pytest.approx(2.0, rel=0.01)


def test_convolution_adds_widths_and_keeps_the_origin():
    psf = PSFModel.from_array(gaussian(161, 6.0), 4)
    blurred = psf.convolved(gaussian_kernel(8.0))
    assert blurred.fwhm == pytest.approx(2.3548 * np.hypot(6, 8) / 4, rel=0.01)
    img = blurred.render((31, 31), [15.3], [14.6], [1.0], half=15)
    yy, xx = np.indices(img.shape)
    assert (xx * img).sum() / img.sum() == pytest.approx(15.3, abs=0.01)
    assert (yy * img).sum() / img.sum() == pytest.approx(14.6, abs=0.01)
    assert psf.blurred(0) is psf
    with pytest.raises(ValueError, match="odd"):
        psf.convolved(np.ones((4, 4)))


def test_stamps_sum_to_one_at_every_phase(load_psf):
    for flt in ("F090W", "F555W"):
        psf = load_psf(flt)
        xs = np.array([10.0, 10.125, 10.25, 10.375, 10.5, 10.6])
        vals, ix, iy = psf.stamps(xs, xs[::-1] + 3, psf.half_extent + 1)
        assert np.allclose(vals.sum(axis=(1, 2)), 1.0, atol=1e-6), flt


@pytest.mark.parametrize("flt", REAL)
def test_point_source_lands_with_the_origin_at_xy(load_psf, flt):
    """An independent implementation (photutils ImagePSF, origin at the array centre)
    fitted to our rendering must put the source where we placed it, to 0.01 px."""
    from photutils.psf import ImagePSF

    psf = load_psf(flt)
    half = 12
    ref = ImagePSF(data=psf.array, flux=1.0, x_0=0.0, y_0=0.0, oversampling=psf.oversample)
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(float)
    for x, y in [(0.0, 0.0), (0.3, -0.2), (-0.45, 0.37)]:
        vals, ix, iy = psf.stamps([x], [y], half)
        stamp = vals[0]
        gx, gy = xx + ix[0], yy + iy[0]

        def resid(p):
            return (ref.evaluate(gx, gy, p[0], p[1], p[2]) - stamp).ravel()

        fit = optimize.least_squares(resid, [stamp.sum(), x + 0.05, y - 0.05], x_scale=[1, 0.1, 0.1])
        assert abs(fit.x[1] - x) < 0.01 and abs(fit.x[2] - y) < 0.01, (flt, x, y, fit.x)


def test_stamps_are_the_cubic_spline_of_the_oversampled_psf():
    """Every stamp pixel is the cubic B-spline interpolant of the oversampled array at
    that pixel's offset from the source (checked against scipy's map_coordinates), for
    a lopsided PSF so that a transposed or shifted index would show."""
    from scipy import ndimage

    yy, xx = np.mgrid[:45, :45].astype(float)
    arr = np.exp(-0.5 * (((xx - 22) / 3.0) ** 2 + ((yy - 22) / 6.0) ** 2)) * (1 + 0.3 * (xx > 24))
    psf = PSFModel.from_array(arr, 4)
    half = psf.half_extent + 2
    pad = np.pad(arr, 4 * half + 8)
    o = np.array(psf.origin) + 4 * half + 8
    x = np.array([7.0, 12.3, 5.49, 20.77])
    y = np.array([9.0, 4.6, 15.12, 11.51])
    vals, ix, iy = psf.stamps(x, y, half)
    dy, dx = np.meshgrid(np.arange(-half, half + 1), np.arange(-half, half + 1), indexing="ij")
    for s in range(x.size):
        ry = o[0] + (iy[s] + dy - y[s]) * 4
        rx = o[1] + (ix[s] + dx - x[s]) * 4
        ref = ndimage.map_coordinates(pad, [ry, rx], order=3, mode="constant")
        # equal up to the normalisation (stamps: unit sum of the untruncated PSF)
        assert np.allclose(vals[s] / vals[s].sum(), ref / ref.sum(), rtol=0, atol=1e-12), s


def test_add_stamps_clips_at_the_edges():
    psf = PSFModel.from_array(gaussian(41, 4.0), 4)
    img = np.zeros((20, 20))
    vals, ix, iy = psf.stamps([0.2, 19.4, 60.0], [0.0, 10.0, 60.0], 5)
    add_stamps(img, vals, ix, iy)
    full = psf.render((40, 40), [10.2], [10.0], [1.0], half=5)
    assert img.sum() == pytest.approx(full[10:, 10:].sum() + vals[1][:, :6].sum(), rel=1e-9)


def test_psf_pickles_without_caches():
    import pickle

    psf = PSFModel.from_array(gaussian(41, 4.0), 4)
    psf.stamps([1.0], [1.0], 5)
    psf.fwhm
    back = pickle.loads(pickle.dumps(psf))
    assert "_cache" not in back.__dict__
    assert np.array_equal(back.array, psf.array) and back.fwhm == psf.fwhm
