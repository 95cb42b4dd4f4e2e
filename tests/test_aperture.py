"""Aperture (Petrosian) photometry: geometry, Petrosian radius, sky, NaN filling, PSF correction."""

from __future__ import annotations

import math

import attrs
import numpy as np
import pytest
from scipy.signal import fftconvolve

from sphot_core.aperture import (
    APERTURE_COLUMNS,
    APERTURE_FLAGS,
    ApertureGeometry,
    ApertureOptions,
    BandPhotometry,
    isophotal_ellipses,
    measure_band,
    petrosian_aperture,
    psf_correction,
    run_aperture_photometry,
    science_aperture,
    zeropoint_mjy_per_sr,
)
from sphot_core.data import Band, Galaxy
from sphot_core.errors import ConfigError, DegenerateCutoutError
from sphot_core.psf import PSFModel, gaussian_kernel
from sphot_core.testing import pixel_averaged_sersic, sersic_petrosian_radius
from sphot_core.registry import build_options

FRACTIONS = np.linspace(0.05, 0.95, 100)


# ------------------------------------------------------------------------- helpers


def gaussian_psf(sigma, name):
    return PSFModel.from_array(gaussian_kernel(sigma, half=int(6 * sigma) + 2), 1, filter=name)


def make_band(name, intrinsic, psf, rng, *, noise=0.05, sky=3.0, n_stars=25, star_errors=0.0):
    """A band with the true components as its fitted components, plus noise."""
    shape = intrinsic.shape
    galaxy = fftconvolve(intrinsic, psf.grid_kernel, mode="same")
    x, y = rng.uniform(0, shape[1] - 1, n_stars), rng.uniform(0, shape[0] - 1, n_stars)
    flux = rng.uniform(20, 300, n_stars)
    stars = psf.render(shape, x, y, flux)
    fitted_stars = psf.render(shape, x, y, flux * (1 + star_errors * rng.standard_normal(n_stars)))
    data = galaxy + stars + sky + rng.normal(0.0, noise, shape) if noise > 0 else galaxy + stars + sky
    return Band(
        name, data, psf, noise=np.full(shape, max(noise, 1e-6)), galaxy_model=galaxy,
        star_model=fitted_stars, sky_model=np.full(shape, sky), zeropoint=25.0,
    )


@pytest.fixture(scope="module")
def field():
    """Three bands of one galaxy (colours known), Gaussian PSFs of 1.2, 2.5, 4 px."""
    rng = np.random.default_rng(7)
    shape = (151, 151)
    intrinsic = pixel_averaged_sersic(shape, 75.3, 74.6, 9.0, 1.5, ellip=0.3, theta=0.7, amplitude=2.0)
    scales = {"A": 1.0, "B": 0.7, "C": 1.3}
    sigmas = {"A": 1.2, "B": 2.5, "C": 4.0}
    bands = {f: make_band(f, intrinsic * scales[f], gaussian_psf(sigmas[f], f), rng) for f in scales}
    return dict(intrinsic=intrinsic, scales=scales, bands=bands)


def galaxy_of(bands, **kw):
    return Galaxy("sim", dict(bands), base_filter=kw.pop("base_filter", "A"), **kw)


# ------------------------------------------------------------------------- geometry


def test_zeropoint_for_mjy_per_sr_at_003_arcsec():
    assert zeropoint_mjy_per_sr(0.03) == pytest.approx(-6.10 - 2.5 * np.log10(2.1154e-14), abs=2e-3)
    # four times the pixel area: 2.5 log10(4) brighter zeropoint offset
    assert zeropoint_mjy_per_sr(0.06) == pytest.approx(zeropoint_mjy_per_sr(0.03) - 2.5 * np.log10(4.0), abs=1e-9)


def test_moment_ellipse_of_a_filled_ellipse():
    truth = ApertureGeometry(60.2, 58.7, 30.0, 12.0, 1.0)
    image = (truth.elliptical_radius((121, 121)) <= truth.a).astype(float)
    (iso,) = isophotal_ellipses(image, [1.0])
    g = iso.geometry
    assert (g.x, g.y) == pytest.approx((truth.x, truth.y), abs=0.05)
    assert g.a == pytest.approx(truth.a, rel=0.01)
    assert g.b == pytest.approx(truth.b, rel=0.01)
    assert g.theta == pytest.approx(truth.theta, abs=0.005)
    assert g.area == pytest.approx(iso.npix)


