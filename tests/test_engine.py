"""The engine on small simulated galaxies with known truth."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from sphot_core import engine
from sphot_core.config import load_config
from sphot_core.data import Band
from sphot_core.errors import FitError, InputError
from sphot_core.flags import GALAXY_FLAGS, SOURCE_FLAGS
from sphot_core.io import GALAXY_COLUMNS, SOURCE_COLUMNS, load_galaxy, read_sphot, write_sphot
from sphot_core.simulate import simulate_to_file

FILTERS = ("F090W", "F150W", "F277W")


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    d = tmp_path_factory.mktemp("field")
    paths = simulate_to_file(d / "sim.h5", filters=FILTERS, size=101, n_stars=60, seed=7, snr=400.0)
    paths["truth_data"] = json.loads(paths["truth"].read_text())
    return paths


@pytest.fixture(scope="module")
def config():
    # a minimum crop below the 101 px field keeps the auto-crop (and its undoing in
    # every output coordinate) in play
    return load_config(use_user_config=False).with_overrides({"prep.auto_crop_min_size": 31})


@pytest.fixture(scope="module")
def fitted(field, config, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    summary = engine.run_file(field["galaxy"], out, psf=field["psf"], config=config, jobs=1)
    return summary, out


def _given_fit(params, flux=1.0):
    """A Sersic result with these parameters, as if a fit had returned it."""
    from sphot_core.stages import SersicResult

    return SersicResult(params=params, errors={}, names=(), covariance=None, flux=flux, flux_err=1.0,
                        loss=0.0, chi2=0.0, dof=1, success=True, message="", nfev=0)


def test_parameter_change_units():
    prev = {"x_0": 10.0, "y_0": 5.0, "amplitude": 2.0, "r_eff": 10.0, "n": 2.0, "ellip": 0.5, "theta": 0.1}
    cur = dict(prev, x_0=10.005, amplitude=2.01, theta=0.1 + np.pi - 0.01)
    # amplitude 0.5 %, centre 0.005 px, theta wraps: 0.01 rad x ellip 0.5 -> 0.005
    assert engine.parameter_change(prev, cur, atol=0.01) == pytest.approx(0.5)
    assert engine.parameter_change(prev, dict(prev, r_eff=10.3), atol=0.01) == pytest.approx(0.3 / 10.3 / 0.01)
    # changes inside a fraction of the uncertainty are tolerated
    errs = {"x_0": 0.5}
    assert engine.parameter_change(prev, dict(prev, x_0=10.04), atol=0.01, errors=errs, sigma_fraction=0.1) == pytest.approx(0.8)
    assert engine.parameter_change(prev, dict(prev, x_0=10.04), atol=0.01) == pytest.approx(4.0)


def test_outputs_and_recovery(field, fitted):
    summary, out = fitted
    truth = field["truth_data"]
    assert summary["status"] == "ok", summary
    for key in ("sphot", "galaxy", "sources"):
        assert (out / f"sim_{key}.h5" if key == "sphot" else out / f"sim_{key}.csv").exists()
    with open(out / "sim_galaxy.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == GALAXY_COLUMNS
    by = {r["filter"]: r for r in rows}
    g = truth["galaxy"]
    base = by["F150W"]
    # the centre is reported on the INPUT grid (crop undone)
    assert float(base["x_0"]) == pytest.approx(g["x_0"], abs=0.05)
    assert float(base["y_0"]) == pytest.approx(g["y_0"], abs=0.05)
    assert float(base["r_eff"]) == pytest.approx(g["r_eff"], rel=0.05)
    assert float(base["n"]) == pytest.approx(g["n"], abs=0.15)
    assert float(base["ellip"]) == pytest.approx(g["ellip"], abs=0.02)
    assert float(base["theta"]) == pytest.approx(g["theta"], abs=0.05)
    # colours (band minus base) from the Sersic fluxes, as in the issue
    for f in FILTERS:
        colour = float(by[f]["mag"]) - float(base["mag"])
        assert colour == pytest.approx(truth["bands"][f]["colour"], abs=0.03), f
        assert by[f]["converged"] == "true"
        assert float(by[f]["chi2_dof"]) == pytest.approx(1.0, abs=0.25)
        assert int(by[f]["flags"]) & GALAXY_FLAGS.BAND_FAILED == 0
    with open(out / "sim_sources.csv") as fh:
        src = list(csv.DictReader(fh))
    assert tuple(src[0]) == SOURCE_COLUMNS
    assert all(float(s["flux"]) >= 0 for s in src)


def test_stars_and_sky_are_recovered(field, fitted):
    summary, out = fitted
    truth = field["truth_data"]
    galaxy, _ = read_sphot(out / "sim_sphot.h5")
    dx, dy = galaxy.crop_offset
    assert dx > 0 and dy > 0  # the field was cropped
    band = galaxy.bands["F150W"]
    tx = np.array(truth["stars"]["x"]) - dx
    ty = np.array(truth["stars"]["y"]) - dy
    tf = np.array(truth["bands"]["F150W"]["star_flux"])
    sigma = truth["bands"]["F150W"]["noise_sigma"]
    inside = (tx > 3) & (ty > 3) & (tx < band.shape[1] - 4) & (ty < band.shape[0] - 4)
    ok = inside & np.isfinite(band.data[np.round(ty).astype(int).clip(0, band.shape[0] - 1), np.round(tx).astype(int).clip(0, band.shape[1] - 1)])
    bright = ok & (tf > 30 * sigma * band.psf.fwhm)
    from scipy.spatial import cKDTree

    d, i = cKDTree(np.column_stack([band.sources.x, band.sources.y])).query(np.column_stack([tx[bright], ty[bright]]))
    assert np.mean(d < 1.0) >= 0.9
    matched = d < 1.0
    ratio = band.sources.flux[i[matched]] / tf[bright][matched]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.05)
    # the sky plane: level at the cutout centre
    s = truth["bands"]["F150W"]["sky"]
    c = (truth["shape"][0] - 1) / 2
    yy, xx = np.indices(band.shape)
    true_sky = s["c0"] + s["cx"] * (xx + dx - c) + s["cy"] * (yy + dy - c)
    assert np.mean(band.sky_model - true_sky) == pytest.approx(0.0, abs=3 * sigma / math.sqrt(band.data.size) + 0.05 * sigma)


def test_history_and_kernel_records(fitted):
    _, out = fitted
    galaxy, config_text = read_sphot(out / "sim_sphot.h5")
    assert "[psf-calib]" in config_text
    for band in galaxy.bands.values():
        stages = [h["stage"] for h in band.history]
        assert stages[0] in ("primer", "scale-primer") and stages[-1] == "total"
        assert band.kernel_history, band.filter
        assert all("params" in k for k in band.kernel_history if k.get("success", True))
        assert band.stages_done


def test_resume_after_a_crash_between_bands(field, config, tmp_path, fitted):
    """Kill the run after the base band and one scale band were checkpointed; resuming
    finishes the remaining band and reproduces the uninterrupted result."""

    class Killed(BaseException):
        pass

    state = tmp_path / "sim_sphot.h5"
    calls = []

    def checkpoint(g):
        write_sphot(g, state, config.to_toml())
        calls.append(1)
        if len(calls) == 2:
            raise Killed

    galaxy = load_galaxy(field["galaxy"], field["psf"], config=config)
    with pytest.raises(Killed):
        engine.run(galaxy, config, jobs=1, checkpoint=checkpoint)
    partial, _ = read_sphot(state)
    assert [b.status for b in partial.bands.values()].count("done") == 2
    summary = engine.run_file(state, tmp_path, config=config, resume=True, jobs=1)
    assert summary["status"] == "ok"
    resumed, _ = read_sphot(tmp_path / "sim_sphot.h5")
    reference, _ = read_sphot(fitted[1] / "sim_sphot.h5")
    for f in FILTERS:
        a, b = resumed.bands[f].sersic, reference.bands[f].sersic
        for k in a.params:
            assert a.params[k] == pytest.approx(b.params[k], rel=1e-6, abs=1e-9), (f, k)
        assert a.flux == pytest.approx(b.flux, rel=1e-6)
        assert len(resumed.bands[f].sources) == len(reference.bands[f].sources)


def test_a_failed_band_does_not_stop_the_others(field, config, tmp_path, monkeypatch):
    real = engine.fit_band

    def flaky(band: Band, *args, **kwargs):
        if band.filter == "F277W":
            raise FitError("simulated failure in F277W")
        return real(band, *args, **kwargs)

    monkeypatch.setattr(engine, "fit_band", flaky)
    cfg = config.with_overrides({"core.iter_basefit": 2, "core.iter_scalefit": 1, "psf-calib.in_mainloop": False})
    summary = engine.run_file(field["galaxy"], tmp_path, psf=field["psf"], config=cfg, jobs=1)
    assert summary["status"] == "partial" and summary["bands_failed"] == "F277W"
    galaxy, _ = read_sphot(tmp_path / "sim_sphot.h5")
    assert galaxy.bands["F277W"].status == "failed"
    assert "simulated failure" in galaxy.bands["F277W"].message
    assert galaxy.bands["F090W"].status == "done"
    with open(tmp_path / "sim_galaxy.csv") as fh:
        rows = {r["filter"]: r for r in csv.DictReader(fh)}
    assert int(rows["F277W"]["flags"]) & GALAXY_FLAGS.BAND_FAILED
    assert rows["F277W"]["flux"] == "" and rows["F090W"]["flux"] != ""


def test_forced_band_uses_the_base_positions(field, config, tmp_path):
    cfg = config.with_overrides({"core.iter_basefit": 2, "core.iter_scalefit": 2, "psf-calib.in_mainloop": False})
    engine.run_file(field["galaxy"], tmp_path, psf=field["psf"], config=cfg, forced=["F277W"], jobs=1)
    galaxy, _ = read_sphot(tmp_path / "sim_sphot.h5")
    base, forced = galaxy.bands["F150W"], galaxy.bands["F277W"]
    assert "forcedfit" in forced.stages_done
    assert np.all(forced.sources.flags & SOURCE_FLAGS.FORCED)
    shift = np.array([forced.sersic.params["x_0"] - base.sersic.params["x_0"], forced.sersic.params["y_0"] - base.sersic.params["y_0"]])
    # every forced source sits at a base position shifted by the band's centre offset
    from scipy.spatial import cKDTree

    d, _ = cKDTree(np.column_stack([base.sources.x, base.sources.y]) + shift).query(np.column_stack([forced.sources.x, forced.sources.y]))
    assert np.all(d < 1e-6)


def test_rerun_scalefit_of_one_band(field, config, tmp_path):
    cfg = config.with_overrides({"core.iter_basefit": 2, "core.iter_scalefit": 2})
    engine.run_file(field["galaxy"], tmp_path, psf=field["psf"], config=cfg, jobs=1)
    before, _ = read_sphot(tmp_path / "sim_sphot.h5")
    cfg2 = cfg.with_overrides({"core.scale_shift_max": 0.3})
    engine.run_file(tmp_path / "sim_sphot.h5", None, config=cfg2, rerun="scalefit", filters=["F090W"], jobs=1)
    after, _ = read_sphot(tmp_path / "sim_sphot.h5")
    assert after.bands["F150W"].sersic.params == before.bands["F150W"].sersic.params
    assert after.bands["F277W"].sersic.params == before.bands["F277W"].sersic.params
    # F090W was redone, now with a free centre around its registered position
    moved = after.bands["F090W"].sersic.params["x_0"] - before.bands["F090W"].sersic.params["x_0"]
    assert 0 < abs(moved) <= 0.3 + 1e-9
    with pytest.raises(InputError, match="no earlier output"):
        engine.run_file(field["galaxy"], tmp_path / "empty", psf=field["psf"], config=cfg, rerun="scalefit")


def test_stage_objects_replace_configured_ones(field, config, tmp_path):
    """A researcher's optimizer object drives every Sersic fit."""
    from sphot_core.registry import get_registry

    class Counting:
        name = "counting"

        def __init__(self):
            self.inner = get_registry().create("fitter", "levmar")
            self.calls = 0

        def fit(self, problem, start=None):
            self.calls += 1
            return self.inner.fit(problem, start)

    fitter = Counting()
    # a free centre shift gives the scale fits a parameter to optimize (with everything
    # pinned the engine solves the linear amplitudes without an optimizer)
    cfg = config.with_overrides(
        {"core.iter_basefit": 2, "core.iter_scalefit": 1, "core.scale_shift_max": 0.3, "psf-calib.in_mainloop": False}
    )
    galaxy = load_galaxy(field["galaxy"], field["psf"], config=cfg)
    result = engine.run(galaxy, cfg, jobs=4, sersic_fitter=fitter)  # does not pickle -> bands in this process
    assert all(b.status == "done" for b in result.bands.values())
    # base: primer + 2 iterations; each of the 2 scale bands: 1 iteration
    assert fitter.calls >= 3 + 2
    # pinned fits are solved linearly, with no optimizer
    assert {h["optimizer"] for b in result.bands.values() for h in b.history if h.get("optimizer")} == {"levmar", "linear"}
    with pytest.raises(InputError, match="unknown stage argument"):
        engine.run(galaxy, cfg, optimiser=fitter)


