"""Batch throughput: galaxies per minute with 1 and 2 workers, and the scaling ratio.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_batch.py [--galaxies 20] [--workers 1 2]
                                                       [--executor processes]

The processing function is the engine's ``sphot_core.engine.run_galaxy_file(path,
out_dir)`` when it can be imported (inputs simulated with
``sphot_core.simulate.simulate_to_file``); otherwise a CPU-bound toy workload that
fits a Gaussian to a PSF-convolved toy galaxy in 6 filters (about a second per galaxy
on one core). The script prints which one it used. Every run starts its own executor,
so worker start-up is part of the measured time, as in a real batch. The worker counts
are measured in alternating order ``--repeat`` times and the fastest run of each is
reported (the least disturbed by other load on the machine), with the median.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

N_FILTERS = 6
SIZE = 200


# ------------------------------------------------------------------- toy workload


def make_toy_galaxy(path: Path, seed: int) -> None:
    """A toy HDF5 cutout (one dataset per filter, the layout of the real data)."""
    import h5py

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(float)
    with h5py.File(path, "w") as h5:
        for k in range(N_FILTERS):
            x0, y0 = SIZE / 2 + rng.normal(0, 2, 2)
            image = 100.0 * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * (4.0 + k) ** 2))
            h5.create_dataset(f"F{k}", data=image + rng.normal(0, 1.0, image.shape))


def toy_process_one(path: str, out_dir: str) -> dict:
    """CPU-bound stand-in for the engine: an FFT-convolved Gaussian fit per filter."""
    import h5py
    from scipy.optimize import least_squares
    from scipy.signal import fftconvolve

    from sphot_core.io import write_csv

    yy, xx = np.mgrid[:SIZE, :SIZE].astype(float)
    k = np.arange(-32, 33, dtype=float)
    kernel = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / (2 * 1.5**2))
    kernel /= kernel.sum()
    rows = []
    with h5py.File(path, "r") as h5:
        images = {name: h5[name][()] for name in h5}
    for name, image in images.items():

        def residuals(p):
            model = p[0] * np.exp(-((xx - p[1]) ** 2 + (yy - p[2]) ** 2) / (2 * p[3] ** 2))
            return (fftconvolve(model, kernel, mode="same") - image).ravel()

        fit = least_squares(residuals, [50.0, SIZE / 2, SIZE / 2, 3.0], x_scale=[10, 1, 1, 1])
        rows.append({"filter": name, "x_0": fit.x[1], "y_0": fit.x[2], "flux": fit.x[0], "nfev": fit.nfev})
    stem = Path(path).stem
    write_csv(Path(out_dir) / f"{stem}_galaxy.csv", ("filter", "x_0", "y_0", "flux", "nfev"), rows)
    write_csv(Path(out_dir) / f"{stem}_sources.csv", ("filter", "id"), [])
    return {"n_filters": len(rows)}


def choose_workload():
    """(process_one, make_input, label): the engine if importable, else the toy."""
    try:
        from sphot_core.engine import run_galaxy_file
        from sphot_core.simulate import simulate_to_file
    except ImportError as exc:
        return toy_process_one, make_toy_galaxy, f"toy CPU-bound workload (engine not importable: {exc})"

    def make_input(path: Path, seed: int) -> None:
        simulate_to_file(str(path), seed=seed)

    return run_galaxy_file, make_input, "sphot engine (sphot_core.engine.run_galaxy_file)"


# ---------------------------------------------------------------------- measuring


def measure(process_one, paths, out_dir: Path, executor_name: str, workers: int) -> dict:
    from sphot_core.batch import run_batch
    from sphot_core.registry import get_registry

    start = time.perf_counter()
    with get_registry().create("executor", executor_name, {"jobs": workers}) as executor:
        result = run_batch(paths, process_one, out_dir, executor=executor)
    seconds = time.perf_counter() - start
    return {
        "workers": workers,
        "seconds": seconds,
        "ok": len(result.ok),
        "failed": len(result.failed),
        "per_minute": 60.0 * len(paths) / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--galaxies", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--executor", default="processes")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    process_one, make_input, label = choose_workload()
    print(f"workload: {label}")
    print(f"executor: {args.executor}; {args.galaxies} galaxies; python {platform.python_version()}; "
          f"{os.cpu_count()} CPUs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    with tempfile.TemporaryDirectory(prefix="sphot_bench_batch_") as tmp:
        tmp = Path(tmp)
        inputs = tmp / "in"
        inputs.mkdir()
        paths = [inputs / f"bench{i:03d}.h5" for i in range(args.galaxies)]
        for i, path in enumerate(paths):
            make_input(path, seed=i)
        runs = {n: [] for n in args.workers}
        for r in range(args.repeat):
            for n in args.workers if r % 2 == 0 else args.workers[::-1]:
                runs[n].append(measure(process_one, paths, tmp / f"out_{n}_{r}", args.executor, n))
    best = {n: min(rs, key=lambda run: run["seconds"]) for n, rs in runs.items()}
    base = best[args.workers[0]]
    print(f"{'workers':>7} {'best s':>8} {'median s':>8} {'ok':>4} {'failed':>6} {'gal/min':>8} "
          f"{'x vs ' + str(base['workers']):>8}")
    for n, run in best.items():
        median = float(np.median([r["seconds"] for r in runs[n]]))
        ratio = run["per_minute"] / base["per_minute"]
        print(f"{n:>7} {run['seconds']:>8.2f} {median:>8.2f} {run['ok']:>4} {run['failed']:>6} "
              f"{run['per_minute']:>8.1f} {ratio:>8.2f}")


if __name__ == "__main__":
    main()
