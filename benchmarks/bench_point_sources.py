"""Accuracy and speed of the point-source photometry (ladder + refits) on simulated fields.

A 255 x 255 field at 0.03"/px with the real F150W PSF: 1500 stars with fluxes from a
power law dN/dF ~ F^-2 between S/N 5 and S/N 30000 (S/N = flux / Cramer-Rao flux
error), a PSF-convolved Sersic galaxy in the middle, white Gaussian noise (sigma 1).
The fitter receives the field minus that exact galaxy image and no noise map (it
estimates one), with the galaxy-centre exclusion disc of radius 1.5 FWHM the engine
builds.

Parts (``--parts``, default all):

* ``field``  ladder + nnls on the field: metrics and timing, then the engine's next step
  (a ``constant`` sky fitted to the residual, stars refitted on image - sky), and
  photutils ``IterativePSFPhotometry`` on the same image (time ratio and metrics).
* ``refits`` the same field through ``iterative`` and ``none`` refits.
* ``wedge``  the field with a NaN wedge over a third of the image.
* ``pulls``  isolated stars, repeated noise realisations: pull distribution of
  ``flux_err`` and flux scatter against the Cramer-Rao bound.
* ``bias``   isolated stars at S/N 10, 15 and 30: flux bias of fitted positions with and
  without ``flux_bias_correction``, against photometry at the true positions.
* ``passfit`` one ladder pass: the joint vectorised position+flux solver against
  photutils ``PSFPhotometry`` on the same detections.
* ``stamps`` the stamp-size rule: time and flux bias for several tolerances and for a
  fixed 25 x 25 stamp (the original tool's).
* ``cuts``   completeness with ``cuts_pos_diff_median_factor`` 2 (original default) and 3.

Metrics: completeness = fraction of true stars with S/N > 10 farther than 1 FWHM from
the galaxy centre matched (one-to-one, within 1 px) by a source; flux ratio = measured /
true for matched stars with S/N > 10; false detections = sources with measured S/N > 10
matched to no true star; scatter/CR = standard deviation of (measured - true) / CR
bound for matched isolated stars (no other star within 1.5 FWHM, none with S/N > 3
within 3 FWHM).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_point_sources.py [--parts field,pulls]``
(needs ``../shared/data/psf`` or ``$SPHOT_SHARED_DATA``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import signal
from scipy.spatial import cKDTree

from sphot_core import photometry as ph
from sphot_core.psf import PSFModel
from sphot_core.registry import get_registry

SHAPE = (255, 255)
SIGMA = 1.0
CENTRE = (127.3, 126.8)


# ----------------------------------------------------------------------- set-up


def load_psf(name: str = "F150W") -> PSFModel:
    root = Path(os.environ.get("SPHOT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    files = sorted((root / "psf").glob(f"{name}_*.npy"))
    if not files:
        sys.exit(f"no PSF for {name} under {root / 'psf'}")
    return PSFModel.from_array(np.load(files[0]), 4, filter=name, source=str(files[0]))


def sersic_image(psf: PSFModel, shape=SHAPE, centre=CENTRE, amplitude=3.0, r_eff=15.0, n=1.5, ellip=0.3, theta=0.6):
    """Sersic2D integrated on a 4x finer grid, binned, convolved with the PSF."""
    from astropy.modeling.models import Sersic2D

    os_ = 4
    ny, nx = shape
    fine = (np.arange(ny * os_) + 0.5) / os_ - 0.5, (np.arange(nx * os_) + 0.5) / os_ - 0.5
    yy, xx = np.meshgrid(*fine, indexing="ij")
    model = Sersic2D(amplitude=amplitude, r_eff=r_eff, n=n, x_0=centre[0], y_0=centre[1], ellip=ellip, theta=theta)
    img = model(xx, yy).reshape(ny, os_, nx, os_).mean(axis=(1, 3))
    return signal.fftconvolve(img, psf.grid_kernel, mode="same")


def star_field(psf: PSFModel, n=1500, seed=1, snr_min=5.0, snr_max=3e4, shape=SHAPE):
    """Positions and power-law fluxes (dN/dF ~ F^-2 between the two S/N limits)."""
    rng = np.random.default_rng(seed)
    sf = SIGMA / np.sqrt(np.sum(psf.grid_kernel**2))  # flux error of a star, known position
    u = rng.random(n)
    fmin, fmax = snr_min * sf, snr_max * sf
    flux = 1.0 / (1.0 / fmin - u * (1.0 / fmin - 1.0 / fmax))
    x = rng.uniform(-0.5, shape[1] - 0.5, n)
    y = rng.uniform(-0.5, shape[0] - 0.5, n)
    return x, y, flux, rng


def make_field(psf, seed=1, n=1500, wedge=False):
    x, y, flux, rng = star_field(psf, n=n, seed=seed)
    stars, _ = ph.simulate_star_field(SHAPE, psf, x, y, flux, SIGMA, rng)
    galaxy = sersic_image(psf)
    data = stars + galaxy
    if wedge:
        data = np.where(wedge_mask(), np.nan, data)
    yy, xx = np.indices(SHAPE)
    exclude = np.hypot(xx - CENTRE[0], yy - CENTRE[1]) <= 1.5 * psf.fwhm
    cr, _, _ = ph.cramer_rao(psf, x, y, flux, np.full(SHAPE, SIGMA), np.ones(SHAPE, bool), ph.stamp_halves(psf, flux, SIGMA, 1e-3))
    return {"image": data - galaxy, "x": x, "y": y, "flux": flux, "snr": flux / cr, "cr": cr, "exclude": exclude}


def wedge_mask():
    """A 120-degree sector from the image centre (a third of the image)."""
    yy, xx = np.indices(SHAPE)
    ang = np.degrees(np.arctan2(yy - CENTRE[1], xx - CENTRE[0])) % 360
    return (ang >= 200) & (ang < 320)


def isolated(field, psf):
    x, y, snr = field["x"], field["y"], field["snr"]
    tree = cKDTree(np.c_[x, y])
    out = np.ones(x.size, bool)
    for i, near in enumerate(tree.query_ball_point(np.c_[x, y], 3 * psf.fwhm)):
        for j in near:
            if j != i and (snr[j] > 3 or np.hypot(x[j] - x[i], y[j] - y[i]) < 1.5 * psf.fwhm):
                out[i] = False
                break
    return out


def metrics(field, result, psf, region=None):
    """Completeness, flux ratio, false detections, scatter/CR and pulls."""
    x, y, flux, snr = field["x"], field["y"], field["flux"], field["snr"]
    s = result.sources
    region = np.ones(SHAPE, bool) if region is None else region
    ir, im = ph.match_sources(x, y, s.x, s.y, 1.0)
    matched = np.zeros(x.size, bool)
    matched[ir] = True
    far = np.hypot(x - CENTRE[0], y - CENTRE[1]) > psf.fwhm
    inreg = ph.pixel_value(region, x, y, fill=False)
    sel = (snr > 10) & far & inreg
    ratio = s.flux[im] / flux[ir]
    msel = sel[ir]
    meas_snr = s.flux / s.flux_err
    fake = np.ones(len(s), bool)
    fake[im] = False
    src_in = ph.pixel_value(region, s.x, s.y, fill=False)
    bright = (meas_snr > 10) & src_in
    iso = isolated(field, psf)[ir] & msel
    dev = (s.flux[im] - flux[ir])[iso]
    return {
        "n_sources": len(s),
        "completeness": float(matched[sel].mean()),
        "n_true_snr10": int(sel.sum()),
        "median_ratio": float(np.median(ratio[msel])),
        "false_fraction": float(fake[bright].sum() / max(1, bright.sum())),
        "n_false": int(fake[bright].sum()),
        "negative": int(np.count_nonzero(s.flux < 0)),
        "n_isolated": int(iso.sum()),
        "scatter_over_cr": float(np.std(dev / field["cr"][ir][iso])),
        "pull_std": float(np.std(dev / s.flux_err[im][iso])),
    }


def show(label, m):
    print(
        f"  {label}: {m['n_sources']} sources | completeness(S/N>10) {m['completeness']:.4f} of {m['n_true_snr10']} | "
        f"median flux ratio {m['median_ratio']:.4f} | false(S/N>10) {m['false_fraction']:.4f} ({m['n_false']}) | "
        f"negative fluxes {m['negative']} | isolated {m['n_isolated']}: scatter/CR {m['scatter_over_cr']:.3f}, "
        f"pull std {m['pull_std']:.3f}"
    )


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def run_ladder(field, psf, refit="nnls", ladder_opts=None, refit_opts=None, image=None):
    reg = get_registry()
    lad = reg.create("point_sources", "ladder", ladder_opts or {})
    rf = reg.create("refit", refit, refit_opts or {})
    img = field["image"] if image is None else image
    return timed(lambda: lad.fit(img, None, psf, exclude=field["exclude"], refit=rf))


def sky_cycle(field, psf, first):
    """The engine's next step: constant sky on the residual, stars refitted on image - sky."""
    sky = get_registry().create("sky", "constant", {}).fit(field["image"] - first.model, None, None)
    res, wall, cpu = run_ladder(field, psf, image=field["image"] - sky.image)
    return res, wall, cpu, sky.params["level"]


