"""The ``sphot`` command line.

Errors raised on purpose (:class:`~sphot_core.errors.SphotError`) become one line on
stderr and the exit code of their class; ``-v`` adds the traceback. Building ``--help``
imports no plugin and no numerical code.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import click

from ._version import __version__
from .errors import SphotError

log = logging.getLogger("sphot_core")

#: exit code of unexpected internal errors (EX_SOFTWARE)
EXIT_INTERNAL = 70

_STATE = {"verbose": 0}


# -------------------------------------------------------------- parameter types


class StrategyName(click.ParamType):
    """A strategy name of one stage kind, validated by the config (not at import).

    Completion lists the registered names (it loads the plugins only then).
    """

    name = "NAME"

    def __init__(self, stage: str):
        self.stage = stage

    def convert(self, value, param, ctx):
        return str(value)

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        from .registry import get_registry

        try:
            regs = get_registry().strategies(self.stage)
        except SphotError:
            return []
        return [
            CompletionItem(r.name, help=r.spec.description)
            for r in regs
            if r.name.lower().startswith(incomplete.lower())
        ]


def _config_options(f):
    """--config, --set and the named strategy flags (shared by run and config show)."""
    opts = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Config file (TOML) over the defaults and sphot_config.toml."),
        click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one config value (VALUE parsed as TOML, else a string). Repeatable."),
        click.option("--fitter", type=StrategyName("fitter"), help="Sersic optimizer of the main loop ([fitter] method)."),
        click.option("--refit", type=StrategyName("refit"), help="Joint refit of the point sources ([refit] method)."),
        click.option("--kernel", type=StrategyName("kernel"), help="PSF kernel family ([psf-calib] family)."),
        click.option("--sky", type=StrategyName("sky"), help="Sky estimator ([sky] method)."),
        click.option("--executor", type=StrategyName("executor"), help="Batch executor ([executor] method)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _load_config(config_file, sets, flags, galaxy_path=None):
    from .config import load_config

    return load_config(config_file, sets=sets, flags=flags, galaxy_path=galaxy_path)


def _flags(fitter=None, refit=None, kernel=None, sky=None, executor=None):
    return {"fitter": fitter, "refit": refit, "kernel": kernel, "sky": sky, "executor": executor}


# ---------------------------------------------------------------------- logging


class _Formatter(logging.Formatter):
    def format(self, record):
        msg = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"sphot: {record.levelname.lower()}: {msg}"
        return msg


def _setup_logging(verbose: int, quiet: int, log_file: Optional[str]) -> None:
    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    elif quiet == 1:
        level = logging.WARNING
    elif quiet >= 2:
        level = logging.ERROR
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_sphot", False):
            root.removeHandler(h)
    from .progress import LiveHandler

    handler = LiveHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    handler.setLevel(level)
    handler._sphot = True
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if log_file else level)
    for name in ("sphot_core", "sphot_plugins"):
        logging.getLogger(name).setLevel(logging.DEBUG if log_file else level)
    if log_file:
        try:
            fh = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise click.BadParameter(f"cannot open log file {log_file}: {exc.strerror or exc}", param_hint="--log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh.setLevel(logging.DEBUG)
        fh._sphot = True
        root.addHandler(fh)
    # third-party chatter stays at warning level (never touch astropy's logger here:
    # astropy installs its own logger class when it is imported)
    for name in ("distributed", "matplotlib", "h5py"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


# ------------------------------------------------------------------------ group


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="sphot")
@click.option("-v", "--verbose", count=True, help="More output; tracebacks on errors.")
@click.option("-q", "--quiet", count=True, help="Less output (-qq: errors only).")
@click.option("--no-plugins", is_flag=True, help="Load only the built-in strategies (same as SPHOT_DISABLE_PLUGIN_AUTOLOAD=1).")
@click.option("--log", "log_file", type=click.Path(dir_okay=False), help="Also write a detailed log to this file.")
def cli(verbose, quiet, no_plugins, log_file):
    """sphot: Sersic galaxies, crowded-field point sources and sky, fitted together.

    \b
    First run:      sphot demo
    One galaxy:     sphot run g260.h5 --psf psf/ --out results/
    Many galaxies:  sphot run --from-list galaxies.txt --psf psf/ --out results/ --jobs 8
    """
    _STATE["verbose"] = verbose
    _setup_logging(verbose, quiet, log_file)
    if no_plugins:
        from .registry import Registry, set_registry

        set_registry(Registry(autoload=False))


# ---------------------------------------------------------------------- plugins


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_cmd(as_json):
    """List every registered strategy by stage, with the package it comes from."""
    from .hookspecs import STAGES
    from .registry import get_registry

    reg = get_registry()
    data = reg.describe()
    if as_json:
        payload = {"stages": data, "problems": list(reg.problems), "autoload": reg.autoload}
        click.echo(json.dumps(payload, indent=2, default=str))
        return
    for stage, rows in data.items():
        label = STAGES[stage][1]
        click.echo(f"{label} ({stage}):")
        if not rows:
            click.echo("    (none)")
        width = max((len(r["name"]) for r in rows), default=0)
        for r in rows:
            alias = f" (aliases: {', '.join(r['aliases'])})" if r["aliases"] else ""
            origin = f"{r['distribution']} {r['version']}".strip()
            click.echo(f"    {r['name']:<{width}}  [{origin}]  {r['description']}{alias}")
    if not reg.autoload:
        click.echo("(third-party plugins not loaded: --no-plugins or SPHOT_DISABLE_PLUGIN_AUTOLOAD)")
    for problem in reg.problems:
        click.echo(f"sphot: warning: {problem}", err=True)


# ----------------------------------------------------------------------- config


@cli.group("config")
def config_grp():
    """Inspect the effective configuration."""


@config_grp.command("show")
@_config_options
@click.option("--sources", is_flag=True, help="Annotate every value with where it came from.")
@click.option("--galaxy", type=click.Path(dir_okay=False), help="Also look for sphot_config.toml next to this galaxy file.")
def config_show(config_file, sets, fitter, refit, kernel, sky, executor, sources, galaxy):
    """Print the merged effective configuration as TOML."""
    cfg = _load_config(config_file, sets, _flags(fitter, refit, kernel, sky, executor), galaxy_path=galaxy)
    for note in cfg.notes:
        log.info("note: %s", note)
    click.echo(cfg.to_toml(with_sources=sources), nl=False)


# ------------------------------------------------------------------- completion


@cli.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion_cmd(shell):
    """Print the shell-completion script (e.g. `eval "$(sphot completion bash)"`)."""
    from click.shell_completion import get_completion_class

    comp = get_completion_class(shell)(cli, {}, "sphot", "_SPHOT_COMPLETE")
    click.echo(comp.source())


# -------------------------------------------------------------------------- run


@cli.command("run")
@click.argument("galaxies", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--from-list", "from_list", type=click.Path(dir_okay=False), help="File with one galaxy path per line.")
@click.option("--psf", "psf", type=click.Path(), help="PSF folder of .npy files or HDF5 file ([prep] psf).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".", show_default=True, help="Output folder (created if needed).")
@_config_options
@click.option("--base-filter", help="Filter fitted freely ([core] base_filter).")
@click.option("--filters", help="Comma-separated filters to fit ([prep] filters); with --resume/--rerun: the bands to redo.")
@click.option("--forced", "forced", help="Comma-separated filters whose stars are force-fitted at the base positions.")
@click.option("--photometry", is_flag=True, help="Also run aperture (Petrosian) photometry (NAME_aperture.csv).")
@click.option("--plot", "make_plot", is_flag=True, help="Also write the diagnostic figure NAME.png.")
@click.option("--jobs", "-j", type=click.IntRange(min=0), help="Parallel processes (bands of one galaxy, or galaxies of a batch); 0 = all cores.")
@click.option("--resume", is_flag=True, help="Continue from existing outputs: skip finished galaxies, bands and stages.")
@click.option("--rerun", type=click.Choice(["basefit", "scalefit", "photometry"]), help="Redo this stage (and what depends on it) from NAME_sphot.h5.")
@click.option("--retry-failed", is_flag=True, help="Batch: with --resume, also retry galaxies that failed before.")
@click.option("--shard", metavar="I/N", help="Batch: process only the I-th of N deterministic parts (job arrays).")
@click.option("--timeout", type=click.FloatRange(min=0), help="Batch: time limit per galaxy in seconds.")
@click.option("--scheduler", metavar="ADDRESS", help="Batch with --executor dask: address of an existing dask scheduler.")
def run_cmd(galaxies, from_list, psf, out_dir, config_file, sets, fitter, refit, kernel, sky, executor, base_filter, filters, forced, photometry, make_plot, jobs, resume, rerun, retry_failed, shard, timeout, scheduler):
    """Fit one or many galaxies: Sersic model, point sources, sky, PSF calibration.

    Writes NAME_sphot.h5, NAME_galaxy.csv and NAME_sources.csv (and NAME_aperture.csv
    with --photometry) into --out for every GALAXY file.
    """
    from . import runner

    runner.run_command(
        galaxies=list(galaxies),
        from_list=from_list,
        psf=psf,
        out_dir=out_dir,
        config_file=config_file,
        sets=list(sets),
        flags=_flags(fitter, refit, kernel, sky, executor),
        base_filter=base_filter,
        filters=filters,
        forced=forced,
        photometry=photometry,
        make_plot=make_plot,
        jobs=jobs,
        resume=resume,
        rerun=rerun,
        retry_failed=retry_failed,
        shard=shard,
        timeout=timeout,
        scheduler=scheduler,
    )


# ------------------------------------------------------------------ simulate


@cli.command("simulate")
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--psf", type=click.Path(), help="Use these PSFs (folder or HDF5); default: built-in analytic PSFs.")
@click.option("--filters", default="F090W,F150W,F277W", show_default=True, help="Comma-separated filter names.")
@click.option("--size", type=click.IntRange(min=31), default=151, show_default=True, help="Image side in pixels.")
@click.option("--stars", "n_stars", type=click.IntRange(min=0), default=150, show_default=True, help="Number of foreground stars.")
@click.option("--seed", type=int, default=1, show_default=True, help="Random seed.")
@click.option("--snr", type=click.FloatRange(min=1), default=300.0, show_default=True, help="Galaxy signal-to-noise ratio in the base band.")
@click.option("--snr-every-band", is_flag=True, help="Give every band the --snr signal-to-noise (default: bands redder than the galaxy are shallower).")
@click.option("--no-nan-edges", is_flag=True, help="Do not blank the image edges with NaN.")
def simulate_cmd(output, psf, filters, size, n_stars, seed, snr, snr_every_band, no_nan_edges):
    """Write a synthetic multi-band galaxy field with known truth (OUTPUT + _truth.json)."""
    from .simulate import simulate_to_file

    paths = simulate_to_file(
        output,
        psf=psf,
        filters=[f.strip() for f in filters.split(",") if f.strip()],
        size=size,
        n_stars=n_stars,
        seed=seed,
        snr=snr,
        snr_every_band=snr_every_band,
        nan_edges=not no_nan_edges,
    )
    for p in paths.values():
        click.echo(f"wrote {p}")


# ---------------------------------------------------------------------- demo


@cli.command("demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="sphot_demo", show_default=True, help="Folder for the demo files.")
@click.option("--psf", type=click.Path(), help="Use these PSFs instead of the built-in analytic ones.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--jobs", "-j", type=click.IntRange(min=0), default=0, show_default=True, help="Parallel processes for the bands; 0 = all cores.")
def demo_cmd(out_dir, psf, seed, jobs):
    """Simulate a galaxy field, fit it, plot it, and compare with the truth."""
    from .demo import run_demo

    run_demo(out_dir, psf=psf, seed=seed, jobs=jobs)


# ---------------------------------------------------------------------- plot


@cli.command("plot")
@click.argument("sphot_file", type=click.Path(dir_okay=False))
@click.option("--out", "output", type=click.Path(dir_okay=False), help="PNG path (default: NAME.png next to the input).")
@click.option("--filters", help="Comma-separated subset of bands.")
def plot_cmd(sphot_file, output, filters):
    """Diagnostic figure of a NAME_sphot.h5 file: data, galaxy, stars, residual per band."""
    from .io import read_sphot
    from .plotting import plot_galaxy

    galaxy, _ = read_sphot(sphot_file)
    path = Path(output) if output else Path(sphot_file).with_name(f"{galaxy.name}.png")
    bands = [f.strip() for f in filters.split(",")] if filters else None
    plot_galaxy(galaxy, path, bands=bands)
    click.echo(f"wrote {path}")


# ---------------------------------------------------------------------- merge


@cli.command("merge")
@click.argument("out_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--out", "dest", type=click.Path(file_okay=False), default=".", show_default=True, help="Where to write catalog_galaxy.csv and catalog_sources.csv.")
def merge_cmd(out_dirs, dest):
    """Merge the per-galaxy CSVs of output folders into one survey catalogue."""
    from .batch import merge_catalogs

    merged = merge_catalogs(list(out_dirs), dest)
    for p in (merged.galaxy_catalog, merged.sources_catalog):
        click.echo(f"wrote {p}")


# ----------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: run the CLI and map errors to one line + exit code."""
    try:
        rv = cli.main(args=argv, prog_name="sphot", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("sphot: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("sphot: interrupted", err=True)
        sys.exit(130)
    except SphotError as exc:
        if _STATE["verbose"]:
            traceback.print_exc()
        click.echo(f"sphot: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: still one line unless -v
        if _STATE["verbose"]:
            traceback.print_exc()
        click.echo(f"sphot: internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)", err=True)
        sys.exit(EXIT_INTERNAL)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