def test_bands_in_parallel_processes_match_serial(field, config, tmp_path, fitted):
    cfg = config
    summary = engine.run_file(field["galaxy"], tmp_path, psf=field["psf"], config=cfg, jobs=2)
    assert summary["status"] == "ok"
    par, _ = read_sphot(tmp_path / "sim_sphot.h5")
    ser, _ = read_sphot(fitted[1] / "sim_sphot.h5")
    for f in FILTERS:
        for k, v in ser.bands[f].sersic.params.items():
            assert par.bands[f].sersic.params[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (f, k)


def test_failed_aperture_photometry_keeps_the_fits(field, config, tmp_path, monkeypatch):
    import sphot_core.aperture as aperture
    from sphot_core.errors import DegenerateCutoutError

    def broken(*args, **kwargs):
        raise DegenerateCutoutError("fewer than 5 usable isophotes")

    monkeypatch.setattr(aperture, "run_aperture_photometry", broken)
    cfg = config.with_overrides({"core.iter_basefit": 2, "core.iter_scalefit": 1, "psf-calib.in_mainloop": False})
    summary = engine.run_file(field["galaxy"], tmp_path, psf=field["psf"], config=cfg, photometry=True, jobs=1)
    assert summary["status"] == "ok" and "aperture" not in summary["outputs"]
    galaxy, _ = read_sphot(tmp_path / "sim_sphot.h5")
    assert "fewer than 5" in galaxy.meta["aperture_error"]
    assert (tmp_path / "sim_galaxy.csv").exists()


def test_bands_run_in_parallel_under_a_terminal_reporter(field, config, caplog):
    """The live display must not force the bands into this process."""
    import io
    import logging

    from sphot_core.progress import TerminalReporter

    cfg = config.with_overrides({"core.iter_basefit": 2, "core.iter_scalefit": 1, "psf-calib.in_mainloop": False})
    galaxy = load_galaxy(field["galaxy"], field["psf"], config=cfg)
    screen = io.StringIO()
    reporter = TerminalReporter("sim", screen)
    try:
        with caplog.at_level(logging.INFO, logger="sphot_core.engine"):
            result = engine.run(galaxy, cfg, jobs=2, progress=reporter)
    finally:
        reporter.close()
    assert "in this process" not in caplog.text
    assert all(b.status == "done" for b in result.bands.values())
    assert "F277W" in screen.getvalue() and "done" in screen.getvalue()  # worker events reached the display


def test_rerun_basefit_redoes_every_band(field, config, tmp_path):
    cfg = config.with_overrides({"core.iter_basefit": 2, "core.iter_scalefit": 1, "psf-calib.in_mainloop": False})
    engine.run_file(field["galaxy"], tmp_path, psf=field["psf"], config=cfg, jobs=1)
    summary = engine.run_file(tmp_path / "sim_sphot.h5", None, config=cfg, rerun="basefit", filters=["F090W"], jobs=1)
    assert summary["status"] == "ok", summary
    galaxy, _ = read_sphot(tmp_path / "sim_sphot.h5")
    assert all(b.status == "done" and b.sersic is not None for b in galaxy.bands.values())


def test_joint_linear_step_settles_a_scale_band_in_one_iteration(tmp_path):
    """Stars on the galaxy trade light with it; alternating the two steps needs many
    iterations, the joint solve of galaxy brightness, star fluxes and sky needs one."""
    from sphot_core.sersic import magnitude

    paths = simulate_to_file(tmp_path / "sim.h5", filters=FILTERS, size=101, n_stars=150, seed=1, snr=300.0, star_free_radius=4)
    truth = json.loads(paths["truth"].read_text())
    errors = {}
    for joint in (True, False):
        cfg = load_config(use_user_config=False).with_overrides(
            {"core.joint_linear": joint, "core.joint_linear_sky": joint, "core.iter_scalefit": 1, "psf-calib.in_mainloop": False}
        )
        g = engine.run(load_galaxy(paths["galaxy"], paths["psf"], config=cfg), cfg, jobs=1)
        mag = {f: magnitude(b.sersic.flux, b.sersic.flux_err, b.zeropoint)[0] for f, b in g.bands.items()}
        errors[joint] = abs(mag["F277W"] - mag["F150W"] - truth["bands"]["F277W"]["colour"])
        if joint:
            b = g.bands["F277W"]
            assert b.history[-2]["seconds"].get("joint", 0) > 0
            # the joint solve's flux error includes the covariance with the stars
            assert b.sersic.flux_err > 0
    assert errors[True] < 0.002
    assert errors[True] < errors[False]


def test_joint_step_with_the_galaxy_held_fixed(config):
    """``joint_linear_galaxy = false``: star fluxes and the sky correction are solved
    together on ``data - galaxy``; the galaxy model and its fit are left as they are."""
    from sphot_core.data import SourceTable
    from sphot_core.testing import _gaussian_psf

    psf = _gaussian_psf(2.5)
    shape = (64, 64)
    yy, xx = np.mgrid[0:64, 0:64].astype(float)
    galaxy = 40.0 * np.exp(-np.hypot(xx - 31.6, yy - 32.3) / 5.0)
    x, y = np.array([29.0, 37.4, 12.2, 50.1]), np.array([35.0, 28.6, 48.9, 14.3])
    flux = np.array([300.0, 120.0, 80.0, 500.0])
    sky = 3.0 + 0.01 * (xx - 31.5) - 0.02 * (yy - 31.5)
    data = galaxy + psf.render(shape, x, y, flux, half=psf.half_extent) + sky
    band = Band("F150W", data, psf, noise=np.ones(shape))
    # a model that is off: the sky 0.8 too high and the stars at half their flux
    band.galaxy_model = galaxy.copy()
    band.sky_model = sky + 0.8
    band.sources = SourceTable.from_columns(x, y, 0.5 * flux)
    fit = _given_fit({"amplitude": 1.0}, flux=123.0)
    band.sersic = fit
    cfg = config.with_overrides({"core.joint_linear": True, "core.joint_linear_sky": True, "core.joint_linear_galaxy": False})
    loop = engine._BandLoop(band, cfg, engine.Stages.from_config(cfg), lambda event: None, "sersic")
    loop.joint(positions_fitted=False)
    assert band.sersic is fit
    np.testing.assert_array_equal(band.galaxy_model, galaxy)
    order = np.argsort(band.sources.x)
    np.testing.assert_allclose(band.sources.flux[order], flux[np.argsort(x)], rtol=1e-3)
    np.testing.assert_allclose(band.sky_model, sky, atol=1e-3)
    # with the galaxy in the solve, its brightness is re-scaled (here: kept at 1)
    band.sky_model, band.sources = sky + 0.8, SourceTable.from_columns(x, y, 0.5 * flux)
    cfg = cfg.with_overrides({"core.joint_linear_galaxy": True})
    engine._BandLoop(band, cfg, engine.Stages.from_config(cfg), lambda event: None, "sersic").joint(positions_fitted=False)
    assert band.sersic is not fit and band.sersic.flux == pytest.approx(123.0, rel=1e-3)
    np.testing.assert_allclose(band.sky_model, sky, atol=1e-3)


def test_scale_band_adds_no_source_of_its_own_on_the_galaxy(config):
    """``[psf] scale_leftovers_r_eff``: a scale band seeded with the base band's stars
    adds its own leftover sources outside the galaxy ellipse of that many r_eff, not
    inside it (a compact clump the pinned model misses stays galaxy light); with 0 it
    adds both."""
    from sphot_core.testing import _gaussian_psf

    psf = _gaussian_psf(2.5)
    shape = (64, 64)
    yy, xx = np.mgrid[0:64, 0:64].astype(float)
    galaxy = 40.0 * np.exp(-np.hypot(xx - 31.6, yy - 32.3) / 5.0)  # r_eff = 8.4 px
    seeds = (np.array([20.0, 45.3]), np.array([44.0, 20.6]))
    clump, star = (38.1, 36.9), (55.2, 9.7)  # 7.9 px and 32.3 px from the centre
    x = np.r_[seeds[0], clump[0], star[0]]
    y = np.r_[seeds[1], clump[1], star[1]]
    data = galaxy + psf.render(shape, x, y, np.array([300.0, 200.0, 150.0, 150.0]), half=psf.half_extent)
    params = {"x_0": 31.6, "y_0": 32.3, "amplitude": 1.0, "r_eff": 8.4, "n": 1.0, "ellip": 0.0, "theta": 0.0}
    found = {}
    for r_eff_factor in (2.0, 0.0):
        band = Band("F160W", data, psf, noise=np.ones(shape))
        band.galaxy_model = galaxy.copy()
        band.sky_model = np.zeros(shape)
        band.sersic = _given_fit(params)
        cfg = config.with_overrides({"psf.scale_leftovers_r_eff": r_eff_factor, "psf.galaxy_footprint_r_eff": 0.0})
        loop = engine._BandLoop(band, cfg, engine.Stages.from_config(cfg), lambda event: None, "sersic")
        loop.seed_for = lambda: seeds
        loop.stars(warm=False)
        src = band.sources
        found[r_eff_factor] = [bool(np.any(np.hypot(src.x - px, src.y - py) < 1.0)) for px, py in (clump, star)]
        assert all(np.any(np.hypot(src.x - sx, src.y - sy) < 0.1) for sx, sy in zip(*seeds)), r_eff_factor
    assert found[2.0] == [False, True]
    assert found[0.0] == [True, True]


def test_wavelength_shape_on_a_finished_run(field, config, fitted, tmp_path):
    """``--resume`` with ``[core] wavelength_shape`` switched on fits the law to the
    finished bands without refitting them; the simulated galaxy has one shape in every
    band, so the law is flat and the colours stay right."""
    galaxy, _ = read_sphot(fitted[1] / "sim_sphot.h5")
    base = galaxy.meta["base_params"]
    assert base == galaxy.bands["F150W"].sersic.params
    cfg = config.with_overrides({"core.wavelength_shape": True})
    engine.run(galaxy, cfg, resume=True, jobs=1)
    law = galaxy.meta["wavelength_shape"]
    truth = field["truth_data"]
    assert law["n"][0] == pytest.approx(truth["galaxy"]["n"], abs=0.15)
    assert abs(law["n"][1]) < 0.3 and abs(law["ln_r_eff"][1]) < 0.05
    assert galaxy.meta["base_params"] == base  # scale fits still pin to the base band's own fit
    mags = {f: -2.5 * math.log10(b.sersic.flux) for f, b in galaxy.bands.items()}
    for f, b in galaxy.bands.items():
        assert b.sersic.optimizer == "wavelength"
        assert mags[f] - mags["F150W"] == pytest.approx(truth["bands"][f]["colour"], abs=0.03), f
    # stored and read back; a second resume has nothing left to do
    write_sphot(galaxy, tmp_path / "law_sphot.h5", cfg.to_toml())
    again, _ = read_sphot(tmp_path / "law_sphot.h5")
    assert again.meta["wavelength_shape"] == law
    engine.run(again, cfg, resume=True, jobs=1)
    assert again.meta["wavelength_shape"] == law


def test_scale_band_is_registered_on_its_stars(config, tmp_path):
    """A band offset as a whole (mosaic misregistration: galaxy and stars shifted
    together) is registered on its stars, and its galaxy centre follows."""
    shift = (0.6, -0.4)
    paths = simulate_to_file(
        tmp_path / "off.h5", filters=("F150W", "F277W"), size=101, n_stars=60, seed=7, snr=400.0, offsets={"F277W": shift}
    )
    truth = json.loads(paths["truth"].read_text())
    assert truth["bands"]["F277W"]["offset"] == list(shift)
    summary = engine.run_file(paths["galaxy"], tmp_path, psf=paths["psf"], config=config, jobs=1)
    assert summary["status"] == "ok", summary
    g, _ = read_sphot(tmp_path / "off_sphot.h5")
    primer = next(h for h in g.bands["F277W"].history if h.get("stage") == "scale-primer")
    assert primer["offset"] == pytest.approx(shift, abs=0.05)
    p, base = g.bands["F277W"].sersic.params, g.bands["F150W"].sersic.params
    assert (p["x_0"] - base["x_0"], p["y_0"] - base["y_0"]) == pytest.approx(shift, abs=0.05)


def test_a_failing_calibration_is_reported_once_per_band(config, caplog):
    """A field without stars has no calibration anchors: every iteration's calibration
    fails, the band is flagged and every failure is kept in ``kernel_history``, but the
    log warns once, not once per iteration."""
    import logging

    from sphot_core.testing import _gaussian_psf

    psf = _gaussian_psf(2.5)
    shape = (64, 64)
    yy, xx = np.mgrid[0:64, 0:64].astype(float)
    galaxy = 40.0 * np.exp(-np.hypot(xx - 31.6, yy - 32.3) / 5.0)
    band = Band("F150W", galaxy, psf, noise=np.ones(shape))
    band.galaxy_model = galaxy.copy()
    band.sky_model = np.zeros(shape)
    band.sersic = _given_fit({"x_0": 31.6, "y_0": 32.3, "amplitude": 1.0, "r_eff": 8.4, "n": 1.0, "ellip": 0.0, "theta": 0.0})
    band.kernel_history = []
    loop = engine._BandLoop(band, config, engine.Stages.from_config(config), lambda event: None, "sersic")
    with caplog.at_level(logging.DEBUG, logger="sphot_core.engine"):
        for iteration in range(3):
            loop.calibrate(iteration)
    failed = [r for r in caplog.records if "PSF calibration failed" in r.getMessage()]
    assert [r.levelno for r in failed] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "usable anchors" in failed[0].getMessage()
    assert band.flags & GALAXY_FLAGS.CALIBRATION_FAILED
    assert [h["success"] for h in band.kernel_history] == [False, False, False]


def _disk_band_with_a_ridge(seed=3, knots_on=True):
    """A 120 px field: an elongated exponential disk (r_eff 16 px, ellip 0.6, theta 0.3)
    whose ridge is split into 10 knots within 0.8 r_eff of the centre (flux 150 each,
    FWHM 3.0 px against the PSF's 2.5: nearly point-like, below the SPREAD_MODEL
    "resolved" limit), plus 110 foreground stars spread evenly over the field.
    Returns the band (its galaxy model exact), and the stars' positions and fluxes."""
    from sphot_core.testing import _gaussian_psf

    rng = np.random.default_rng(seed)
    psf = _gaussian_psf(2.5)
    shape = (120, 120)
    yy, xx = np.mgrid[0:120, 0:120].astype(float)
    x0, y0, theta, q, r_eff = 59.6, 60.3, 0.3, 0.4, 16.0
    u = (xx - x0) * np.cos(theta) + (yy - y0) * np.sin(theta)
    v = -(xx - x0) * np.sin(theta) + (yy - y0) * np.cos(theta)
    galaxy = 30.0 * np.exp(-1.678 * np.hypot(u, v / q) / r_eff)
    stars = (rng.uniform(2, 118, 110), rng.uniform(2, 118, 110))
    flux = rng.uniform(80.0, 600.0, 110)
    data = galaxy + psf.render(shape, *stars, flux, half=psf.half_extent) + rng.normal(0.0, 0.5, shape)
    if knots_on:
        t = np.r_[-12.5:-2:2.5, 2.5:13:2.5]  # along the major axis, 2.5 px apart
        knot_psf = _gaussian_psf(3.0)
        data += knot_psf.render(shape, x0 + t * np.cos(theta), y0 + t * np.sin(theta), np.full(10, 150.0), half=knot_psf.half_extent)
    band = Band("F150W", data, psf, noise=np.full(shape, 0.5))
    band.galaxy_model = galaxy.copy()
    band.sky_model = np.zeros(shape)
    params = {"x_0": x0, "y_0": y0, "amplitude": 1.0, "r_eff": r_eff, "n": 1.0, "ellip": 1 - q, "theta": theta}
    band.sersic = _given_fit(params)
    return band, stars, flux


def _star_flux_on_the_galaxy(config, seed, sigma, knots_on=True):
    """(flux of the fitted sources inside 1 r_eff, true star flux there, sources returned)."""
    from sphot_core.calibrate import galaxy_exclusion_mask

    band, stars, flux = _disk_band_with_a_ridge(seed, knots_on)
    cfg = config.with_overrides({"psf.substructure_density_sigma": sigma})
    loop = engine._BandLoop(band, cfg, engine.Stages.from_config(cfg), lambda event: None, "sersic")
    loop.stars(warm=False)
    src = band.sources
    inner = galaxy_exclusion_mask(band.shape, band.sersic.params, factor=1.0, cap_fraction=0.49)
    fitted = src.flux[inner[np.round(src.y).astype(int), np.round(src.x).astype(int)]].sum()
    true = flux[inner[np.round(stars[1]).astype(int), np.round(stars[0]).astype(int)]].sum()
    return fitted, true, loop.substructure


def test_a_ridge_split_into_stars_is_returned_to_the_galaxy(config):
    """``[psf] substructure_density_sigma``: foreground stars are spread evenly; a knotty
    ridge the smooth model misses makes the sources inside the galaxy ellipse far
    more numerous than the field density predicts, and their excess is returned to
    the galaxy. Measured by the light given to "stars" inside 1 r_eff against the
    true stars' there (10 knots hold 1500)."""
    error = {}
    for sigma in (3.0, 0.0):
        error[sigma] = 0.0
        for seed in (3, 5):
            fitted, true, returned = _star_flux_on_the_galaxy(config, seed, sigma)
            error[sigma] += abs(fitted - true)
            if sigma:
                assert returned >= 6
    assert error[0.0] > 1500  # without the guard the knots are "stars"
    assert error[3.0] < 0.5 * error[0.0]


def test_even_foreground_is_not_mistaken_for_structure(config):
    """Without the knots the density guard returns nothing: the sources on the
    galaxy are as many as the field density predicts."""
    for seed in (3, 5):
        with_guard = _star_flux_on_the_galaxy(config, seed, 3.0, knots_on=False)
        without = _star_flux_on_the_galaxy(config, seed, 0.0, knots_on=False)
        assert with_guard[2] == without[2]
        assert with_guard[0] == pytest.approx(without[0])


def test_structure_returned_twice_stays_galaxy(config):
    """In the loop's (warm) passes a position returned to the galaxy a second time is
    remembered for good: neither the catalogue nor the leftover search puts a source
    there again, so a source near a limit cannot make the loop cycle between two
    solutions. A position returned once is only a candidate (one noise crossing of a
    limit does not lose a star), and the cold first pass (on a rough galaxy model)
    counts for nothing."""
    band, _, _ = _disk_band_with_a_ridge(3)
    loop = engine._BandLoop(band, config, engine.Stages.from_config(config), lambda event: None, "sersic")
    loop.stars(warm=False)
    assert loop.substructure > 0 and len(loop._returned) == 0 and len(loop._once) == 0
    # the cold pass's returns come back through the leftover search and are returned
    # again: candidates after this pass, structure after the next
    loop.stars(warm=True)
    assert len(loop._once) > 0 and len(loop._returned) == 0
    loop.stars(warm=True)
    remembered = loop._returned.copy()
    assert len(remembered) > 0 and loop.substructure >= len(remembered)
    for _ in range(2):
        loop.stars(warm=True)
        src = band.sources
        d = np.hypot(src.x[:, None] - remembered[:, 0], src.y[:, None] - remembered[:, 1])
        assert d.min() > loop._returned_radius()
    np.testing.assert_array_equal(loop._returned[: len(remembered)], remembered)


def test_a_position_returned_once_is_only_a_candidate(config):
    """``_remember``: a first return makes a candidate, a second one (within the radius)
    makes it structure; elsewhere nothing is remembered."""
    band, _, _ = _disk_band_with_a_ridge(3)
    loop = engine._BandLoop(band, config, engine.Stages.from_config(config), lambda event: None, "sersic")
    r = loop._returned_radius()
    loop._remember(np.array([[40.0, 50.0], [70.0, 60.0]]))
    assert len(loop._returned) == 0 and len(loop._once) == 2
    loop._remember(np.array([[40.0 + 0.8 * r, 50.0], [90.0, 20.0]]))
    np.testing.assert_allclose(loop._returned, [[40.0 + 0.8 * r, 50.0]])
    assert len(loop._once) == 3
    # only remembered positions keep sources out
    from sphot_core.data import SourceTable

    table = SourceTable.from_columns(np.array([40.0, 70.0, 90.0]), np.array([50.0, 60.0, 20.0]), np.ones(3))
    kept = loop._not_returned(table)
    np.testing.assert_allclose(kept.x, [70.0, 90.0])


def _band_with_faint_foreground(seed, flux_faint=40.0, n_faint=400):
    """A scale band: an n = 1 galaxy, 12 bright stars the base band found, and a uniform
    population of fainter stars the base band missed (the band itself can find them)."""
    from sphot_core.sersic import sersic_total_flux
    from sphot_core.simulate import render_sersic_reference
    from sphot_core.testing import _gaussian_psf

    rng = np.random.default_rng(seed)
    psf = _gaussian_psf(2.0)
    shape = (101, 101)
    params = {"x_0": 50.3, "y_0": 49.8, "amplitude": 1.0, "r_eff": 8.0, "n": 1.0, "ellip": 0.2, "theta": 0.5}
    params["amplitude"] = 20000.0 / sersic_total_flux(1.0, 8.0, 1.0, 0.2)
    bx, by = rng.uniform(5, 96, 12), rng.uniform(5, 96, 12)
    fx, fy = rng.uniform(-0.5, 100.5, n_faint), rng.uniform(-0.5, 100.5, n_faint)
    data = render_sersic_reference(shape, psf, params)
    data += psf.render(shape, np.r_[bx, fx], np.r_[by, fy], np.r_[np.full(12, 2000.0), np.full(n_faint, flux_faint)], half=psf.half_extent)
    data += 5.0 + rng.normal(0.0, 1.0, shape)
    return Band("F090W", data, psf, noise=np.ones(shape)), params, (bx, by)


def test_scale_band_keeps_the_unresolved_foreground_out_of_the_galaxy(config):
    """``[psf] scale_unresolved``: a scale band finds the stars the base band missed only
    outside the galaxy ellipse; the same stars under the galaxy would be galaxy light,
    while the sky outside no longer carries them. Their mean light per pixel, added to
    the star model under the galaxy, takes the bias out of the galaxy's flux."""
    errors = {True: [], False: []}
    for seed in (1, 2):
        for on in (True, False):
            band, params, seeds = _band_with_faint_foreground(seed)
            cfg = config.with_overrides({"psf.scale_unresolved": on, "psf-calib.in_mainloop": False})
            base = {"params": params, "sources": seeds, "valid": np.ones(band.shape, dtype=bool)}
            engine.fit_band(band, cfg, engine.Stages.from_config(cfg), base=base)
            errors[on].append(band.sersic.flux / 20000.0 - 1.0)
            own = band.sources.select(~engine._near(band.sources.x, band.sources.y, np.column_stack(seeds), 1.0))
            assert len(own) > 150  # the band finds its own faint stars, outside the galaxy
            unresolved = band.star_model - band.psf.render(band.shape, band.sources.x, band.sources.y, band.sources.flux, half=band.psf.half_extent)
            assert bool(np.ptp(unresolved) > 0.5) is on
    # without the correction the galaxy takes the faint stars' light under it (about 30
    # stars inside 2 r_eff: 5 % of the galaxy's light, 3 % of its fitted flux); with it
    # what is left is the fluctuation of their number
    assert min(errors[False]) > 0.02, errors  # measured: 0.033, 0.027
    assert max(abs(e) for e in errors[True]) < 0.25 * min(errors[False]), errors  # 0.004, -0.002


def test_errors_follow_the_scatter_with_correlated_noise(config):
    """``[core] correlated_errors``: in a band whose noise is correlated between pixels
    (like a resampled mosaic's) the quoted flux error follows the scatter of the fitted
    fluxes over noise realisations; the independent-pixel error is several times too
    small. The factor is recorded in the band's history."""
    from scipy import ndimage

    from sphot_core.sersic import sersic_total_flux
    from sphot_core.simulate import render_sersic_reference
    from sphot_core.testing import _gaussian_psf

    psf = _gaussian_psf(2.0)
    shape = (81, 81)
    params = {"x_0": 40.2, "y_0": 39.7, "amplitude": 1.0, "r_eff": 6.0, "n": 1.5, "ellip": 0.2, "theta": 0.5}
    params["amplitude"] = 400.0 / sersic_total_flux(1.0, 6.0, 1.5, 0.2)
    galaxy = render_sersic_reference(shape, psf, params)
    rng = np.random.default_rng(5)
    fluxes, quoted = {True: [], False: []}, {True: [], False: []}
    for _ in range(16):
        w = ndimage.gaussian_filter(rng.normal(size=shape), 1.2, mode="wrap")
        data = galaxy + 2.0 + w / w.std()
        for on in (True, False):
            band = Band("F277W", data, psf, noise=np.ones(shape))
            cfg = config.with_overrides({"core.correlated_errors": on, "psf-calib.in_mainloop": False})
            base = {"params": params, "sources": (np.zeros(0), np.zeros(0)), "valid": np.ones(shape, dtype=bool)}
            engine.fit_band(band, cfg, engine.Stages.from_config(cfg), base=base)
            fluxes[on].append(band.sersic.flux)
            quoted[on].append(band.sersic.flux_err_fixed_shape)
            factor = next(h["error_factor"] for h in band.history if h.get("stage") == "total")
            assert (factor > 2.5) if on else (factor == 1.0)
    np.testing.assert_allclose(fluxes[True], fluxes[False])  # only the errors change
    scatter = np.std(fluxes[True], ddof=1)
    assert scatter / np.median(quoted[False]) > 2.5  # measured: 3.75
    assert 0.7 < scatter / np.median(quoted[True]) < 1.4  # measured: 0.95