# ------------------------------------------------------------------------ parts


def part_field(psf, args):
    print("== field: 1500 stars + Sersic galaxy, F150W, ladder + nnls")
    field = make_field(psf, seed=args.seed)
    res, wall0, cpu0 = run_ladder(field, psf)
    print(f"  first call (cold caches: spline coefficients, imports): wall {wall0:.2f} s, cpu {cpu0:.2f} s")
    res, wall, cpu = run_ladder(field, psf)
    print(f"  ladder + nnls: wall {wall:.2f} s, cpu {cpu:.2f} s  (target < 10 s)")
    show("single pass (no sky step)", metrics(field, res, psf))
    res2, wall2, cpu2, level = sky_cycle(field, psf, res)
    print(f"  sky step: constant level {level:.4f} (undetected-star light); refit wall {wall2:.2f} s, cpu {cpu2:.2f} s")
    show("after sky step", metrics(field, res2, psf))
    if not args.no_photutils:
        pu, pwall, pcpu = photutils_iterative(field, psf)
        print(f"  photutils IterativePSFPhotometry: wall {pwall:.2f} s, cpu {pcpu:.2f} s; "
              f"ratio photutils/sphot wall {pwall / wall:.1f}x, cpu {pcpu / cpu:.1f}x")
        show("photutils IterativePSFPhotometry", metrics(field, pu, psf))


