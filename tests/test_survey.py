"""Batches of real sphot runs: executors agree, bad galaxies are rows, kill + resume."""

from __future__ import annotations

import csv
import functools
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from sphot_core import batch, runner
from sphot_core.simulate import simulate_to_file
from sphot_plugins.executors import DaskExecutor, DaskOptions, ProcessExecutor, ProcessOptions, SerialExecutor

FAST = ["core.iter_basefit=2", "core.iter_scalefit=1", "psf-calib.in_mainloop=false"]
GOOD = {"s01", "s02", "s03", "s04"}
BAD = {"s05": "InputError", "s06": "InputError"}


def settings(psf):
    return dict(
        psf=str(psf), config_file=None, sets=FAST, flags={}, base_filter=None, filters=None, forced=None,
        photometry=False, make_plot=False, resume=False, rerun=None,
    )


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """Six small simulated galaxies: four good, one corrupt file, one all-NaN cutout."""
    d = tmp_path_factory.mktemp("survey")
    paths = []
    psf = None
    for i, name in enumerate(sorted(GOOD | set(BAD))):
        p = d / f"{name}.h5"
        written = simulate_to_file(p, filters=("F150W", "F277W"), size=51, n_stars=8, seed=i, snr=200.0)
        psf = psf or written["psf"]
        paths.append(p)
    (d / "s05.h5").write_bytes((d / "s05.h5").read_bytes()[:2000])  # truncated: corrupt
    with h5py.File(d / "s06.h5", "r+") as f:
        for k in f:
            f[k][...] = np.nan
    return paths, psf


def test_identical_catalogues_through_every_executor(survey, tmp_path, request):
    paths, psf = survey
    process_one = functools.partial(runner.process_galaxy, settings=settings(psf))
    executors = [("serial", SerialExecutor()), ("processes", ProcessExecutor(ProcessOptions(jobs=2)))]
    if importlib.util.find_spec("distributed"):
        cluster = request.getfixturevalue("dask_cluster")
        executors.append(("dask", DaskExecutor(DaskOptions(scheduler=cluster.scheduler_address))))
    catalogues = {}
    for name, executor in executors:
        out = tmp_path / name
        with executor:
            result = batch.run_batch(paths, process_one, out, executor=executor, timeout=300)
        assert set(result.ok) == GOOD, (name, result)
        assert set(result.failed) == set(BAD)
        with open(result.report) as fh:
            rows = {r["galaxy"]: r for r in csv.DictReader(fh)}
        for galaxy, kind in BAD.items():
            assert rows[galaxy]["status"] == "failed" and rows[galaxy]["error"].startswith(kind), rows[galaxy]
        assert "no finite pixels" in rows["s06"]["error"]
        merged = batch.merge_catalogs([out], tmp_path / f"{name}_merged")
        assert merged.galaxies == tuple(sorted(GOOD))
        catalogues[name] = {k: Path(p).read_text() for k, p in (("galaxy", merged.galaxy_catalog), ("sources", merged.sources_catalog))}
    for name in catalogues:
        assert catalogues[name] == catalogues["serial"], f"{name} catalogue differs from serial"
    rows = list(csv.DictReader(catalogues["serial"]["galaxy"].splitlines()))
    assert [r["galaxy"] for r in rows] == sorted(list(GOOD) * 2)
    assert all(r["flux"] and float(r["flux"]) > 0 for r in rows)


def test_killed_batch_resumes_without_redoing_finished(survey, tmp_path):
    paths, psf = survey
    good = [p for p in paths if p.stem in GOOD]
    # more galaxies than workers, so the kill lands mid-way
    extra = []
    for i in range(4):
        q = tmp_path / f"k{i}.h5"
        q.write_bytes(good[i % len(good)].read_bytes())
        extra.append(q)
    inputs = good + extra
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sphot_core.cli", "-q", "run", *map(str, inputs), "--psf", str(psf), "--out", str(out), "--executor", "processes", "--jobs", "2"]
    for s in FAST:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report = out / "batch_report.csv"
    done = set()
    deadline = time.monotonic() + 240
    while len(done) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        if report.exists():
            with open(report) as fh:
                done = {r["galaxy"] for r in csv.DictReader(fh) if r["status"] == "ok"}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(report) as fh:
        rows = {r["galaxy"]: r for r in csv.DictReader(fh)}
    done = {g for g, r in rows.items() if r["status"] == "ok"}
    assert 2 <= len(done) < len(inputs)
    stamps = {g: (out / f"{g}_sphot.h5").stat().st_mtime_ns for g in done}
    code = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    with open(report) as fh:
        rows = {r["galaxy"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {p.stem for p in inputs} and all(r["status"] == "ok" for r in rows.values())
    # finished galaxies were not redone
    assert all((out / f"{g}_sphot.h5").stat().st_mtime_ns == stamps[g] for g in done)
    assert all(rows[g]["attempts"] == "1" for g in done)
