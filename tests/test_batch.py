"""The batch driver on toy galaxies: executors agree, failures are rows, resume, shards, merge."""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import pid_gone
from sphot_core import batch
from sphot_core.errors import ConfigError, DegenerateCutoutError, InputError, OutputError
from sphot_core.io import write_csv
from sphot_plugins.executors import DaskExecutor, DaskOptions, ProcessExecutor, ProcessOptions, SerialExecutor

FILTERS = ("F150W", "F277W")
SIZE = 41
TESTS = Path(__file__).resolve().parent


# --------------------------------------------------------------- toy galaxies


def make_galaxy(path, seed, kind="good", sleep=0.0):
    """A small two-filter HDF5 cutout (the layout of the real data) with known truth.

    ``kind``: ``"good"`` (Gaussian galaxy + 3 stars + noise), ``"corrupt"`` (not HDF5)
    or ``"nan"`` (every pixel NaN). Returns the true galaxy centre (x, y).
    """
    import h5py

    path = Path(path)
    if kind == "corrupt":
        path.write_bytes(b"this is not an HDF5 file\n" * 10)
        return None
    rng = np.random.default_rng(seed)
    x0, y0 = rng.uniform(18.0, 22.0, 2)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(float)
    stars = [(6.0, 7.0), (34.0, 9.0), (8.0, 33.0)]
    with h5py.File(path, "w") as h5:
        for k, flt in enumerate(FILTERS):
            image = 50.0 * (k + 1) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 3.0**2))
            for sx, sy in stars:
                image += 80.0 * np.exp(-((xx - sx) ** 2 + (yy - sy) ** 2) / (2 * 0.8**2))
            image += 2.0 + rng.normal(0.0, 0.5, image.shape)
            if kind == "nan":
                image[:] = np.nan
            h5.create_dataset(flt, data=image)
        h5.attrs["toy_sleep"] = sleep
    return float(x0), float(y0)


def measure_galaxy(path, out_dir):
    """Toy ``process_one``: centroid, flux and bright peaks per filter -> NAME_*.csv.

    Appends its pid to ``NAME.runs`` so tests can count how often a galaxy ran.
    """
    import h5py

    name = Path(path).stem
    out = Path(out_dir)
    with open(out / f"{name}.runs", "a") as fh:
        fh.write(f"{os.getpid()}\n")
    try:
        with h5py.File(path, "r") as h5:
            images = {flt: h5[flt][()] for flt in FILTERS}
            time.sleep(float(h5.attrs.get("toy_sleep", 0.0)))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}", path=str(path)) from None
    galaxy_rows, source_rows = [], []
    for flt, image in images.items():
        if not np.isfinite(image).any():
            raise DegenerateCutoutError(f"{path}: no finite pixels in {flt}", path=str(path), filter=flt)
        sky = float(np.median(np.concatenate([image[:3].ravel(), image[-3:].ravel()])))
        signal_ = np.where(np.isfinite(image), image - sky, 0.0)
        yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
        centre = (xx - 20) ** 2 + (yy - 20) ** 2 < 10**2
        w = np.clip(signal_, 0, None) * centre
        x_0, y_0 = float((w * xx).sum() / w.sum()), float((w * yy).sum() / w.sum())
        peaks = [
            (x, y)
            for y in range(1, image.shape[0] - 1)
            for x in range(1, image.shape[1] - 1)
            if signal_[y, x] > 20 and (x - x_0) ** 2 + (y - y_0) ** 2 > 8**2
            and signal_[y, x] == signal_[y - 1 : y + 2, x - 1 : x + 2].max()
        ]
        galaxy_rows.append({"filter": flt, "x_0": x_0, "y_0": y_0, "flux": float(w.sum()), "sky": sky,
                            "n_sources": len(peaks), "converged": True, "flags": 0})
        for i, (x, y) in enumerate(peaks, 1):
            source_rows.append({"filter": flt, "id": i, "x": x, "y": y, "flux": float(signal_[y, x]), "flags": 0})
    columns = ("filter", "x_0", "y_0", "flux", "sky", "n_sources", "converged", "flags")
    write_csv(out / f"{name}_galaxy.csv", columns, galaxy_rows)
    write_csv(out / f"{name}_sources.csv", ("filter", "id", "x", "y", "flux", "flags"), source_rows)
    return {"n_filters": len(images), "n_sources": len(source_rows), "filters": list(images)}


def outputs_exist(path, out_dir):
    name = Path(path).stem
    return all((Path(out_dir) / f"{name}_{kind}.csv").exists() for kind in ("galaxy", "sources"))


def runs(out_dir, name):
    path = Path(out_dir) / f"{name}.runs"
    return path.read_text().split() if path.exists() else []


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def report_rows(out_dir, name="batch_report.csv"):
    return {row["galaxy"]: row for row in read_rows(Path(out_dir) / name)}