def photutils_iterative(field, psf):
    """photutils IterativePSFPhotometry with the same PSF, detector and threshold."""
    from photutils.detection import DAOStarFinder
    from photutils.psf import ImagePSF, IterativePSFPhotometry

    img = field["image"]
    model = ImagePSF(psf.array, oversampling=psf.oversample, origin=(psf.origin[1], psf.origin[0]))
    finder = DAOStarFinder(threshold=5.0 * SIGMA, fwhm=psf.fwhm, roundness_range=(-1, 1), sharpness_range=(0.2, 1.0))
    fit_shape = 2 * ph.fit_half_size(psf) + 1
    phot = IterativePSFPhotometry(model, (fit_shape, fit_shape), finder, aperture_radius=3, maxiters=3, mode="new")
    mask = field["exclude"]

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return phot(img, error=np.full(img.shape, SIGMA), mask=mask)

    table, wall, cpu = timed(run)
    ok = np.isfinite(table["flux_fit"]) & np.isfinite(table["x_fit"])
    x = np.asarray(table["x_fit"])[ok]
    y = np.asarray(table["y_fit"])[ok]
    flux = np.asarray(table["flux_fit"])[ok]
    err = np.asarray(table["flux_err"])[ok]
    from sphot_core.data import SourceTable
    from sphot_core.stages import PointSourceResult

    res = PointSourceResult(SourceTable.from_columns(x, y, flux, flux_err=err), np.zeros(SHAPE), float("nan"))
    return res, wall, cpu


