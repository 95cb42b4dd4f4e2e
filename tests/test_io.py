"""Readers, writers, atomic outputs and the CSV layouts of INTERFACE.md."""

from __future__ import annotations

import csv
import os
import shutil

import h5py
import numpy as np
import pytest

from sphot_core.config import load_config
from sphot_core.data import Band, Galaxy, SourceTable
from sphot_core.errors import InputError, OutputError
from sphot_core.flags import GALAXY_FLAGS
from sphot_core.io import (
    GALAXY_COLUMNS,
    SOURCE_COLUMNS,
    atomic_path,
    ensure_output_dir,
    load_galaxy,
    zeropoint_mjy_per_sr,
    read_galaxy_file,
    read_psfs,
    read_sphot,
    write_outputs,
    write_sphot,
)
from sphot_core.psf import PSFModel
from sphot_core.stages import KernelFit, SersicResult, SkyResult


@pytest.fixture(scope="module")
def config():
    return load_config(use_user_config=False)


def gaussian_psf(n=41, sigma=6.0, oversample=4):
    y, x = np.mgrid[:n, :n] - n // 2
    return np.exp(-0.5 * (x**2 + y**2) / sigma**2)


def make_galaxy_file(path, shape=(40, 50), filters=("F150W", "F277W"), **overrides):
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for flt in filters:
            f[flt] = overrides.get(flt, rng.normal(1.0, 0.1, shape))
    return path


def make_psf_dir(path, filters=("F150W", "F277W"), **overrides):
    path.mkdir(exist_ok=True)
    for flt in filters:
        np.save(path / f"{flt}_PSF_Oversample4x.npy", overrides.get(flt, gaussian_psf()))
    return path


def fitted(galaxy: Galaxy) -> Galaxy:
    """Attach results to every band, as the engine would."""
    rng = np.random.default_rng(3)
    for band in galaxy.bands.values():
        shape = band.shape
        band.noise = np.full(shape, 0.1)
        band.mask = rng.random(shape) < 0.01
        band.galaxy_model = rng.random(shape)
        band.star_model = rng.random(shape)
        band.sky_model = np.full(shape, 0.5)
        names = ("x_0", "y_0", "amplitude", "r_eff", "n", "ellip", "theta")
        params = dict(zip(names, (10.5, 12.25, 0.8, 7.0, 2.5, 0.3, 1.2)))
        band.sersic = SersicResult(
            params=params,
            errors={k: 0.01 for k in names},
            names=names,
            covariance=np.diag(np.full(7, 1e-4)),
            flux=123.4,
            flux_err=1.5,
            loss=1.01,
            chi2=1000.0,
            dof=990,
            success=True,
            message="ok",
            nfev=42,
            flags=GALAXY_FLAGS.AT_LOWER_BOUND,
            optimizer="levmar",
            flux_err_fixed_shape=0.6,
        )
        band.sources = SourceTable.from_columns([3.0, 20.5], [4.0, 7.25], [10.0, 20.0], flux_err=[1.0, 2.0], flags=[0, 8])
        band.sky = SkyResult(band.sky_model, {"c0": 0.5, "cx": 0.0, "cy": 0.0}, "plane")
        band.kernel = KernelFit("gaussian", {"sigma": 0.9}, band.psf, 1.0, 2.0, 30, True, "ok", {"iterations": 3})
        band.kernel_history = [{"iteration": 0, "params": {"sigma": 0.9}}]
        band.history = [{"iteration": 0, "loss": 1.0}]
        band.status = "done"
        band.stages_done = ["basefit"]
    galaxy.crop_offset = (5, 7)
    galaxy.meta = {"centre_guess": [20.0, 21.0]}
    return galaxy