@pytest.fixture
def survey(tmp_path):
    """Six toy galaxies: four good, one corrupt file, one all-NaN cutout."""
    folder = tmp_path / "in"
    folder.mkdir()
    truth, paths = {}, []
    for i, kind in enumerate(["good", "good", "corrupt", "good", "nan", "good"]):
        path = folder / f"g{i:03d}.h5"
        truth[path.stem] = make_galaxy(path, seed=i, kind=kind)
        paths.append(path)
    return paths, truth


GOOD = {"g000", "g001", "g003", "g005"}
BAD = {"g002": "InputError", "g004": "DegenerateCutoutError"}


# ------------------------------------------------------------------ executors


def _executors(dask_cluster):
    yield "serial", SerialExecutor()
    yield "processes", ProcessExecutor(ProcessOptions(jobs=2))
    if dask_cluster is not None:
        yield "dask", DaskExecutor(DaskOptions(scheduler=dask_cluster.scheduler_address))


def test_identical_catalogues_through_every_executor(survey, tmp_path, request):
    paths, truth = survey
    cluster = request.getfixturevalue("dask_cluster") if importlib.util.find_spec("distributed") else None
    catalogues = {}
    for name, executor in _executors(cluster):
        out = tmp_path / name
        with executor:
            result = batch.run_batch(paths, measure_galaxy, out, executor=executor, timeout=60)
        assert set(result.ok) == GOOD and set(result.failed) == set(BAD) and not result.all_ok
        rows = report_rows(out)
        assert list(rows) == sorted(rows)  # deterministic row order
        for galaxy, kind in BAD.items():
            assert rows[galaxy]["status"] == "failed" and rows[galaxy]["error"].startswith(kind + ":")
            log_text = (out / rows[galaxy]["log"]).read_text()
            assert "Traceback" in log_text and kind in log_text
        for galaxy in GOOD:
            assert rows[galaxy]["status"] == "ok" and rows[galaxy]["n_filters"] == "2"
            assert rows[galaxy]["filters"] == '["F150W", "F277W"]'
        merged = batch.merge_catalogs([out], tmp_path / f"{name}_merged")
        assert merged.galaxies == tuple(sorted(GOOD))
        catalogues[name] = {kind: Path(p).read_bytes() for kind, p in
                            (("galaxy", merged.galaxy_catalog), ("sources", merged.sources_catalog))}
    assert catalogues["processes"] == catalogues["serial"]
    if cluster is not None:
        assert catalogues["dask"] == catalogues["serial"]
    # the toy measurement is real: it recovers the simulated centres and the 3 stars
    rows = read_rows(tmp_path / "serial_merged" / "catalog_galaxy.csv")
    assert [r["galaxy"] for r in rows] == sorted(list(GOOD) * len(FILTERS))
    for r in rows:
        x0, y0 = truth[r["galaxy"]]
        assert abs(float(r["x_0"]) - x0) < 0.3 and abs(float(r["y_0"]) - y0) < 0.3
        assert r["n_sources"] == "3"
    sources = read_rows(tmp_path / "serial_merged" / "catalog_sources.csv")
    assert list(sources[0]) == ["galaxy", "filter", "id", "x", "y", "flux", "flags"]
    assert len(sources) == 3 * len(FILTERS) * len(GOOD)


# --------------------------------------------------------------- resume/retry


def test_resume_skips_done_and_retries_failed_only_when_asked(survey, tmp_path):
    paths, _ = survey
    out = tmp_path / "out"
    ex = SerialExecutor()
    first = batch.run_batch(paths, measure_galaxy, out, executor=ex)
    assert set(first.failed) == set(BAD)

    again = batch.run_batch(paths, measure_galaxy, out, executor=ex, resume=True, is_done=outputs_exist)
    assert again.ok == () and again.failed == ()
    assert set(again.skipped_done) == GOOD and set(again.skipped_failed) == set(BAD)
    assert all(len(runs(out, p.stem)) == 1 for p in paths)

    make_galaxy(paths[2], seed=2)  # the corrupt file is replaced by a good one
    (out / "g003_sources.csv").unlink()  # and one finished galaxy lost an output
    retry = batch.run_batch(paths, measure_galaxy, out, executor=ex, resume=True, retry_failed=True,
                            is_done=outputs_exist)
    assert set(retry.ok) == {"g002", "g003"} and retry.failed == ("g004",)
    assert set(retry.skipped_done) == GOOD - {"g003"}
    counts = {p.stem: len(runs(out, p.stem)) for p in paths}
    assert counts == {"g000": 1, "g001": 1, "g002": 2, "g003": 2, "g004": 2, "g005": 1}
    rows = report_rows(out)
    assert rows["g002"]["status"] == "ok" and rows["g002"]["attempts"] == "2" and rows["g002"]["error"] == ""
    assert not (out / batch.LOG_DIR / "g002.log").exists()  # stale error log removed
    assert rows["g004"]["status"] == "failed" and rows["g004"]["attempts"] == "2"

    fresh = batch.run_batch(paths[:1], measure_galaxy, out, executor=ex)  # no resume: runs again
    assert fresh.ok == ("g000",) and len(runs(out, "g000")) == 2
    assert set(report_rows(out)) == {p.stem for p in paths}  # rows of other galaxies are kept


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_batch import measure_galaxy
from sphot_core.batch import run_batch
from sphot_plugins.executors import ProcessExecutor, ProcessOptions