def part_refits(psf, args):
    print("== refits on the same field")
    field = make_field(psf, seed=args.seed)
    for name, opts in (("iterative", {}), ("iterative", {"xy_bounds": 1.0}), ("none", {})):
        res, wall, cpu = run_ladder(field, psf, refit=name, refit_opts=opts)
        label = f"ladder + {name}{' ' + str(opts) if opts else ''}"
        print(f"  {label}: wall {wall:.2f} s, cpu {cpu:.2f} s")
        show(label, metrics(field, res, psf))


def part_wedge(psf, args):
    print("== NaN wedge over a third of the image")
    field = make_field(psf, seed=args.seed, wedge=True)
    wedge = wedge_mask()
    print(f"  NaN fraction {wedge.mean():.3f}")
    res, wall, cpu = run_ladder(field, psf)
    s = res.sources
    inside = ph.pixel_value(wedge, s.x, s.y, fill=False)
    print(f"  ladder + nnls: wall {wall:.2f} s, cpu {cpu:.2f} s; sources placed in the NaN region: {int(inside.sum())}")
    show("single pass, outside the wedge", metrics(field, res, psf, region=~wedge))
    res2, _, _, level = sky_cycle(field, psf, res)
    show("after sky step, outside the wedge", metrics(field, res2, psf, region=~wedge))


def part_pulls(psf, args):
    print(f"== pulls: isolated stars, {args.realisations} noise realisations")
    g = np.arange(12.0, SHAPE[0] - 8, 24.0)
    rng = np.random.default_rng(7)
    x, y = (a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(g, g))
    cr1, _, _ = ph.cramer_rao(psf, x, y, np.ones(x.size), np.full(SHAPE, SIGMA), np.ones(SHAPE, bool), 60)
    snr = np.exp(rng.uniform(np.log(10), np.log(300), x.size))
    flux = snr * cr1
    cr, _, _ = ph.cramer_rao(psf, x, y, flux, np.full(SHAPE, SIGMA), np.ones(SHAPE, bool), ph.stamp_halves(psf, flux, SIGMA, 1e-3))
    reg = get_registry()
    lad = reg.create("point_sources", "ladder", {})
    nnls = reg.create("refit", "nnls", {})
    forced = reg.create("point_sources", "forced", {})
    pulls, dev, fpulls, ratios = [], [], [], []
    for _ in range(args.realisations):
        img, _ = ph.simulate_star_field(SHAPE, psf, x, y, flux, SIGMA, rng)
        res = lad.fit(img, None, psf, refit=nnls)
        s = res.sources
        ir, im = ph.match_sources(x, y, s.x, s.y, 1.0)
        pulls.append((s.flux[im] - flux[ir]) / s.flux_err[im])
        dev.append((s.flux[im] - flux[ir]) / cr[ir])
        ratios.append(s.flux[im] / flux[ir])
        fo = forced.fit(img, None, psf, positions=(x, y)).sources
        fpulls.append((fo.flux - flux[fo.id - 1]) / fo.flux_err)
    pulls, dev, fpulls, ratios = (np.concatenate(v) for v in (pulls, dev, fpulls, ratios))
    print(f"  ladder + nnls, {pulls.size} measurements: pull mean {pulls.mean():+.3f}, pull std {pulls.std():.3f} "
          f"(target 0.85-1.2); scatter / CR {dev.std():.3f} (target <= 1.2); median flux ratio {np.median(ratios):.4f}")
    print(f"  forced at true positions: pull mean {fpulls.mean():+.3f}, pull std {fpulls.std():.3f}")


