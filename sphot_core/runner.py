"""Glue between the ``sphot run`` command and the engine / batch driver."""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import click

from .errors import ConfigError, FitError, PartialFailure

log = logging.getLogger("sphot_core.runner")


def _split(text: Optional[str]) -> Optional[List[str]]:
    if not text:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def _overrides(forced) -> Dict[str, Any]:
    """``--forced`` is a setting of the method (kept in the stored config for resumes);
    ``--filters`` says which bands to run, so it goes to the engine directly."""
    return {"core.forced_filters": forced} if forced is not None else {}


def run_command(
    *,
    galaxies: Sequence[str],
    from_list: Optional[str],
    psf: Optional[str],
    out_dir: Optional[str],
    config_file: Optional[str],
    sets: Sequence[str],
    flags: Mapping[str, Optional[str]],
    base_filter: Optional[str],
    filters: Optional[str],
    forced: Optional[str],
    photometry: bool,
    make_plot: bool,
    jobs: Optional[int],
    resume: bool,
    rerun: Optional[str],
    retry_failed: bool,
    shard: Optional[str],
    timeout: Optional[float],
    scheduler: Optional[str],
) -> None:
    """Run one galaxy in this process (bands in parallel), or many on an executor."""
    from .batch import read_list

    paths = [Path(p) for p in galaxies]
    if from_list:
        paths += read_list(from_list)
    if not paths:
        raise ConfigError("no galaxy given: sphot run GALAXY.h5 [...] or --from-list FILE")
    settings = dict(
        psf=psf,
        config_file=config_file,
        sets=list(sets),
        flags=dict(flags),
        base_filter=base_filter,
        filters=_split(filters),
        forced=_split(forced),
        photometry=photometry,
        make_plot=make_plot,
        resume=resume,
        rerun=rerun,
    )
    batch = len(paths) > 1 or from_list or shard
    if not batch:
        if retry_failed or timeout or scheduler:
            log.info("--retry-failed, --timeout and --scheduler apply to batches only; ignored for one galaxy")
        summary, galaxy = _one(paths[0], out_dir, jobs=jobs, interactive=True, **settings)
        _print_summary(galaxy, summary)
        if summary["status"] != "ok":
            raise PartialFailure(f"{summary['galaxy']}: band(s) {summary['bands_failed']} failed; see the log and {summary['outputs'].get('galaxy', '')}")
        return
    _batch(paths, out_dir or ".", jobs=jobs, retry_failed=retry_failed, shard=shard, timeout=timeout, scheduler=scheduler, settings=settings)


def _config_for(path, out_dir, continuing, config_file, sets, flags, forced):
    from .config import load_config
    from .engine import is_sphot_file, state_path, stored_config

    stored = None
    if continuing:
        state = state_path(path, out_dir if out_dir is not None else (Path(path).parent if is_sphot_file(path) else "."))
        stored = stored_config(state) if state is not None else None
    cfg = load_config(config_file, sets=sets, flags=flags, galaxy_path=path, overrides=_overrides(forced) or None, stored=stored)
    for note in cfg.notes:
        log.info("note: %s", note)
    return cfg


def _one(path, out_dir, *, jobs, interactive, psf, config_file, sets, flags, base_filter, filters, forced, photometry, make_plot, resume, rerun):
    """Fit one galaxy file; returns (summary, galaxy state read back)."""
    from .engine import run_file
    from .io import read_sphot
    from .progress import make_reporter, null_progress

    from .engine import is_sphot_file

    continuing = bool(resume or rerun) or is_sphot_file(path)
    config = _config_for(path, out_dir, continuing, config_file, sets, flags, forced)
    reporter = make_reporter(Path(path).stem) if interactive else null_progress
    try:
        summary = run_file(
            path,
            out_dir,
            psf=psf,
            config=config,
            filters=filters,
            base_filter=base_filter,
            photometry=photometry,
            plot=make_plot,
            resume=resume,
            rerun=rerun,
            jobs=jobs,
            progress=reporter,
        )
    finally:
        close = getattr(reporter, "close", None)
        if close:
            close()
    galaxy = read_sphot(summary["outputs"]["sphot"])[0] if interactive else None
    return summary, galaxy