if __name__ == "__main__":
    with ProcessExecutor(ProcessOptions(jobs=2)) as ex:
        run_batch(sys.argv[2:], measure_galaxy, sys.argv[1], executor=ex)
"""


def test_killed_batch_resumes_without_redoing_finished(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    paths = [inputs / f"k{i:02d}.h5" for i in range(6)]
    for i, path in enumerate(paths):
        make_galaxy(path, seed=i, sleep=0.3)
    out = tmp_path / "out"
    script = tmp_path / "batch_script.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT.format(tests=str(TESTS))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(script), str(out), *map(str, paths)], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    report = out / "batch_report.csv"
    deadline = time.monotonic() + 60
    done_before = set()
    while len(done_before) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        if report.exists():
            done_before = {g for g, row in report_rows(out).items() if row["status"] == "ok"}
    proc.send_signal(signal.SIGKILL)  # no clean-up at all
    proc.wait()
    rows = report_rows(out)
    done_before = {g for g, row in rows.items() if row["status"] == "ok"}
    assert 2 <= len(done_before) < len(paths), stderr_path.read_text()
    assert all(row["status"] in ("ok", "pending") for row in rows.values())
    # orphaned workers notice their parent died and exit
    worker_pids = {int(pid) for p in paths for pid in runs(out, p.stem)}
    assert all(pid_gone(pid) for pid in worker_pids)

    with ProcessExecutor(ProcessOptions(jobs=2)) as ex:
        result = batch.run_batch(paths, measure_galaxy, out, executor=ex, resume=True, is_done=outputs_exist)
    assert set(result.skipped_done) == done_before
    assert set(result.ok) == {p.stem for p in paths} - done_before and result.all_ok
    assert all(len(runs(out, g)) == 1 for g in done_before)  # finished galaxies were not redone
    assert all(row["status"] == "ok" for row in report_rows(out).values())


# --------------------------------------------------------------------- shards


def test_shards_partition_the_galaxies_deterministically():
    names = [f"gal{i:04d}" for i in range(200)]
    for count in (1, 3, 7):
        parts = [batch.select_shard(names, (i, count)) for i in range(count)]
        assert sorted(n for part in parts for n in part) == names  # a partition ...
        assert sum(map(len, parts)) == len(names)
        assert all(len(part) > len(names) / count / 2 for part in parts)  # ... roughly balanced
        reordered = [batch.select_shard(names[::-1], f"{i}/{count}") for i in range(count)]
        assert [sorted(p) for p in reordered] == [sorted(p) for p in parts]  # order-independent
    # adding galaxies never moves existing ones between shards
    assert set(batch.select_shard(names[:50], (1, 3))) == set(batch.select_shard(names, (1, 3))) & set(names[:50])


@pytest.mark.parametrize("text", ["3/3", "-1/4", "1/0", "a/b", "1-4", "", "1/2/3"])
def test_parse_shard_rejects_bad_input(text):
    with pytest.raises(ConfigError, match="shard"):
        batch.parse_shard(text)


def test_sharded_runs_share_a_folder_and_merge_like_one_run(survey, tmp_path):
    paths, _ = survey
    assert batch.parse_shard(" 1 / 2 ") == (1, 2)
    shared = tmp_path / "shared"
    results = [batch.run_batch(paths, measure_galaxy, shared, executor=SerialExecutor(), shard=f"{i}/2")
               for i in range(2)]
    reports = sorted(p.name for p in shared.glob("batch_report*.csv"))
    assert reports == ["batch_report.shard-0-of-2.csv", "batch_report.shard-1-of-2.csv"]
    assert sorted(g for r in results for g in r.ok + r.failed) == sorted(p.stem for p in paths)
    single = tmp_path / "single"
    batch.run_batch(paths, measure_galaxy, single, executor=SerialExecutor())
    a = batch.merge_catalogs([shared], tmp_path / "m1")
    b = batch.merge_catalogs([single], tmp_path / "m2")
    assert Path(a.galaxy_catalog).read_bytes() == Path(b.galaxy_catalog).read_bytes()
    assert Path(a.sources_catalog).read_bytes() == Path(b.sources_catalog).read_bytes()


# ------------------------------------------------------------------ inputs


def test_read_list_comments_blanks_and_relative_paths(tmp_path):
    sub = tmp_path / "lists"
    sub.mkdir()
    listing = sub / "galaxies.txt"
    listing.write_text("# survey\n\na.h5\n  ../data/b.h5   # second\n/abs/c.h5\n#d.h5\n")
    assert batch.read_list(listing) == [sub / "a.h5", sub / "../data/b.h5", Path("/abs/c.h5")]
    with pytest.raises(InputError, match="cannot read the galaxy list"):
        batch.read_list(tmp_path / "missing.txt")


def test_bad_inputs_are_input_errors(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(InputError, match="share the galaxy name"):
        batch.run_batch([tmp_path / "x.h5", tmp_path / "a" / "x.h5"], measure_galaxy, tmp_path / "o",
                        executor=SerialExecutor())
    with pytest.raises(InputError, match="no galaxy files"):
        batch.run_batch([], measure_galaxy, tmp_path / "o", executor=SerialExecutor())


def test_second_batch_on_the_same_report_is_refused(survey, tmp_path):
    paths, _ = survey
    out = tmp_path / "out"
    out.mkdir()
    with batch._exclusive(out / "batch_report.csv"):
        with pytest.raises(OutputError, match="another running sphot batch"):
            batch.run_batch(paths, measure_galaxy, out, executor=SerialExecutor())


# ----------------------------------------------------------------------- merge


def test_merge_rules(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
    write_csv(a / "m2_galaxy.csv", ("filter", "flux"),
              [{"filter": "F150W", "flux": 1.5}, {"filter": "F090W", "flux": 2}])
    write_csv(b / "m1_galaxy.csv", ("filter", "flux", "extra"), [{"filter": "F150W", "flux": 3, "extra": "x"}])
    write_csv(b / "m3_galaxy.csv", ("filter", "flux"), [{"filter": "F150W", "flux": 9}])  # stale: failed since
    write_csv(b / "batch_report.csv", batch.REPORT_COLUMNS,
              [{"galaxy": "m3", "status": "failed"}, {"galaxy": "m1", "status": "ok"}])
    write_csv(b / "m1_sources.csv", ("filter", "id", "x"),
              [{"filter": "F150W", "id": 2, "x": 1.0}, {"filter": "F150W", "id": 1, "x": 2.0}])
    result = batch.merge_catalogs([a, b], tmp_path / "out")
    assert result.galaxies == ("m1", "m2") and result.excluded == ("m3",)
    assert Path(result.galaxy_catalog).read_text() == (
        "galaxy,filter,flux,extra\nm1,F150W,3,x\nm2,F150W,1.5,\nm2,F090W,2,\n"
    )
    assert Path(result.sources_catalog).read_text() == "galaxy,filter,id,x\nm1,F150W,2,1\nm1,F150W,1,2\n"
    write_csv(a / "m1_galaxy.csv", ("filter",), [{"filter": "F150W"}])
    with pytest.raises(InputError, match="two folders"):
        batch.merge_catalogs([a, b], tmp_path / "out")
    with pytest.raises(InputError, match="no NAME_galaxy.csv"):
        batch.merge_catalogs([tmp_path / "out"], tmp_path / "out2")


# -------------------------------------------------------------------- progress


def test_progress_states_and_default_reporter(survey, tmp_path, caplog):
    paths, _ = survey
    states = []
    batch.run_batch(paths, measure_galaxy, tmp_path / "o", executor=SerialExecutor(), progress=states.append)
    assert states[0].finished == 0 and states[0].running == 1 and not states[0].final
    assert [s.finished for s in states[1:-1]] == list(range(1, 7))
    last = states[-1]
    assert last.final and (last.ok, last.failed, last.running, last.to_run) == (4, 2, 0, 6)
    assert last.rate > 0 and states[-2].eta == 0 and states[1].eta > 0

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    with caplog.at_level("INFO", logger="sphot_core"):
        reporter = batch.ProgressReporter(term)
    for state in states:
        reporter(state)
    text = term.getvalue()
    assert text.count("\r") == len(states) and text.endswith("\n") and text.count("\n") == 1
    assert "6/6: 4 ok, 2 failed, 0 running" in text

    # quieted (-q): even a terminal gets no live line
    with caplog.at_level("WARNING", logger="sphot_core"):
        quiet_term = Terminal()
        batch.ProgressReporter(quiet_term)(states[-1])
    assert quiet_term.getvalue() == ""

    plain = batch.ProgressReporter(io.StringIO())
    with caplog.at_level("INFO", logger="sphot_core.batch"):
        plain(states[-1])
    assert "galaxies 6/6: 4 ok, 2 failed" in caplog.text