@pytest.mark.parametrize("theta", [0.6, 2.4])
def test_isophotes_recover_sersic_axis_ratio_and_angle(theta):
    image = pixel_averaged_sersic((151, 151), 74.6, 76.2, 14.0, 1.0, ellip=0.4, theta=theta)
    isophotes = isophotal_ellipses(image, FRACTIONS)
    big = [iso.geometry for iso in isophotes if iso.npix > 200]
    assert len(big) > 50
    assert np.allclose([g.axis_ratio for g in big], 0.6, atol=0.02)
    assert np.allclose([g.theta for g in big], theta, atol=0.02)
    # pixel-set centroids scatter by the discreteness of the region's edge
    assert np.allclose([g.x for g in big], 74.6, atol=0.2)
    assert np.allclose([g.y for g in big], 76.2, atol=0.2)
    assert np.mean([g.x for g in big]) == pytest.approx(74.6, abs=0.03)


def test_disconnected_levels_keep_the_galaxy_part():
    """A bright blob elsewhere splits low levels in two regions: the central one is kept."""
    image = pixel_averaged_sersic((151, 151), 60.0, 70.0, 8.0, 1.0)
    yy, xx = np.indices(image.shape)
    image += 3.0 * np.exp(-((xx - 125.0) ** 2 + (yy - 30.0) ** 2) / (2 * 2.0**2))
    isophotes = isophotal_ellipses(image, FRACTIONS, centre=(60.0, 70.0))
    assert len(isophotes) > 60  # no level dropped for having two contours
    assert np.allclose([iso.geometry.x for iso in isophotes], 60.0, atol=0.3)
    assert np.allclose([iso.geometry.y for iso in isophotes], 70.0, atol=0.3)


# ------------------------------------------------------------------------- Petrosian


@pytest.mark.parametrize("n, r_eff", [(1.0, 12.0), (2.0, 25.0), (0.5, 15.0)])
def test_petrosian_radius_of_circular_sersic_matches_analytic(n, r_eff):
    image = pixel_averaged_sersic((201, 201), 100.3, 99.6, r_eff, n)
    result = petrosian_aperture(image, isophotal_ellipses(image, FRACTIONS), 0.5)
    ap = result.aperture
    assert result.bracketed and result.flags == 0
    assert math.sqrt(ap.a * ap.b) == pytest.approx(sersic_petrosian_radius(r_eff, n), rel=0.01)
    assert (ap.x, ap.y) == pytest.approx((100.3, 99.6), abs=0.1)


def test_petrosian_semi_major_axis_of_elliptical_sersic():
    image = pixel_averaged_sersic((201, 201), 100.0, 100.0, 12.0, 1.0, ellip=0.4, theta=0.6)
    result = petrosian_aperture(image, isophotal_ellipses(image, FRACTIONS), 0.5)
    ap = result.aperture
    assert ap.a == pytest.approx(sersic_petrosian_radius(12.0, 1.0), rel=0.015)
    assert ap.axis_ratio == pytest.approx(0.6, abs=0.01)
    assert ap.theta == pytest.approx(0.6, abs=0.01)
    # the smoothed ratio follows the finite differences of the ladder
    inner = np.isfinite(result.eta_raw)
    assert np.allclose(result.eta[inner], result.eta_raw[inner], atol=0.01)


def test_petrosian_level_out_of_range_is_flagged():
    image = pixel_averaged_sersic((121, 121), 60.0, 60.0, 10.0, 1.0)
    isophotes = isophotal_ellipses(image, FRACTIONS)
    result = petrosian_aperture(image, isophotes, 0.99)
    assert not result.bracketed
    assert result.flags == APERTURE_FLAGS.PETRO_NOT_BRACKETED
    assert result.aperture.area == pytest.approx(isophotes[0].geometry.area, rel=1e-6)


