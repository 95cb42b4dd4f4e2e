"""Batch throughput: galaxies per minute with 1 and 2 workers, and the scaling ratio.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_batch.py [--galaxies 20] [--workers 1 2]
                                                       [--executor processes]

Each galaxy is a simulated three-band field (``sphot_core.simulate``: 151 x 151 px,
150 stars, built-in analytic PSFs) processed by the real engine exactly as
``sphot run`` does in a batch (``sphot_core.runner.process_galaxy``: default
configuration, the bands of one galaxy fitted one after the other, the batch being
the parallelism). Every run starts its own executor, so worker start-up is part of
the measured time, as in a real batch. The worker counts are measured in alternating
order ``--repeat`` times and the fastest run of each is reported (the least disturbed
by other load on the machine), with the median.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def workload(tmp: Path, n: int):
    """(process_one, paths): simulated galaxies and the batch worker function."""
    from sphot_core.runner import process_galaxy
    from sphot_core.simulate import simulate_to_file

    inputs = tmp / "in"
    inputs.mkdir()
    paths, psf = [], None
    for i in range(n):
        written = simulate_to_file(inputs / f"bench{i:03d}.h5", seed=i)
        psf = psf or written["psf"]
        paths.append(written["galaxy"])
    settings = dict(
        psf=str(psf), config_file=None, sets=[], flags={}, base_filter=None, filters=None, forced=None,
        photometry=False, make_plot=False, resume=False, rerun=None,
    )
    return functools.partial(process_galaxy, settings=settings), paths


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

    print(f"workload: the sphot engine on simulated three-band galaxies (runner.process_galaxy)")
    print(f"executor: {args.executor}; {args.galaxies} galaxies; python {platform.python_version()}; "
          f"{os.cpu_count()} CPUs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    with tempfile.TemporaryDirectory(prefix="sphot_bench_batch_") as tmp:
        tmp = Path(tmp)
        process_one, paths = workload(tmp, args.galaxies)
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