def part_bias(psf, args):
    print("== position-fitting bias: isolated stars at fixed S/N, ladder + nnls with/without the correction")
    g = np.arange(12.0, SHAPE[0] - 8, 25.0)
    rng = np.random.default_rng(5)
    x, y = (a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(g, g))
    unit, _, _ = ph.cramer_rao(psf, x, y, np.ones(x.size), np.full(SHAPE, SIGMA), np.ones(SHAPE, bool), 60)
    reg = get_registry()
    lad = reg.create("point_sources", "ladder", {})
    forced = reg.create("point_sources", "forced", {})
    for snr in (10.0, 15.0, 30.0):
        flux = snr * unit
        out = {"corrected": [], "uncorrected": [], "forced at true positions": []}
        for _ in range(8):
            img, _ = ph.simulate_star_field(SHAPE, psf, x, y, flux, SIGMA, rng)
            for label, corr in (("corrected", True), ("uncorrected", False)):
                s = lad.fit(img, None, psf, refit=reg.create("refit", "nnls", {"flux_bias_correction": corr})).sources
                ir, im = ph.match_sources(x, y, s.x, s.y, 1.0)
                out[label].append(s.flux[im] / flux[ir])
            fo = forced.fit(img, None, psf, positions=(x, y)).sources
            out["forced at true positions"].append(fo.flux / flux[fo.id - 1])
        line = ", ".join(
            f"{k} {np.median(np.concatenate(v)) - 1:+.2%} (mean {np.mean(np.concatenate(v)) - 1:+.2%})" for k, v in out.items()
        )
        err = np.std(np.concatenate(out["corrected"])) / np.sqrt(np.concatenate(out["corrected"]).size)
        print(f"  S/N {snr:.0f}: median (mean) flux ratio - 1: {line}; standard error {err:.2%}")


def part_passfit(psf, args):
    print("== one ladder pass: own joint solver vs photutils PSFPhotometry (same detections)")
    from photutils.psf import ImagePSF, PSFPhotometry

    field = make_field(psf, seed=args.seed)
    img = field["image"]
    valid = np.isfinite(img)
    noise = np.full(SHAPE, SIGMA)
    stat = ph.detection_image(img, noise, valid, psf, "dao")
    xd, yd, _ = ph.detect(stat, valid, psf, 7.0, finder_kwargs={"roundness_range": [-1, 1], "sharpness_range": [0.2, 1.0]})
    core = ph.fit_half_size(psf)
    system = ph.PixelSystem.build(img, noise, valid)
    own, wall, cpu = timed(lambda: ph.fit_positions(system, ph.CachedPSF(psf), xd, yd, np.zeros(xd.size),
                                                    bound=psf.fwhm, core_half=core, iterations=8))
    model = ImagePSF(psf.array, oversampling=psf.oversample, origin=(psf.origin[1], psf.origin[0]))
    phot = PSFPhotometry(model, (2 * core + 1, 2 * core + 1), aperture_radius=3)

    def run():
        from astropy.table import Table

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return phot(img, error=noise, init_params=Table({"x": xd, "y": yd}))

    tab, pwall, pcpu = timed(run)
    x, y, flux = field["x"], field["y"], field["flux"]
    for label, fx, fy, ff in (("own joint", own["x"], own["y"], own["flux"]),
                              ("photutils", np.asarray(tab["x_fit"]), np.asarray(tab["y_fit"]), np.asarray(tab["flux_fit"]))):
        ir, im = ph.match_sources(x, y, fx, fy, 1.0)
        br = field["snr"][ir] > 10
        pos = np.hypot(fx[im] - x[ir], fy[im] - y[ir])[br]
        print(f"  {label}: {len(fx)} sources; median position error {np.median(pos):.3f} px, "
              f"median flux ratio (S/N>10) {np.median(ff[im][br] / flux[ir][br]):.4f}")
    print(f"  {xd.size} detections: own wall {wall:.2f} s cpu {cpu:.2f} s; photutils wall {pwall:.2f} s cpu {pcpu:.2f} s; "
          f"photutils/own cpu ratio {pcpu / cpu:.1f}x")