def test_too_few_isophotes_raise_degenerate_cutout():
    image = np.zeros((41, 41))
    image[20, 20] = 1.0
    with pytest.raises(DegenerateCutoutError, match="isophotal apertures"):
        petrosian_aperture(image, isophotal_ellipses(image, FRACTIONS), 0.5, where="g1 F150W")
    with pytest.raises(DegenerateCutoutError, match="g1 F150W"):
        petrosian_aperture(np.zeros((41, 41)), [], 0.5, where="g1 F150W")


# ------------------------------------------------------------------------- per band


def _true_aperture_flux(field, name, aperture):
    band = field["bands"][name]
    return float(np.sum(aperture.weights(band.shape) * band.galaxy_model))


def test_rows_columns_and_input_grid(field):
    galaxy = galaxy_of(field["bands"], crop_offset=(10, 20))
    rows = run_aperture_photometry(galaxy)
    assert [r["filter"] for r in rows] == ["A", "B", "C"]
    assert all(tuple(r) == APERTURE_COLUMNS for r in rows)
    cutout = science_aperture(galaxy).aperture
    assert rows[0]["aper_x"] == pytest.approx(cutout.x + 10)
    assert rows[0]["aper_y"] == pytest.approx(cutout.y + 20)
    for r in rows:
        truth = _true_aperture_flux(field, r["filter"], cutout)
        assert abs(r["flux"] - truth) < 3 * r["flux_err"]
        assert r["mag_raw"] == pytest.approx(-2.5 * np.log10(r["flux"]) + 25.0)
        assert r["flags"] == 0


def test_corrected_colours_recover_the_truth(field):
    rows = {r["filter"]: r for r in run_aperture_photometry(galaxy_of(field["bands"]))}
    scales = field["scales"]
    assert rows["A"]["dmag_psf"] == 0.0  # the sharpest band is the default base
    assert 0 < rows["B"]["dmag_psf"] < rows["C"]["dmag_psf"]  # broader PSF, larger correction
    for f in ("B", "C"):
        colour = rows[f]["mag_corr"] - rows["A"]["mag_corr"]
        assert colour == pytest.approx(-2.5 * np.log10(scales[f] / scales["A"]), abs=0.005)
        raw_colour = rows[f]["mag_raw"] - rows["A"]["mag_raw"]
        assert abs(raw_colour + 2.5 * np.log10(scales[f])) > 0.05  # uncorrected colours are off


def test_same_seed_reproduces_and_other_seed_differs(field):
    galaxy = galaxy_of(field["bands"])
    first = run_aperture_photometry(galaxy, rng_seed=3)
    again = run_aperture_photometry(galaxy, rng_seed=3)
    other = run_aperture_photometry(galaxy, ApertureOptions(seed=4))
    assert first == again
    assert [r["sky"] for r in first] != [r["sky"] for r in other]
    for a, b in zip(first, other):
        assert a["sky"] == pytest.approx(b["sky"], abs=2 * a["sky_err"])
    # a band's sky apertures depend on the seed and filter only, not on the other bands
    alone = run_aperture_photometry(galaxy_of({"A": field["bands"]["A"]}), rng_seed=3)
    assert alone[0]["sky"] == first[0]["sky"]


def test_nan_pixels_are_filled_from_the_model(field):
    band = field["bands"]["A"]
    aperture = science_aperture(galaxy_of(field["bands"])).aperture
    holed = attrs.evolve(band, data=band.data.copy())
    iy, ix = int(round(aperture.y)), int(round(aperture.x))
    holed.data[iy - 3 : iy + 4, ix - 6 : ix + 2] = np.nan
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    full = measure_band(band, aperture, ApertureOptions(), rng())
    filled = measure_band(holed, aperture, ApertureOptions(), rng())
    hole = ~np.isfinite(holed.data)
    hole_flux = float(np.sum(aperture.weights(band.shape)[hole] * band.galaxy_model[hole]))
    noise_in_hole = 0.05 * math.sqrt(hole.sum())
    assert filled.flags & APERTURE_FLAGS.NAN_FILLED and not full.flags & APERTURE_FLAGS.NAN_FILLED
    assert abs(filled.flux - full.flux) < 4 * noise_in_hole
    assert hole_flux > 50 * noise_in_hole  # ignoring the hole would be a large bias
    median = measure_band(holed, aperture, ApertureOptions(fill_replace_with="median"), rng())
    assert abs(median.flux - full.flux) < 0.02 * hole_flux + 4 * noise_in_hole


