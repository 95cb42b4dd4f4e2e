"""``sphot demo``: simulate a field with known truth, fit it, plot it, compare."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import click
import numpy as np

__all__ = ["run_demo"]

DEMO_FILTERS = ("F090W", "F150W", "F277W")


def _match(tx, ty, x, y, radius: float = 1.0):
    """Index of the nearest fitted source within ``radius`` of each true star (or -1)."""
    from scipy.spatial import cKDTree

    if len(x) == 0:
        return np.full(len(tx), -1)
    d, i = cKDTree(np.column_stack([x, y])).query(np.column_stack([tx, ty]))
    return np.where(d <= radius, i, -1)


def run_demo(out_dir="sphot_demo", *, psf=None, seed: int = 1, jobs: Optional[int] = 0, n_stars: int = 150) -> dict:
    """Run the demo; returns the comparison as a dict (also printed)."""
    from .config import load_config
    from .engine import run_file
    from .io import ensure_output_dir, read_sphot
    from .progress import make_reporter
    from .sersic import magnitude
    from .simulate import simulate_to_file

    t0 = time.perf_counter()
    out = ensure_output_dir(out_dir)
    click.echo(f"sphot demo: a synthetic {len(DEMO_FILTERS)}-band galaxy field with {n_stars} foreground stars")
    click.echo(f"[1/3] simulating into {out}/ ...")
    paths = simulate_to_file(out / "demo_galaxy.h5", psf=psf, filters=DEMO_FILTERS, n_stars=n_stars, seed=seed)
    truth = json.loads(paths["truth"].read_text())
    config = load_config(use_user_config=False)
    click.echo("[2/3] fitting (Sersic + stars + sky + PSF calibration; bands in parallel) ...")
    reporter = make_reporter("demo")
    summary = run_file(
        paths["galaxy"],
        out,
        psf=paths.get("psf", psf),
        config=config,
        photometry=True,
        plot=_can_plot(),
        jobs=jobs,
        progress=reporter,
    )
    if hasattr(reporter, "close"):
        reporter.close()
    galaxy, _ = read_sphot(summary["outputs"]["sphot"])
    click.echo("[3/3] fitted versus true:")
    base = truth["base_filter"]
    g = truth["galaxy"]
    res = galaxy.bands[base].sersic
    click.echo(f"  galaxy shape ({base}):   {'true':>9} {'fitted':>9} {'error':>8}")
    dx, dy = galaxy.crop_offset
    for name, fitted in (
        ("x_0", res.params["x_0"] + dx),
        ("y_0", res.params["y_0"] + dy),
        ("r_eff", res.params["r_eff"]),
        ("n", res.params["n"]),
        ("ellip", res.params["ellip"]),
        ("theta", res.params["theta"]),
    ):
        err = res.errors.get(name, float("nan"))
        click.echo(f"    {name:<20} {g[name]:9.3f} {fitted:9.3f} {'+-' + format(err, '.3f') if math.isfinite(err) else '':>8}")
    click.echo(
        f"  per band:      {'mag true':>9} {'mag fit':>9} {'+-':>6} {'colour true':>11} {'colour fit':>10} {'+-':>6} {'stars found':>11}"
    )
    comparison = {"bands": {}}
    base_band = galaxy.bands[base]
    fitted_base, base_colour_err = magnitude(base_band.sersic.flux, base_band.sersic.flux_err_fixed_shape, base_band.zeropoint)
    for flt, band in galaxy.bands.items():
        t = truth["bands"][flt]
        if band.status != "done":
            click.echo(f"    {flt:<11} failed: {band.message}")
            continue
        mag, mag_err = magnitude(band.sersic.flux, band.sersic.flux_err, band.zeropoint)
        # the colour's error: both bands' errors at the shared shape (mag_err_colour)
        colour_err = math.hypot(magnitude(band.sersic.flux, band.sersic.flux_err_fixed_shape, band.zeropoint)[1], base_colour_err)
        colour_err_text = f"{colour_err:6.3f}" if flt != base else " " * 6
        # stars: detected true stars with S/N > 10 outside the galaxy core
        sigma = t["noise_sigma"]
        flux = np.array(t["star_flux"])
        tx, ty = np.array(truth["stars"]["x"]) - dx, np.array(truth["stars"]["y"]) - dy
        inside = (tx > 2) & (ty > 2) & (tx < band.shape[1] - 3) & (ty < band.shape[0] - 3)
        ok = np.isfinite(band.data[np.clip(np.round(ty).astype(int), 0, band.shape[0] - 1), np.clip(np.round(tx).astype(int), 0, band.shape[1] - 1)])
        bright = inside & ok & (flux / (sigma * 2.0 * band.psf.fwhm) > 10)
        found = _match(tx[bright], ty[bright], band.sources.x, band.sources.y) >= 0 if band.sources is not None else np.zeros(0, bool)
        comparison["bands"][flt] = {
            "mag_true": t["mag"],
            "mag_fit": mag,
            "mag_err": mag_err,
            "colour_true": t["colour"],
            "colour_fit": mag - fitted_base,
            "colour_err": colour_err if flt != base else 0.0,
            "stars_bright": int(bright.sum()),
            "stars_found": int(found.sum()),
        }
        click.echo(
            f"    {flt:<11} {t['mag']:9.3f} {mag:9.3f} {mag_err:6.3f} {t['colour']:11.3f} {mag - fitted_base:10.3f} {colour_err_text}"
            f" {int(found.sum()):>5}/{int(bright.sum()):<5}"
        )
    click.echo(f"  outputs in {out}/: " + ", ".join(Path(p).name for p in summary["outputs"].values()))
    click.echo(f"done in {time.perf_counter() - t0:.1f} s. Next: sphot run YOUR_GALAXY.h5 --psf PSF_DIR --out results/")
    comparison["seconds"] = time.perf_counter() - t0
    return comparison


def _can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        click.echo("  (matplotlib not installed: no figure; pip install 'sphot[plot]')")
        return False
    return True