def assert_same_band(a: Band, b: Band):
    for name in ("data", "noise", "mask", "galaxy_model", "star_model", "sky_model"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert np.array_equal(x, y, equal_nan=True), name
    for name in ("psf", "library_psf"):
        pa, pb = getattr(a, name), getattr(b, name)
        assert np.array_equal(pa.array, pb.array) and pa.oversample == pb.oversample and pa.origin == pb.origin
    if a.sersic is not None:
        assert a.sersic.params == b.sersic.params and a.sersic.errors == b.sersic.errors
        assert np.array_equal(a.sersic.covariance, b.sersic.covariance)
        assert (a.sersic.flux, a.sersic.flags, a.sersic.names) == (b.sersic.flux, b.sersic.flags, b.sersic.names)
        assert (a.sersic.flux_err, a.sersic.flux_err_fixed_shape) == (b.sersic.flux_err, b.sersic.flux_err_fixed_shape)
    assert a.sources == b.sources
    assert (a.status, a.flags, a.zeropoint, a.history, a.kernel_history, a.stages_done) == (
        b.status, b.flags, b.zeropoint, b.history, b.kernel_history, b.stages_done,
    )
    if a.kernel is not None:
        assert a.kernel.params == b.kernel.params and a.kernel.family == b.kernel.family


def test_round_trip_of_every_real_galaxy(galaxy_dir, psf_dir, config, tmp_path):
    files = sorted(galaxy_dir.glob("*.h5"))
    assert files
    for path in files:
        galaxy = load_galaxy(path, psf_dir, config=config)
        assert galaxy.name == path.stem and galaxy.input_shape == (255, 255)
        assert len(galaxy.bands) == 6
        if path.stem == "g260":
            fitted(galaxy)
        out = write_sphot(galaxy, tmp_path / f"{galaxy.name}_sphot.h5", config.to_toml())
        back, text = read_sphot(out)
        assert back.name == galaxy.name and back.base_filter == "F150W"
        assert back.crop_offset == galaxy.crop_offset and back.meta == galaxy.meta
        assert text == config.to_toml()
        for flt in galaxy.filters:
            assert_same_band(galaxy.bands[flt], back.bands[flt])


def test_real_psfs_are_normalised_and_sampled(psf_dir):
    psfs = read_psfs(psf_dir, ["F150W", "F555W", "F160W"])
    for flt, psf in psfs.items():
        assert psf.oversample == 4
        os_ = psf.oversample
        oy, ox = psf.origin
        assert psf.origin == (psf.array.shape[0] // 2, psf.array.shape[1] // 2)
        assert np.isclose(psf.array[oy % os_ :: os_, ox % os_ :: os_].sum(), 1.0)
        assert np.isclose(psf.grid_kernel.sum(), 1.0)
    # F160W: the light centroid is ~0.4 px away from the origin, which stays the middle element
    dx, dy = psfs["F160W"].centroid_offset
    assert np.hypot(dx, dy) > 0.3


def test_zeropoints(config):
    # MJy/sr at 0.03"/px: m = -6.10 - 2.5 log10(S x 2.1154e-14)
    assert zeropoint_mjy_per_sr(0.03) == pytest.approx(-6.10 - 2.5 * np.log10(2.1154e-14), abs=2e-3)
    cfg = config.with_overrides({"zeropoints.F150W": 25.0})
    from sphot_core.io import zeropoint_for

    assert zeropoint_for("F150W", {}, cfg) == 25.0
    assert zeropoint_for("F277W", {"zeropoint": 24.0}, cfg) == 24.0
    assert zeropoint_for("F277W", {}, cfg) == pytest.approx(28.087, abs=1e-3)
    assert zeropoint_for("F277W", {}, cfg.with_overrides({"prep.image_units": ""})) is None


def test_psf_hdf5_file_of_the_original_tool(tmp_path, config):
    psf = tmp_path / "PSFdata.h5"
    with h5py.File(psf, "w") as f:
        f.attrs["oversample"] = 4
        f["F150W"] = gaussian_psf() * 16.5  # any normalisation
        f["F277W"] = gaussian_psf(sigma=9.0)
    psfs = read_psfs(psf, ["F150W", "F277W"])
    assert psfs["F150W"].oversample == 4 and np.isclose(psfs["F150W"].grid_kernel.sum(), 1)
    galaxy = load_galaxy(make_galaxy_file(tmp_path / "g.h5"), psf, config=config)
    assert set(galaxy.bands) == {"F150W", "F277W"}


def test_csv_columns_and_input_grid_coordinates(tmp_path, config):
    galaxy = fitted(load_galaxy(make_galaxy_file(tmp_path / "g.h5"), make_psf_dir(tmp_path / "psf"), config=config))
    galaxy.bands["F277W"].status = "failed"
    galaxy.bands["F277W"].message = "boom"
    paths = write_outputs(galaxy, tmp_path / "out", config.to_toml())
    with open(paths["galaxy"]) as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == GALAXY_COLUMNS
    # INTERFACE.md's columns first, in its order; additions only after them
    assert GALAXY_COLUMNS[:17] == (
        "filter", "x_0", "y_0", "amplitude", "r_eff", "n", "ellip", "theta", "flux", "flux_err",
        "mag", "mag_err", "sky", "chi2_dof", "n_sources", "converged", "flags",
    )
    row = dict(zip(rows[0], rows[1]))
    assert float(row["x_0"]) == 10.5 + 5 and float(row["y_0"]) == 12.25 + 7
    assert float(row["flux"]) == 123.4
    assert float(row["mag"]) == pytest.approx(-2.5 * np.log10(123.4) + 28.0866, abs=1e-3)
    assert float(row["mag_err"]) == pytest.approx(1.0857 * 1.5 / 123.4, rel=1e-3)
    assert float(row["mag_err_colour"]) == pytest.approx(1.0857 * 0.6 / 123.4, rel=1e-3)
    assert row["converged"] == "true" and int(row["flags"]) == GALAXY_FLAGS.AT_LOWER_BOUND
    assert int(row["n_sources"]) == 2 and float(row["sky"]) == 0.5
    failed = dict(zip(rows[0], rows[2]))
    assert failed["flux"] == "" and failed["converged"] == "false"
    assert int(failed["flags"]) & GALAXY_FLAGS.BAND_FAILED
    with open(paths["sources"]) as fh:
        src = list(csv.reader(fh))
    assert tuple(src[0]) == SOURCE_COLUMNS
    assert len(src) == 3  # failed band's sources are not reported
    assert float(src[2][2]) == 20.5 + 5 and float(src[2][3]) == 7.25 + 7


def test_atomic_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_failed_h5_write_keeps_previous_output(tmp_path, config):
    galaxy = load_galaxy(make_galaxy_file(tmp_path / "g.h5"), make_psf_dir(tmp_path / "psf"), config=config)
    out = write_sphot(galaxy, tmp_path / "g_sphot.h5", "x = 1")
    before = out.read_bytes()
    galaxy.bands["F150W"].data = np.array(["not", "numbers"], dtype=object)
    with pytest.raises(Exception):
        write_sphot(galaxy, out, "x = 2")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_output_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot create output directory"):
        ensure_output_dir(blocker / "sub")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(OutputError, match="not writable"):
            ensure_output_dir(ro)


# ------------------------------------------------------------------ bad input


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(InputError, match="galaxy file not found"):
        read_galaxy_file(tmp_path / "nope.h5")
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(InputError, match="is not an HDF5 file"):
        read_galaxy_file(text)


def test_corrupt_hdf5(tmp_path, galaxy_dir):
    src = galaxy_dir / "g260.h5"
    bad = tmp_path / "corrupt.h5"
    bad.write_bytes(src.read_bytes()[: 200_000])  # truncated: header fine, data missing
    with pytest.raises(InputError) as err:
        read_galaxy_file(bad)
    assert "corrupt" in str(err.value) or "cannot" in str(err.value)
    assert str(bad) in str(err.value)


def test_filter_missing_and_shape_problems(tmp_path):
    g = make_galaxy_file(tmp_path / "g.h5")
    with pytest.raises(InputError, match=r"filter F999W not in galaxy file .*available: F150W, F277W"):
        read_galaxy_file(g, ["F150W", "F999W"])
    g2 = make_galaxy_file(tmp_path / "g2.h5", F277W=np.ones((30, 30)))
    with pytest.raises(InputError, match="must share one pixel grid"):
        read_galaxy_file(g2)
    g3 = make_galaxy_file(tmp_path / "g3.h5", F277W=np.ones(30))
    with pytest.raises(InputError, match="is 1-D"):
        read_galaxy_file(g3)
    g4 = make_galaxy_file(tmp_path / "g4.h5", F277W=np.full((40, 50), np.nan))
    with pytest.raises(InputError, match="band F277W of .* has no finite pixels"):
        read_galaxy_file(g4)


def test_psf_problems(tmp_path, config):
    g = make_galaxy_file(tmp_path / "g.h5")
    with pytest.raises(InputError, match="no PSF for filter F277W"):
        load_galaxy(g, make_psf_dir(tmp_path / "p1", filters=("F150W",)), config=config)
    nan = gaussian_psf()
    nan[3, 3] = np.nan
    with pytest.raises(InputError, match="PSF for F277W .* contains NaN"):
        load_galaxy(g, make_psf_dir(tmp_path / "p2", F277W=nan), config=config)
    with pytest.raises(InputError, match="non-positive sum"):
        load_galaxy(g, make_psf_dir(tmp_path / "p3", F277W=np.zeros((41, 41))), config=config)
    with pytest.raises(InputError, match="even shape"):
        load_galaxy(g, make_psf_dir(tmp_path / "p4", F277W=gaussian_psf(n=40)), config=config)
    # an explicit origin makes an even array acceptable
    cfg = config.with_overrides({"prep.psf_origin": {"F277W": [20, 20]}})
    galaxy = load_galaxy(g, tmp_path / "p4", config=cfg)
    assert galaxy.bands["F277W"].psf.origin == (20, 20)
    with pytest.raises(InputError, match="no PSF source given"):
        load_galaxy(g, None, config=config)


def test_base_filter_must_be_loaded(tmp_path, config):
    g = make_galaxy_file(tmp_path / "g.h5", filters=("F090W",))
    with pytest.raises(InputError, match="base filter F150W is not among"):
        load_galaxy(g, make_psf_dir(tmp_path / "p", filters=("F090W",)), config=config)


def test_sphot_file_validation(tmp_path):
    plain = make_galaxy_file(tmp_path / "g.h5")
    with pytest.raises(InputError, match="not a sphot output file"):
        read_sphot(plain)


def test_bands_and_galaxies_pickle(tmp_path, config):
    """Bands travel to worker processes and back."""
    import pickle

    galaxy = fitted(load_galaxy(make_galaxy_file(tmp_path / "g.h5"), make_psf_dir(tmp_path / "psf"), config=config))
    back = pickle.loads(pickle.dumps(galaxy))
    for flt in galaxy.filters:
        assert_same_band(galaxy.bands[flt], back.bands[flt])
    assert back.bands["F150W"].sources.x.tolist() == [3.0, 20.5]