def test_mostly_missing_aperture_is_not_measured(field):
    band = field["bands"]["A"]
    aperture = science_aperture(galaxy_of(field["bands"])).aperture
    holed = attrs.evolve(band, data=np.where(aperture.elliptical_radius(band.shape) < 0.9 * aperture.a, np.nan, band.data))
    result = measure_band(holed, aperture, ApertureOptions(fill_max_nan_frac=0.5), np.random.default_rng(0))
    assert result.flags & APERTURE_FLAGS.TOO_MUCH_FILLED
    assert np.isnan(result.flux) and np.isnan(result.mag_raw) and not result.measured


def test_failed_band_gives_an_empty_flagged_row(field):
    bands = dict(field["bands"])
    bands["B"] = attrs.evolve(bands["B"], status="failed")
    rows = {r["filter"]: r for r in run_aperture_photometry(galaxy_of(bands))}
    assert rows["B"]["flags"] & APERTURE_FLAGS.NOT_MEASURED
    assert np.isnan(rows["B"]["flux"]) and np.isnan(rows["B"]["mag_corr"])
    assert np.isfinite(rows["C"]["mag_corr"])


@pytest.mark.parametrize("correlated", [False, True])
def test_flux_errors_match_the_scatter_over_noise_realisations(correlated):
    """The sky-aperture error is right for white noise and for correlated noise."""
    shape = (121, 121)
    psf = gaussian_psf(1.5, "A")
    galaxy = fftconvolve(pixel_averaged_sersic(shape, 60.0, 60.0, 6.0, 1.0, amplitude=1.0), psf.grid_kernel, mode="same")
    aperture = ApertureGeometry(60.0, 60.0, 8.0, 8.0, 0.0)
    sigma = 0.05
    rng = np.random.default_rng(11)
    fluxes, errors, noise_map_errors = [], [], []
    for _ in range(80):
        noise = rng.normal(0.0, sigma, shape)
        if correlated:  # smoothed noise, per-pixel sigma kept at `sigma`
            noise = fftconvolve(noise, gaussian_kernel(1.5), mode="same")
            noise *= sigma / noise.std()
        band = Band("A", galaxy + noise, psf, noise=np.full(shape, sigma), galaxy_model=galaxy)
        m = measure_band(band, aperture, ApertureOptions(), rng)
        fluxes.append(m.flux)
        errors.append(m.flux_err)
        noise_map_errors.append(sigma * math.sqrt(np.sum(aperture.weights(shape) ** 2)))
    ratio = np.std(fluxes) / np.mean(errors)
    assert 0.82 < ratio < 1.2  # adding noise-map and sky-aperture errors in quadrature would give 0.7
    assert abs(np.mean(fluxes) - np.sum(aperture.weights(shape) * galaxy)) < 3 * np.mean(errors) / math.sqrt(80)
    if correlated:  # the noise map alone would underestimate the error badly
        assert np.std(fluxes) > 2 * np.mean(noise_map_errors)


# ------------------------------------------------------------------------- PSF correction


def _point_source_band(name, sigma, rng, noise):
    shape = (101, 101)
    psf = gaussian_psf(sigma, name)
    star = psf.render(shape, [50.2], [49.7], [1000.0])
    data = star + (rng.normal(0.0, noise, shape) if noise else 0.0)
    return Band(name, data, psf, noise=np.full(shape, max(noise, 1e-6)), galaxy_model=star, zeropoint=25.0)


