"""The command line: plugins, config, run (including every bad input), plot, simulate."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from sphot_core.simulate import DEFAULT_COLOURS, simulate_to_file

DATA = Path(__file__).parent / "plugins" / "data"
FAST = ["--set", "core.iter_basefit=2", "--set", "core.iter_scalefit=1", "--set", "psf-calib.in_mainloop=false"]


def sphot(*args, cwd=None, env_extra=None, pythonpath=()):
    """Run the real console script in a subprocess (exit code, stdout, stderr)."""
    env = dict(os.environ)
    env.update(env_extra or {})
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "sphot_core.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return simulate_to_file(d / "g1.h5", filters=("F150W", "F277W"), size=61, n_stars=15, seed=3)


def one_line_error(code, err, expected_code=None):
    lines = [line for line in err.strip().splitlines() if line.startswith("sphot: error:")]
    assert code != 0
    if expected_code is not None:
        assert code == expected_code, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_version_and_help():
    code, out, _ = sphot("--version")
    assert code == 0 and "sphot" in out
    code, out, _ = sphot("--help")
    assert code == 0 and "sphot demo" in out
    code, out, _ = sphot("run", "--help")
    assert code == 0 and "--refit NAME" in out and "--photometry" in out


def test_help_imports_no_plugin_or_numerics():
    code = (
        "import sys, sphot_core.cli as c\n"
        "from click.testing import CliRunner\n"
        "r = CliRunner().invoke(c.cli, ['run', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "bad = [m for m in ('sphot_plugins.optimizers', 'scipy', 'astropy', 'photutils', 'h5py') if m in sys.modules]\n"
        "print(bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_plugins_listing_and_json():
    code, out, _ = sphot("plugins")
    assert code == 0
    for name in ("iterative_NM", "dual_annealing", "lbfgsb", "levmar", "ladder", "forced", "nnls", "iterative", "plane", "gaussian", "moffat", "drizzle", "multi_source", "processes", "dask"):
        assert name in out
    assert "[sphot " in out  # origin package shown
    code, out, _ = sphot("plugins", "--json")
    data = json.loads(out)
    names = {r["name"]: r["distribution"] for r in data["stages"]["refit"]}
    assert names == {"iterative": "sphot", "nnls": "sphot", "none": "sphot"}
    assert data["stages"]["kernel"][0]["options"] is not None


def test_third_party_kernel_on_the_command_line(tmp_path):
    path = [DATA / "tophat_plugin"]
    code, out, _ = sphot("plugins", pythonpath=path)
    assert code == 0 and "tophat" in out and "sphot-tophat 1.0" in out
    code, out, err = sphot("config", "show", "--kernel", "TopHat", "--set", "psf-calib.tophat.supersample=3", pythonpath=path, cwd=tmp_path)
    assert code == 0, err
    assert 'family = "tophat"' in out and "[psf-calib.tophat]" in out and "supersample = 3" in out
    code, out, _ = sphot("--no-plugins", "plugins", pythonpath=path)
    assert code == 0 and "tophat" not in out
    code, _, err = sphot("config", "show", "--kernel", "tophat", pythonpath=path, cwd=tmp_path, env_extra={"SPHOT_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert "unknown kernel family 'tophat'" in one_line_error(code, err, 4)


def test_conflicting_and_broken_plugins(tmp_path):
    path = [DATA / "tophat_plugin", DATA / "conflict_plugin", DATA / "broken_plugin"]
    code, out, err = sphot("plugins", pythonpath=path)
    assert code == 0
    assert "claimed by" in err and "sphot-broken 0.1" in err and "failed to import" in err
    code, _, err = sphot("config", "show", "--kernel", "tophat", pythonpath=path, cwd=tmp_path)
    line = one_line_error(code, err, 4)
    assert "sphot-tophat 1.0" in line and "sphot-tophat-clone 2.0" in line


def test_config_show_sources(tmp_path):
    (tmp_path / "sphot_config.toml").write_text("[refit]\nmethod = 'iterative'\n")
    code, out, _ = sphot("config", "show", "--sources", "--set", "core.iter_basefit=3", "--sky", "constant", cwd=tmp_path)
    assert code == 0
    assert 'method = "iterative"  #' in out and "sphot_config.toml" in out
    assert "iter_basefit = 3  # --set" in out
    assert 'method = "constant"  # --sky' in out


def test_run_simulate_and_plot(sim, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = sphot("run", sim["galaxy"], "--psf", sim["psf"], "--out", out, "--jobs", "1", *FAST, "--photometry", "--plot", cwd=tmp_path)
    assert code == 0, err
    assert "F150W" in stdout and "wrote" in stdout
    for name in ("g1_sphot.h5", "g1_galaxy.csv", "g1_sources.csv", "g1_aperture.csv", "g1.png"):
        assert (out / name).stat().st_size > 0, name
    png = tmp_path / "again.png"
    code, _, err = sphot("plot", out / "g1_sphot.h5", "--out", png)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = sphot("simulate", tmp_path / "s.h5", "--filters", "F150W,F444W", "--size", "41", "--stars", "3")
    assert code == 0, err
    with h5py.File(tmp_path / "s.h5") as f:
        assert set(f) == {"F150W", "F444W"} and f["F150W"].shape == (41, 41)
    truth = json.loads((tmp_path / "s_truth.json").read_text())
    assert truth["base_filter"] == "F150W" and len(truth["stars"]["x"]) == 3
    for flag, f555w in (("--snr-every-band", 80.0), (None, 80.0 * 10 ** (-0.2 * DEFAULT_COLOURS["F555W"]))):
        args = ("simulate", tmp_path / "e.h5", "--filters", "F150W,F555W", "--size", "41", "--stars", "3", "--snr", "80")
        code, _, err = sphot(*args, *((flag,) if flag else ()))
        assert code == 0, err
        truth = json.loads((tmp_path / "e_truth.json").read_text())
        assert truth["bands"]["F150W"]["snr"] == 80.0
        assert truth["bands"]["F555W"]["snr"] == pytest.approx(f555w)


# ----------------------------------------------------------------- bad input


def _bad_galaxy_files(d: Path, good: Path):
    """name -> (galaxy path, extra args, expected message part)."""
    with h5py.File(good) as f:
        images = {k: f[k][()] for k in f}
    cases = {}

    def write(name, **changes):
        p = d / f"{name}.h5"
        with h5py.File(p, "w") as f:
            for k, v in {**images, **changes}.items():
                if v is not None:
                    f[k] = v
        return p

    (d / "text.h5").write_text("not an hdf5 file")
    (d / "corrupt.h5").write_bytes(good.read_bytes()[:3000])
    cases["missing file"] = (d / "nope.h5", [], "galaxy file not found")
    cases["not hdf5"] = (d / "text.h5", [], "is not an HDF5 file")
    cases["corrupt hdf5"] = (d / "corrupt.h5", [], "corrupt.h5")
    cases["filter missing from galaxy"] = (good, ["--filters", "F150W,F999W"], "filter F999W not in galaxy file")
    cases["shape mismatch"] = (write("shape", F277W=np.ones((30, 30))), [], "must share one pixel grid")
    cases["1-D dataset"] = (write("oned", F277W=np.ones(61)), [], "is 1-D")
    cases["all-NaN band"] = (write("nan", F277W=np.full((61, 61), np.nan)), [], "has no finite pixels")
    return cases


def test_bad_inputs_fail_cleanly(sim, tmp_path):
    good = sim["galaxy"]
    cases = _bad_galaxy_files(tmp_path, good)
    psf_dir = tmp_path / "psfs"
    psf_dir.mkdir()
    with h5py.File(sim["psf"]) as f:
        arrays = {k: f[k][()] for k in f}
    np.save(psf_dir / "F150W_PSF_Oversample4x.npy", arrays["F150W"])
    nan_psf = arrays["F277W"].copy()
    nan_psf[0, 0] = np.nan
    (tmp_path / "nanpsf").mkdir()
    np.save(tmp_path / "nanpsf" / "F150W_PSF_Oversample4x.npy", arrays["F150W"])
    np.save(tmp_path / "nanpsf" / "F277W_PSF_Oversample4x.npy", nan_psf)
    (tmp_path / "zeropsf").mkdir()
    np.save(tmp_path / "zeropsf" / "F150W_PSF_Oversample4x.npy", arrays["F150W"])
    np.save(tmp_path / "zeropsf" / "F277W_PSF_Oversample4x.npy", np.zeros_like(arrays["F277W"]))
    (tmp_path / "broken.toml").write_text("[core\nbase_filter = 'F150W'\n")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    cases["filter missing from PSF source"] = (good, ["--psf", psf_dir], "no PSF for filter F277W")
    cases["PSF with NaN"] = (good, ["--psf", tmp_path / "nanpsf"], "contains NaN")
    cases["PSF with zero sum"] = (good, ["--psf", tmp_path / "zeropsf"], "non-positive sum")
    cases["unknown strategy"] = (good, ["--refit", "nnl"], "unknown refit strategy 'nnl'")
    cases["unknown config key"] = (good, ["--set", "core.bogus=1"], "unknown option 'bogus'")
    cases["broken TOML"] = (good, ["--config", tmp_path / "broken.toml"], "TOML syntax error")
    cases["output directory not writable"] = (good, ["--out", blocker / "sub"], "cannot create output directory")
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "g1_galaxy.csv"
    keep.write_text("an earlier good output\n")
    for label, (galaxy, extra, message) in cases.items():
        args = ["run", galaxy, "--out", out, *FAST]
        if "--psf" not in extra:
            args += ["--psf", sim["psf"]]
        code, _, err = sphot(*args, *extra, cwd=tmp_path)
        line = one_line_error(code, err)
        assert message in line, (label, line)
        # nothing half-written, nothing earlier lost
        assert keep.read_text() == "an earlier good output\n", label
        assert sorted(p.name for p in out.iterdir()) == ["g1_galaxy.csv"], (label, list(out.iterdir()))


def test_traceback_only_with_verbose(tmp_path):
    code, _, err = sphot("-v", "run", tmp_path / "nope.h5", "--psf", tmp_path)
    assert code == 3 and "Traceback" in err and "galaxy file not found" in err


def test_batch_reports_bad_galaxies(sim, tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_text("corrupt")
    out = tmp_path / "batch"
    code, _, err = sphot("run", sim["galaxy"], bad, "--psf", sim["psf"], "--out", out, "--executor", "serial", *FAST, cwd=tmp_path)
    assert code == 8, err
    report = (out / "batch_report.csv").read_text()
    rows = {line.split(",")[0]: line for line in report.splitlines()[1:]}
    assert ",ok," in rows["g1"]
    assert "bad" in report and "failed" in report and "not an HDF5 file" in report
    assert (out / "g1_galaxy.csv").exists() and (out / "batch_logs" / "bad.log").exists()


def test_merge_and_resume_keep_the_stored_config(sim, tmp_path):
    out = tmp_path / "out"
    code, _, err = sphot("run", sim["galaxy"], "--psf", sim["psf"], "--out", out, "--jobs", "1", *FAST, "--set", "core.iter_scalefit=2", cwd=tmp_path)
    assert code == 0, err
    # a resume without repeating --set continues with the stored settings
    code, _, err = sphot("run", sim["galaxy"], "--psf", sim["psf"], "--out", out, "--resume", cwd=tmp_path)
    assert code == 0, err
    with h5py.File(out / "g1_sphot.h5") as f:
        stored = f.attrs["config"]
    assert "iter_scalefit = 2" in stored and "iter_basefit = 2" in stored
    merged = tmp_path / "merged"
    code, stdout, err = sphot("merge", out, "--out", merged)
    assert code == 0, err
    assert "catalog_galaxy.csv" in stdout and "catalog_sources.csv" in stdout
    rows = (merged / "catalog_galaxy.csv").read_text().splitlines()
    assert rows[0].startswith("galaxy,filter,") and len(rows) == 3


def test_demo_recovers_its_truth(tmp_path, capsys):
    """The README's first command: simulate, fit, plot, compare (in-process, one job)."""
    from sphot_core.demo import run_demo

    out_dir = tmp_path / "demo"
    comparison = run_demo(out_dir, jobs=1)
    printed = capsys.readouterr().out
    assert "fitted versus true" in printed
    names = {p.name for p in out_dir.iterdir()}
    assert {"demo_galaxy_galaxy.csv", "demo_galaxy_sources.csv", "demo_galaxy_sphot.h5", "demo_galaxy_aperture.csv"} <= names
    assert set(comparison["bands"]) == {"F090W", "F150W", "F277W"}
    for flt, band in comparison["bands"].items():
        assert abs(band["mag_fit"] - band["mag_true"]) < 0.05, flt
        assert band["stars_found"] >= 0.9 * band["stars_bright"] > 0, flt
        if flt != "F150W":
            # colours within 4 sigma of the quoted colour error, which is not tiny
            assert 0.001 < band["colour_err"] < 0.05, flt
            assert abs(band["colour_fit"] - band["colour_true"]) < 4 * band["colour_err"], flt