def part_stamps(psf, args):
    print("== stamp-size rule: tolerance vs time and accuracy (ladder + nnls; wings always modelled)")
    field = make_field(psf, seed=args.seed)
    for tol in (0.001, 0.003, 0.01, 0.03, 0.1):
        opts = {"stamp_tolerance": tol}
        res, wall, cpu = run_ladder(field, psf, ladder_opts=opts, refit_opts=opts)
        m1 = metrics(field, res, psf)
        s = res.sources
        full = psf.render(SHAPE, s.x, s.y, s.flux, half=psf.half_extent)
        omitted = float(np.median(full - res.model))
        sky = get_registry().create("sky", "constant", {}).fit(field["image"] - res.model, None, None)
        res2, _, cpu2 = run_ladder(field, psf, ladder_opts=opts, refit_opts=opts, image=field["image"] - sky.image)
        m = metrics(field, res2, psf)
        print(f"  tolerance {tol}: cpu {cpu:.2f} s | omitted wing light (median per px) {omitted:.4f} sigma | "
              f"median ratio {m1['median_ratio']:.4f} single pass, {m['median_ratio']:.4f} after sky step | "
              f"completeness {m['completeness']:.4f} | false {m['n_false']} | sky level {sky.params['level']:.4f}")
    # the original tool's fixed 25 x 25 render stamp: fluxes measured with truncated-at-12 px templates
    bright = field["snr"] > 100
    img = field["image"]
    noise = np.full(SHAPE, SIGMA)
    system = ph.PixelSystem.build(img, noise, np.isfinite(img))
    x, y = field["x"], field["y"]
    for label, kw in (("fixed 25x25 stamps (original tool)", {"fixed_halves": 12}),
                      (f"stamp rule {ph.DEFAULT_STAMP_TOLERANCE} + wings", {"wings": True})):
        sol = ph.solve_fluxes(system, psf, x, y, field["flux"], **kw)
        render = ph.model_image if kw.get("wings") else ph.render_sources
        resid = img - render(SHAPE, psf, x, y, sol.flux, sol.halves)
        ring = ring_residual(resid, x[bright], y[bright])
        print(f"  true positions, {label}: median flux ratio (S/N>100) {np.median(sol.flux[bright] / field['flux'][bright]):.4f}; "
              f"mean residual 13-30 px around S/N>100 stars {ring:.4f} sigma")


def ring_residual(resid, x, y, r0=13, r1=30):
    yy, xx = np.indices(SHAPE)
    sel = np.zeros(SHAPE, bool)
    for a, b in zip(x, y):
        d = np.hypot(xx - a, yy - b)
        sel |= (d >= r0) & (d < r1)
    return float(np.nanmean(resid[sel]))


def part_cuts(psf, args):
    print("== drift cut: cuts_pos_diff_median_factor 2 (original default) vs 3, with and without the nnls refit")
    for seed in (args.seed, args.seed + 1):
        field = make_field(psf, seed=seed)
        for refit in ("nnls", "none"):
            for factor in (2.0, 3.0):
                res, _, _ = run_ladder(field, psf, refit=refit, ladder_opts={"cuts_pos_diff_median_factor": factor})
                m = metrics(field, res, psf)
                print(f"  seed {seed}, {refit}, factor {factor}: completeness {m['completeness']:.4f}, drift rejections "
                      f"{res.stats['cuts']['drift']}, false {m['n_false']}, median ratio {m['median_ratio']:.4f}")


PARTS = {
    "field": part_field,
    "refits": part_refits,
    "wedge": part_wedge,
    "pulls": part_pulls,
    "bias": part_bias,
    "passfit": part_passfit,
    "stamps": part_stamps,
    "cuts": part_cuts,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--realisations", type=int, default=40, help="noise realisations of the pull study")
    parser.add_argument("--no-photutils", action="store_true", help="skip the photutils IterativePSFPhotometry run")
    args = parser.parse_args(argv)
    psf = load_psf("F150W")
    print(f"PSF {psf!r}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    for name in args.parts.split(","):
        PARTS[name.strip()](psf, args)


if __name__ == "__main__":
    main()
