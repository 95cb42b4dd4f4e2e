"""Kernel calibration: speed, parameter recovery, flux bias and real-data convergence.

Run from the repository root (needs ../shared/data or $SPHOT_SHARED_DATA)::

    OMP_NUM_THREADS=1 python benchmarks/bench_calibration.py [--seeds 3] [--repeat 5]

1. Speed: one ``multi_source`` calibration step on the 30 brightest anchors of g260
   F150W (target < 2 s), wall and CPU time; and, as the in-run baseline, the cost of
   one objective evaluation convolving the *full* library PSF (as the original tool
   did) against the cropped library the calibrator uses.
2. Recovery: stars simulated with the real F150W library convolved with known
   kernels; recovered parameters, and the PSF-fitted anchor fluxes against the truth
   before (library PSF) and after calibration.
3. Real data: g260 F150W calibrated repeatedly through ``KernelTracker`` until the
   kernel stops changing; residual RMS in the anchor stamps before/after.

The galaxy and sky of the real image are approximated by a 31-pixel median filter
(the engine would subtract its Sersic and sky models); the calibration exclusion
ellipse uses the galaxy geometry of the original tool's run on g260.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from sphot_core.calibrate import KernelTracker, galaxy_exclusion_mask
from sphot_core.psf import PSFModel
from sphot_core.registry import get_registry
from sphot_core.testing import random_star_field
from sphot_core.stats import robust_sigma
from sphot_plugins import calibration as cal_mod

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPHOT_SHARED_DATA", REPO.parent / "shared" / "data"))
OS = 4
G260_GEOMETRY = {"x_0": 125.0, "y_0": 133.0, "r_eff": 18.0, "ellip": 0.2, "theta": 2.1}


def load_library(filt="F150W"):
    path = next((DATA / "psf").glob(f"{filt}_*.npy"))
    return PSFModel.from_array(np.load(path), OS, filter=filt, source=str(path))


def real_image(filt="F150W"):
    with h5py.File(DATA / "galaxies" / "g260.h5", "r") as f:
        data = f[filt][:]
    filled = np.where(np.isfinite(data), data, np.nanmedian(data))
    image = data - ndimage.median_filter(filled, size=31)
    return image, galaxy_exclusion_mask(image.shape, G260_GEOMETRY, factor=1.5)


def star_field(psf, seed):
    """60 stars of known position and flux on a 200x200 field (unit noise)."""
    return random_star_field(psf, seed, n=60, shape=(200, 200), log_flux=(2.5, 4.0), half=40)


def flux_bias(image, psf, x, y, flux):
    """Median and robust scatter of fitted/true - 1 of the calibrator's anchor
    photometry (positions free)."""
    anchors = cal_mod.find_anchors(image, np.ones(image.shape), psf, cal_mod.CalibrationOptions())
    i = anchors.anchor
    d = np.hypot(anchors.x[i][:, None] - x[None, :], anchors.y[i][:, None] - y[None, :])
    j = d.argmin(axis=1)
    ok = d[np.arange(i.size), j] < 0.5
    ratio = anchors.flux[i][ok] / flux[j][ok] - 1.0
    return float(np.median(ratio)), robust_sigma(ratio)


def section_speed(repeat):
    print("== 1. speed: one calibration step, g260 F150W, 30 anchors, gaussian, multi_source")
    library = load_library()
    image, exclude = real_image()
    reg = get_registry()
    fam = reg.create("kernel", "gaussian", {})
    cal = reg.create("calibrator", "multi_source", {"kernel_anchor_K": 30})
    walls, cpus = [], []
    for _ in range(repeat):
        library = load_library()  # fresh object: no cached spline coefficients
        t, c = time.perf_counter(), time.process_time()
        fit = cal.calibrate(image, None, library, fam, exclude=exclude)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    print(f"   anchors {fit.n_anchors}, sigma {fit.params['sigma']:.4f} px, objective evaluations {fit.stats['nfev']}")
    print(f"   wall  median {np.median(walls):.3f} s  min {np.min(walls):.3f} s   (target < 2 s; {repeat} runs)")
    print(f"   CPU   median {np.median(cpus):.3f} s  min {np.min(cpus):.3f} s")
    # baseline: one evaluation of the same objective with the full library convolved
    opts = cal_mod.CalibrationOptions()
    valid = np.isfinite(image)
    sigma, _ = cal_mod._noise_map(image, None, valid, opts.noise_box)
    weight = 1.0 / sigma**2
    anchors = cal_mod.find_anchors(image, weight, library, opts, exclude=exclude)
    objective = cal_mod._StampObjective(image, weight, anchors)
    search = cal_mod._KernelSearch(library, fam, objective)
    k = fam.render({"sigma": 0.95}, OS)
    t_crop = _time(lambda: objective.loss(search.psf({"sigma": 0.95})))
    t_full = _time(lambda: objective.loss(library.convolved(k)))
    print(
        f"   one objective evaluation: cropped library {1e3 * t_crop:.1f} ms, full library (baseline) "
        f"{1e3 * t_full:.1f} ms, ratio {t_full / t_crop:.1f}x"
    )


def _time(fn, n=5):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return float(np.median(out))


CASES = [
    ("gaussian", {}, {"sigma": 0.5}),
    ("gaussian", {}, {"sigma": 0.9}),
    ("gaussian", {}, {"sigma": 1.5}),
    ("gaussian", {}, {"sigma": 0.0}),
    ("gaussian", {"elliptical": True}, {"sigma": 1.0, "ratio": 0.6, "theta": 2.0}),
    ("moffat", {}, {"alpha": 1.2, "beta": 2.5}),
    ("moffat", {}, {"alpha": 0.8, "beta": 4.0}),
    ("drizzle", {}, {"sigma": 0.6}),
    ("drizzle", {"fit_width": True}, {"width": 2.0, "sigma": 0.4}),
]


def section_recovery(seeds):
    print(f"\n== 2. recovery on simulated fields (F150W library (*) known kernel, 60 stars, {seeds} seeds)")
    library = load_library()
    reg = get_registry()
    header = f"   {'family':9s} {'calibrator':13s} {'truth':34s} {'recovered (mean +- std)':44s} "
    print(header + "max|rel err|  flux bias (scatter) before -> after        time")
    for calname in ("multi_source", "single_source"):
        for name, options, truth in CASES if calname == "multi_source" else CASES[1:2]:
            fam = reg.create("kernel", name, options)
            cal = reg.create("calibrator", calname, {})
            got, before, after, secs = [], [], [], []
            for seed in range(seeds):
                image, x, y, flux = star_field(library.convolved(fam.render(truth, OS)), seed=100 + seed)
                t = time.perf_counter()
                fit = cal.calibrate(image, None, library, fam)
                secs.append(time.perf_counter() - t)
                got.append(fit.params)
                before.append(flux_bias(image, library, x, y, flux))
                after.append(flux_bias(image, fit.psf, x, y, flux))
            rec = "  ".join(
                f"{k}={np.mean([g[k] for g in got]):.4f}+-{np.std([g[k] for g in got]):.4f}" for k in truth
            )
            err = max(
                abs(np.mean([g[k] for g in got]) / v - 1.0) if v else abs(np.mean([g[k] for g in got]))
                for k, v in truth.items()
            )
            tr = " ".join(f"{k}={v:g}" for k, v in truth.items())
            b, a = np.mean(before, axis=0), np.mean(after, axis=0)
            print(
                f"   {name:9s} {calname:13s} {tr:34s} {rec:44s} {err:10.4f}   "
                f"{b[0]:+.4f} ({b[1]:.4f}) -> {a[0]:+.4f} ({a[1]:.4f})   {np.mean(secs):.2f} s"
            )
    print("   (max|rel err| is absolute, in px, for a true value of 0)")


def section_real(max_iter=6):
    print("\n== 3. real g260 F150W: repeated calibration through KernelTracker (kernel_skip_threshold 1e-3)")
    library = load_library()
    image, exclude = real_image()
    reg = get_registry()
    fam = reg.create("kernel", "gaussian", {})
    cal = reg.create("calibrator", "multi_source", {})
    tracker = KernelTracker(library, fam, skip_threshold=1e-3, skip_on_convergence=True, damping=0.5)
    first = None
    for it in range(max_iter):
        fit = cal.calibrate(image, None, library, fam, exclude=exclude, previous=tracker.fit)
        first = first or fit
        rec = tracker.update(fit, it)
        print(
            f"   iteration {it}: sigma {fit.params['sigma']:.4f} px, anchors {fit.n_anchors}, "
            f"loss {fit.loss_before:.4f} -> {fit.loss:.4f}, stamp RMS {fit.stats['rms_before']:.4f} -> "
            f"{fit.stats['rms_after']:.4f}, kernel change {rec['rms_change']:.2e}, accepted {rec['accepted']}, "
            f"converged {rec['converged']}"
        )
        if not tracker.should_calibrate():
            break
    print(f"   converged: {tracker.converged} after {len(tracker.history)} calibrations")
    print(f"   FWHM library {library.fwhm:.3f} px -> calibrated {tracker.psf.fwhm:.3f} px")
    print(
        f"   residual RMS in the stamps of the first calibration's {first.n_anchors} anchors: library "
        f"{first.stats['rms_before']:.4f} -> calibrated {first.stats['rms_after']:.4f} MJy/sr "
        f"(ratio {first.stats['rms_after'] / first.stats['rms_before']:.3f}); "
        f"noise level {first.stats['noise_level']:.4f}"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    section_speed(args.repeat)
    section_recovery(args.seeds)
    section_real()


if __name__ == "__main__":
    main()