def test_psf_correction_of_a_point_source_is_the_encircled_energy_ratio():
    rng = np.random.default_rng(5)
    bands = {"sharp": _point_source_band("sharp", 1.0, rng, 0.0), "broad": _point_source_band("broad", 2.5, rng, 0.0)}
    galaxy = galaxy_of(bands, base_filter="sharp")
    rows = {r["filter"]: r for r in run_aperture_photometry(galaxy)}
    aperture = science_aperture(galaxy).aperture
    w = aperture.weights((101, 101))
    ee_ratio = np.sum(w * bands["broad"].galaxy_model) / np.sum(w * bands["sharp"].galaxy_model)
    assert ee_ratio < 0.8  # a case where the correction matters
    assert rows["broad"]["dmag_psf"] == pytest.approx(-2.5 * np.log10(ee_ratio), abs=2e-3)
    assert rows["broad"]["mag_corr"] == pytest.approx(rows["sharp"]["mag_raw"], abs=2e-3)
    # towards a broader base the correction is negative and reaches the broad magnitude
    rows = {r["filter"]: r for r in run_aperture_photometry(galaxy, ApertureOptions(PSF_corr_base_filter="broad"))}
    assert rows["sharp"]["dmag_psf"] == pytest.approx(2.5 * np.log10(ee_ratio), abs=2e-3)
    assert rows["sharp"]["mag_corr"] == pytest.approx(rows["broad"]["mag_raw"], abs=2e-3)
    assert rows["broad"]["dmag_psf"] == 0.0


def test_psf_correction_error_matches_monte_carlo():
    rng = np.random.default_rng(9)
    sharp_psf, broad_psf = gaussian_psf(1.0, "sharp"), gaussian_psf(2.5, "broad")
    clean = _point_source_band("sharp", 1.0, rng, 0.0).galaxy_model
    aperture = ApertureGeometry(50.2, 49.7, 3.0, 3.0, 0.0)
    sigma = 0.5
    noise_map = np.full(clean.shape, sigma)
    broad = BandPhotometry("broad", net_image=clean, noise=noise_map)
    dmags, errs = [], []
    for _ in range(60):
        base = BandPhotometry("sharp", net_image=clean + rng.normal(0.0, sigma, clean.shape), noise=noise_map)
        dmag, err = psf_correction(base, broad, sharp_psf, broad_psf, aperture)
        dmags.append(dmag)
        errs.append(err)
    assert 0.83 < np.std(dmags) / np.mean(errs) < 1.2


# ------------------------------------------------------------------------- options


def test_options_are_validated():
    with pytest.raises(ValueError):
        ApertureOptions(fit_isophot_to="sersic_modelimg")
    with pytest.raises(ValueError):
        ApertureOptions(isophot_frac_min=0.5, isophot_frac_max=0.4)
    with pytest.raises(ConfigError, match="petro"):
        build_options(ApertureOptions, {"petrro": 0.5}, "[aperture]")
    opts = build_options(ApertureOptions, {"petro": 0.3, "fill_replace_with": "median"}, "[aperture]")
    assert opts.petro == 0.3 and opts.fill_replace_with == "median"


def test_unknown_isophote_band_is_a_config_error(field):
    with pytest.raises(ConfigError, match="F999W"):
        run_aperture_photometry(galaxy_of(field["bands"]), ApertureOptions(isophot_base_filter="F999W"))


def test_isophotes_and_profile_from_the_star_subtracted_image(field):
    """At high S/N the data-based aperture agrees with the model-based one."""
    galaxy = galaxy_of(field["bands"])
    model = science_aperture(galaxy).aperture
    data = science_aperture(
        galaxy, ApertureOptions(fit_isophot_to="star_subtracted", petro_profile_on="star_subtracted")
    ).aperture
    assert data.a == pytest.approx(model.a, rel=0.03)
    assert data.axis_ratio == pytest.approx(model.axis_ratio, abs=0.03)


def test_every_option_column_and_flag_is_documented():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "aperture.rst").read_text(encoding="utf-8")
    names = [f.name for f in attrs.fields(ApertureOptions)] + list(APERTURE_COLUMNS) + [f.name for f in APERTURE_FLAGS]
    missing = [n for n in names if f"``{n}``" not in page]
    assert not missing, f"not documented in docs/aperture.rst: {missing}"
