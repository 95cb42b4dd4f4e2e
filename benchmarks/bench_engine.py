"""The full six-band run of g260 (../shared/data): wall time, stages, peak memory.

Targets (issue 6): under 60 s wall on a 2-core machine, under 0.5 GiB peak memory per
process. The in-run baseline is the same run with the bands fitted one after the other
in one process (``--jobs 1``); the original sphot needed about 25 minutes of CPU for
this galaxy (not re-measured here: its code is not part of this project).

Usage::

    python benchmarks/bench_engine.py [--galaxy g260] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

DATA = Path(os.environ.get("SPHOT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def run(galaxy: str, jobs: int):
    from sphot_core.config import load_config
    from sphot_core.engine import run_file
    from sphot_core.io import read_sphot

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        summary = run_file(DATA / "galaxies" / f"{galaxy}.h5", out, psf=DATA / "psf", config=load_config(use_user_config=False), jobs=jobs)
        wall = time.perf_counter() - t0
        g, _ = read_sphot(summary["outputs"]["sphot"])
    return wall, g, summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--galaxy", default="g260")
    args = ap.parse_args()
    wall2, g, summary = run(args.galaxy, 2)
    parent_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.galaxy}: {summary['status']}, {len(g.bands)} bands, cutout {g.shape[1]}x{g.shape[0]}")
    print(f"wall time, bands in 2 processes: {wall2:6.1f} s   (target < 60 s)")
    print(f"{'band':>6} {'total':>7} {'sersic':>7} {'stars':>7} {'sky':>6} {'calib':>6} {'iters':>5} {'stars':>6} {'peak MiB':>8}")
    for f, b in g.bands.items():
        tot = b.history[-1]
        t = tot["timings"]
        iters = sum(1 for h in b.history if h.get("stage") == "loop")
        print(f"{f:>6} {tot['seconds']:7.1f} {t.get('sersic', 0):7.1f} {t.get('stars', 0):7.1f} {t.get('sky', 0):6.1f} "
              f"{t.get('calibration', 0):6.1f} {iters:5d} {len(b.sources):6d} {tot.get('peak_rss_mb', float('nan')):8.0f}")
    workers = max(b.history[-1].get("peak_rss_mb", 0) for f, b in g.bands.items() if f != g.base_filter)
    print(f"peak memory: main process {parent_mb:.0f} MiB, largest worker {workers:.0f} MiB   (target < 512 MiB each)")
    wall1, _, _ = run(args.galaxy, 1)
    print(f"baseline, bands one after the other in one process: {wall1:6.1f} s   ratio x{wall1 / wall2:.2f}")
    print(f"original sphot (recorded, ORIGINAL.md section 10): ~25 min of CPU  -> ~x{25 * 60 / wall2:.0f}")


if __name__ == "__main__":
    main()