def process_galaxy(path, out_dir, *, settings: Dict[str, Any]) -> Dict[str, Any]:
    """Batch worker: one galaxy, bands fitted serially (the batch is the parallelism)."""
    summary, _ = _one(path, out_dir, jobs=1, interactive=False, **settings)
    if summary["status"] == "failed":
        raise FitError(f"base filter failed: {summary['message']}")
    outputs = summary.pop("outputs")
    summary["outputs"] = ";".join(Path(v).name for v in outputs.values())
    return summary


def outputs_exist(path, out_dir) -> bool:
    from .io import output_paths

    paths = output_paths(out_dir, Path(path).stem)
    return all(paths[k].exists() for k in ("sphot", "galaxy", "sources"))


def _batch(paths, out_dir, *, jobs, retry_failed, shard, timeout, scheduler, settings) -> None:
    from .batch import ProgressReporter, run_batch
    from .config import load_config
    from .registry import get_registry

    cfg = load_config(settings["config_file"], sets=settings["sets"], flags=settings["flags"])
    method = cfg.executor.method
    table = dict(cfg.tree["executor"].get(method, {}))
    if jobs is not None:
        table["jobs"] = jobs
    if scheduler:
        if "scheduler" not in table:
            raise ConfigError(f"--scheduler applies to the dask executor, not to {method!r}")
        table["scheduler"] = scheduler
    executor = get_registry().create("executor", method, table, where=f"[executor.{method}]")
    limit = timeout if timeout else (cfg.executor.timeout or None)
    process_one = functools.partial(process_galaxy, settings=settings)
    with executor:
        result = run_batch(
            paths,
            process_one,
            out_dir,
            executor=executor,
            resume=settings["resume"],
            retry_failed=retry_failed,
            shard=shard,
            timeout=limit,
            progress=ProgressReporter(),
            is_done=outputs_exist,
        )
    n_bad = len(result.failed) + len(result.skipped_failed)
    click.echo(
        f"sphot: {len(result.ok)} galaxies done, {len(result.failed)} failed, "
        f"{len(result.skipped_done)} already done, {len(result.skipped_failed)} failed earlier "
        f"({result.seconds:.1f} s); report: {result.report}",
        err=True,
    )
    if n_bad:
        raise PartialFailure(f"{n_bad} galaxies failed; see {result.report} and {Path(out_dir) / 'batch_logs'}")


def _fmt(v, spec):
    try:
        return format(v, spec) if v is not None and math.isfinite(v) else "-"
    except (TypeError, ValueError):
        return "-"


def _print_summary(galaxy, summary) -> None:
    from .io import galaxy_rows

    click.echo(f"{summary['galaxy']}: {summary['status']} in {summary['seconds']:.1f} s")
    click.echo(f"  {'filter':<7} {'flux':>11} {'mag':>7} {'mag_err':>7} {'r_eff':>7} {'n':>5} {'ellip':>5} {'chi2/dof':>8} {'stars':>5}  flags")
    for row in galaxy_rows(galaxy):
        click.echo(
            f"  {row['filter']:<7} {_fmt(row.get('flux'), '11.4g')} {_fmt(row.get('mag'), '7.3f')} {_fmt(row.get('mag_err'), '7.3f')} "
            f"{_fmt(row.get('r_eff'), '7.2f')} {_fmt(row.get('n'), '5.2f')} {_fmt(row.get('ellip'), '5.2f')} "
            f"{_fmt(row.get('chi2_dof'), '8.3f')} {row.get('n_sources', 0):>5}  {row['flags']}"
        )
    for key, value in summary["outputs"].items():
        click.echo(f"  wrote {value}")
