"""Reading galaxies and PSFs; writing NAME_sphot.h5 and the CSV catalogues.

Every reader validates what it reads and raises :class:`~sphot_core.errors.InputError`
with one line that says what is wrong and where. Every writer is atomic: it writes a
temporary file in the destination folder and renames it over the target, so an
interrupted or failed run never leaves a truncated output or destroys an earlier good
one.
"""

from __future__ import annotations

import contextlib
import csv
import io as _io
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ._version import __version__
from .data import Band, Galaxy, SourceTable
from .errors import InputError, OutputError
from .flags import GALAXY_FLAGS
from .psf import PSFModel
from .sersic import magnitude
from .stages import KernelFit, SersicResult, SkyResult

__all__ = [
    "load_galaxy",
    "read_galaxy_file",
    "read_psfs",
    "zeropoint_for",
    "zeropoint_mjy_per_sr",
    "write_sphot",
    "read_sphot",
    "write_galaxy_csv",
    "write_sources_csv",
    "write_csv",
    "galaxy_rows",
    "source_rows",
    "write_outputs",
    "atomic_path",
    "ensure_output_dir",
    "GALAXY_COLUMNS",
    "SOURCE_COLUMNS",
    "FORMAT_VERSION",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

#: NAME_galaxy.csv columns, in order (INTERFACE.md, then the colour error)
GALAXY_COLUMNS = (
    "filter",
    "x_0",
    "y_0",
    "amplitude",
    "r_eff",
    "n",
    "ellip",
    "theta",
    "flux",
    "flux_err",
    "mag",
    "mag_err",
    "sky",
    "chi2_dof",
    "n_sources",
    "converged",
    "flags",
    "mag_err_colour",
)
#: NAME_sources.csv columns, in order (INTERFACE.md, then star/galaxy separation)
SOURCE_COLUMNS = ("filter", "id", "x", "y", "flux", "flux_err", "flags", "spread_model", "spread_model_err")

_OVERSAMPLE_RE = re.compile(r"oversample[_-]?(\d+)x?", re.IGNORECASE)

_ARCSEC_PER_RADIAN = 180.0 * 3600.0 / math.pi


def zeropoint_mjy_per_sr(pixel_scale: float = 0.03) -> float:
    """AB zeropoint of a sum of pixels in MJy/sr for square pixels of ``pixel_scale`` arcsec.

    ``m = -2.5 log10(sum) + zp`` with ``zp = -6.10 - 2.5 log10(pixel solid angle in
    sr)``; 6.10 = 2.5 log10(1e6 Jy / 3631 Jy). For 0.03" pixels ``zp = 28.0865``.
    """
    pixel_sr = (float(pixel_scale) / _ARCSEC_PER_RADIAN) ** 2
    return -2.5 * math.log10(1e6 / 3631.0) - 2.5 * math.log10(pixel_sr)


# ------------------------------------------------------------------ atomic writes


def ensure_output_dir(path) -> Path:
    """Create ``path`` (with parents) and check it is writable."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (PermissionError, FileExistsError, NotADirectoryError, OSError) as exc:
        raise OutputError(f"cannot create output directory {p}: {exc.strerror or exc}", path=str(p)) from None
    if not p.is_dir():
        raise OutputError(f"output path {p} exists and is not a directory", path=str(p))
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {p} is not writable", path=str(p))
    return p


@contextlib.contextmanager
def atomic_path(target) -> Iterable[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success.

    On any exception the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}", path=str(target)) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise OutputError(f"cannot write {target}: {exc.strerror or exc}", path=str(target)) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_csv(path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows (dicts) as CSV atomically; NaN and None become empty cells."""
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([_cell(row.get(c)) for c in columns])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return Path(path)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(v) else format(float(v), ".10g")
    return str(v)


# ------------------------------------------------------------------------ reading


def _open_h5(path, what: str):
    import h5py

    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p}", path=str(p))
    if p.is_dir():
        raise InputError(f"{what} {p} is a directory, not an HDF5 file", path=str(p))
    try:
        ok = h5py.is_hdf5(str(p))
    except OSError as exc:
        raise InputError(f"cannot read {what} {p}: {exc}", path=str(p)) from None
    if not ok:
        raise InputError(f"{what} {p} is not an HDF5 file", path=str(p))
    try:
        return h5py.File(str(p), "r")
    except OSError as exc:
        raise InputError(f"cannot open {what} {p} (corrupt HDF5?): {exc}", path=str(p)) from None


def read_galaxy_file(path, filters: Optional[Sequence[str]] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, dict]]:
    """Images and dataset attributes of a galaxy HDF5 file.

    Returns ``(images, attributes)``: filter -> float64 image (exact zeros turned into
    NaN, as "no data") and filter -> dataset attributes. Validates that the requested
    filters exist, are 2-D numeric, share one shape and have finite pixels.
    """
    import h5py

    p = Path(path)
    images: Dict[str, np.ndarray] = {}
    attributes: Dict[str, dict] = {}
    with _open_h5(p, "galaxy file") as f:
        try:
            available = [k for k in f.keys() if isinstance(f[k], h5py.Dataset)]
        except (OSError, RuntimeError, KeyError) as exc:
            raise InputError(f"cannot read galaxy file {p} (corrupt HDF5?): {exc}", path=str(p)) from None
        if not available:
            raise InputError(f"galaxy file {p} holds no image datasets", path=str(p))
        wanted = list(filters) if filters else available
        missing = [flt for flt in wanted if flt not in available]
        if missing:
            raise InputError(
                f"filter {', '.join(missing)} not in galaxy file {p} (available: {', '.join(available)})",
                path=str(p),
                filter=missing[0],
            )
        shape = None
        for flt in wanted:
            ds = f[flt]
            if ds.ndim != 2:
                raise InputError(f"dataset {flt} of {p} is {ds.ndim}-D (shape {ds.shape}); an image must be 2-D", path=str(p), filter=flt)
            if ds.dtype.kind not in "fiu":
                raise InputError(f"dataset {flt} of {p} has non-numeric type {ds.dtype}", path=str(p), filter=flt)
            if shape is None:
                shape, first = ds.shape, flt
            elif ds.shape != shape:
                raise InputError(
                    f"dataset {flt} of {p} has shape {ds.shape} but {first} has {shape}: all filters must share one pixel grid",
                    path=str(p),
                    filter=flt,
                )
            try:
                img = np.array(ds[()], dtype=np.float64)
            except (OSError, RuntimeError) as exc:
                raise InputError(f"cannot read dataset {flt} of {p} (corrupt HDF5?): {exc}", path=str(p), filter=flt) from None
            img[img == 0.0] = np.nan
            img[~np.isfinite(img)] = np.nan
            if not np.isfinite(img).any():
                raise InputError(f"band {flt} of {p} has no finite pixels (all NaN)", path=str(p), filter=flt)
            images[flt] = img
            attributes[flt] = {k: _attr_value(v) for k, v in ds.attrs.items()}
    return images, attributes


def _attr_value(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


def _filter_pattern(flt: str) -> re.Pattern:
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(flt)}(?![A-Za-z0-9])", re.IGNORECASE)


def read_psfs(
    source,
    filters: Sequence[str],
    *,
    oversample: int = 1,
    kind: str = "effective",
    origins: Optional[Mapping[str, Sequence[int]]] = None,
) -> Dict[str, PSFModel]:
    """PSFs for ``filters`` from a folder of ``.npy`` files or one HDF5 file.

    Folder: the file whose name contains the filter name as a token
    (``F150W_PSF_0.03as_Oversample4x.npy``); the oversampling comes from
    ``OversampleNx`` in the name, else ``oversample``. HDF5: one dataset per filter,
    oversampling from the dataset's or the file's ``oversample`` attribute, else
    ``oversample``; an ``origin`` attribute ``[row, col]`` gives the origin of
    even-sized arrays (``origins`` does the same for any source).
    """
    if source is None or str(source) == "":
        raise InputError("no PSF source given: use --psf PSF_DIR_OR_FILE or [prep] psf in the config")
    p = Path(source)
    origins = dict(origins or {})
    if not p.exists():
        raise InputError(f"PSF source not found: {p}", path=str(p))
    out: Dict[str, PSFModel] = {}
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.suffix.lower() == ".npy")
        for flt in filters:
            pat = _filter_pattern(flt)
            hits = [q for q in files if pat.search(q.stem)]
            if not hits:
                raise InputError(
                    f"no PSF for filter {flt} in {p} (looked for a .npy file with {flt} in its name; "
                    f"found: {', '.join(q.name for q in files) or 'no .npy files'})",
                    path=str(p),
                    filter=flt,
                )
            if len(hits) > 1:
                raise InputError(f"several PSF files match filter {flt} in {p}: {', '.join(q.name for q in hits)}", path=str(p), filter=flt)
            q = hits[0]
            try:
                arr = np.load(q, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot read PSF file {q}: {exc}", path=str(q), filter=flt) from None
            m = _OVERSAMPLE_RE.search(q.stem)
            os_ = int(m.group(1)) if m else oversample
            out[flt] = PSFModel.from_array(arr, os_, origin=origins.get(flt), kind=kind, filter=flt, source=str(q))
        return out
    import h5py

    with _open_h5(p, "PSF file") as f:
        file_os = f.attrs.get("oversample")
        for flt in filters:
            if flt not in f or not isinstance(f[flt], h5py.Dataset):
                avail = [k for k in f.keys() if isinstance(f[k], h5py.Dataset)]
                raise InputError(f"no PSF for filter {flt} in {p} (available: {', '.join(avail) or 'none'})", path=str(p), filter=flt)
            ds = f[flt]
            try:
                arr = np.array(ds[()], dtype=float)
            except (OSError, RuntimeError, TypeError, ValueError) as exc:
                raise InputError(f"cannot read PSF {flt} of {p}: {exc}", path=str(p), filter=flt) from None
            os_ = ds.attrs.get("oversample", file_os if file_os is not None else oversample)
            origin = origins.get(flt, ds.attrs.get("origin"))
            out[flt] = PSFModel.from_array(
                arr, int(np.asarray(os_).item()), origin=origin, kind=kind, filter=flt, source=f"{p}:{flt}"
            )
    return out


def pixel_scale_for(attributes: Mapping[str, Any], config=None) -> Optional[float]:
    """Pixel scale (arcsec): the dataset attribute, else ``[prep] pixel_scale``; None if unknown."""
    scale = attributes.get("pixel_scale", config.prep.pixel_scale if config is not None else 0.0)
    return float(scale) if scale and float(scale) > 0 else None


def zeropoint_for(filter_name: str, attributes: Mapping[str, Any], config=None) -> Optional[float]:
    """AB zeropoint: ``[zeropoints]`` > dataset attribute > implied by the image units."""
    if config is not None and filter_name in config.zeropoints:
        return float(config.zeropoints[filter_name])
    if "zeropoint" in attributes:
        return float(attributes["zeropoint"])
    units = config.prep.image_units if config is not None else ""
    scale = pixel_scale_for(attributes, config)
    if units == "MJy/sr" and scale is not None:
        return zeropoint_mjy_per_sr(scale)
    return None


def load_galaxy(
    path,
    psf=None,
    *,
    config=None,
    filters: Optional[Sequence[str]] = None,
    base_filter: Optional[str] = None,
) -> Galaxy:
    """Read a galaxy file and its PSFs into a :class:`Galaxy` (uncropped).

    Parameters
    ----------
    path : path-like
        Galaxy HDF5 file (one 2-D dataset per filter).
    psf : path-like, optional
        PSF folder or HDF5 file; default ``[prep] psf`` of the config.
    config : SphotConfig, optional
        Default: :func:`sphot_core.config.load_config` with no overrides.
    filters : sequence of str, optional
        Filters to load; default ``[prep] filters`` or every filter in the file.
    base_filter : str, optional
        Default ``[core] base_filter``; must be among the loaded filters.
    """
    if config is None:
        from .config import load_config

        config = load_config(galaxy_path=path)
    p = Path(path)
    wanted = list(filters) if filters else list(config.prep.filters)
    images, attributes = read_galaxy_file(p, wanted or None)
    base = base_filter or config.core.base_filter
    if base not in images:
        raise InputError(
            f"base filter {base} is not among the filters of {p} being fitted ({', '.join(images)}); "
            "set --base-filter or [core] base_filter",
            path=str(p),
            filter=base,
        )
    psfs = read_psfs(
        psf if psf is not None else config.prep.psf,
        list(images),
        oversample=config.prep.psf_oversample,
        kind=config.prep.psf_kind,
        origins=config.prep.psf_origin,
    )
    bands: Dict[str, Band] = {}
    for flt, img in images.items():
        lib = psfs[flt]
        blur = config.prep.blur_psf.get(flt, 0.0)
        if blur > 0:
            lib = lib.blurred(blur)
        attrs_ = attributes[flt]
        bands[flt] = Band(
            filter=flt,
            data=img,
            psf=lib,
            library_psf=lib,
            zeropoint=zeropoint_for(flt, attrs_, config),
            pixel_scale=pixel_scale_for(attrs_, config),
        )
    shape = next(iter(images.values())).shape
    return Galaxy(
        name=p.stem,
        bands=bands,
        base_filter=base,
        crop_offset=(0, 0),
        input_shape=tuple(int(s) for s in shape),
        source_path=str(p),
    )


# -------------------------------------------------------------- NAME_sphot.h5

def _json(obj) -> str:
    return json.dumps(obj, default=_json_default, allow_nan=True)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _write_psf(group, name: str, psf: PSFModel) -> None:
    ds = group.create_dataset(name, data=psf.array, compression="gzip", shuffle=True)
    ds.attrs["oversample"] = psf.oversample
    ds.attrs["origin"] = np.asarray(psf.origin, dtype=np.int64)
    ds.attrs["source"] = psf.source or ""


def _read_psf(ds, filter_name: str) -> PSFModel:
    arr = np.array(ds[()], dtype=float)
    arr.setflags(write=False)
    return PSFModel(arr, int(ds.attrs["oversample"]), tuple(int(v) for v in ds.attrs["origin"]), filter=filter_name, source=str(ds.attrs.get("source", "")) or None)


def _write_sersic(group, res: SersicResult) -> None:
    g = group.create_group("sersic")
    g.attrs["params"] = _json(res.params)
    g.attrs["errors"] = _json(res.errors)
    g.attrs["names"] = _json(list(res.names))
    for key in ("flux", "flux_err", "loss", "chi2", "dof", "success", "message", "nfev", "flags", "sky_offset", "optimizer", "model", "flux_err_fixed_shape"):
        g.attrs[key] = getattr(res, key)
    if res.covariance is not None:
        g.create_dataset("covariance", data=np.asarray(res.covariance, dtype=float))


def _read_sersic(g) -> SersicResult:
    a = g.attrs
    cov = np.array(g["covariance"]) if "covariance" in g else None
    return SersicResult(
        params=json.loads(a["params"]),
        errors=json.loads(a["errors"]),
        names=tuple(json.loads(a["names"])),
        covariance=cov,
        flux=float(a["flux"]),
        flux_err=float(a["flux_err"]),
        loss=float(a["loss"]),
        chi2=float(a["chi2"]),
        dof=int(a["dof"]),
        success=bool(a["success"]),
        message=str(a["message"]),
        nfev=int(a["nfev"]),
        flags=int(a["flags"]),
        sky_offset=float(a["sky_offset"]),
        optimizer=str(a["optimizer"]),
        model=str(a["model"]),
        flux_err_fixed_shape=float(a.get("flux_err_fixed_shape", np.nan)),  # absent in files of 0.x before it
    )


def _write_band(g, band: Band) -> None:
    comp = dict(compression="gzip", shuffle=True)
    g.create_dataset("data", data=band.data, **comp)
    for name in ("noise", "galaxy_model", "star_model", "sky_model"):
        value = getattr(band, name)
        if value is not None:
            g.create_dataset(name, data=np.asarray(value, dtype=float), **comp)
    if band.mask is not None:
        g.create_dataset("mask", data=np.asarray(band.mask, dtype=bool), **comp)
    # derived images, stored for users and plots (ignored when reading back)
    g.create_dataset("star_subtracted", data=band.star_subtracted, **comp)
    g.create_dataset("residual", data=band.residual(), **comp)
    _write_psf(g, "psf", band.psf)
    if band.library_psf is not None and band.library_psf is not band.psf:
        _write_psf(g, "library_psf", band.library_psf)
    if band.sersic is not None:
        _write_sersic(g, band.sersic)
    if band.sources is not None:
        g.create_dataset("sources", data=band.sources.array)
    if band.sky is not None:
        g.attrs["sky_params"] = _json(band.sky.params)
        g.attrs["sky_method"] = band.sky.method
    if band.kernel is not None:
        k = band.kernel
        g.attrs["kernel"] = _json(
            {
                "family": k.family,
                "params": k.params,
                "loss": k.loss,
                "loss_before": k.loss_before,
                "n_anchors": k.n_anchors,
                "success": k.success,
                "message": k.message,
                "stats": k.stats,
            }
        )
    g.attrs["kernel_history"] = _json(band.kernel_history)
    g.attrs["history"] = _json(band.history)
    g.attrs["stages_done"] = _json(band.stages_done)
    g.attrs["status"] = band.status
    g.attrs["message"] = band.message
    g.attrs["flags"] = int(band.flags)
    g.attrs["zeropoint"] = np.nan if band.zeropoint is None else float(band.zeropoint)
    g.attrs["pixel_scale"] = np.nan if band.pixel_scale is None else float(band.pixel_scale)


def _read_band(g, flt: str) -> Band:
    a = g.attrs

    def opt(name):
        return np.array(g[name][()]) if name in g else None

    psf = _read_psf(g["psf"], flt)
    library = _read_psf(g["library_psf"], flt) if "library_psf" in g else psf
    band = Band(
        filter=flt,
        data=np.array(g["data"][()], dtype=float),
        psf=psf,
        library_psf=library,
        noise=opt("noise"),
        mask=opt("mask"),
        galaxy_model=opt("galaxy_model"),
        star_model=opt("star_model"),
        sky_model=opt("sky_model"),
        sersic=_read_sersic(g["sersic"]) if "sersic" in g else None,
        sources=SourceTable(np.array(g["sources"][()])) if "sources" in g else None,
        kernel_history=json.loads(a.get("kernel_history", "[]")),
        history=json.loads(a.get("history", "[]")),
        stages_done=json.loads(a.get("stages_done", "[]")),
        status=str(a.get("status", "pending")),
        message=str(a.get("message", "")),
        flags=int(a.get("flags", 0)),
        zeropoint=_nan_to_none(a.get("zeropoint")),
        pixel_scale=_nan_to_none(a.get("pixel_scale")),
    )
    if "sky_params" in a and band.sky_model is not None:
        band.sky = SkyResult(band.sky_model, json.loads(a["sky_params"]), str(a.get("sky_method", "")))
    if "kernel" in a:
        k = json.loads(a["kernel"])
        band.kernel = KernelFit(
            family=k["family"],
            params=k["params"],
            psf=psf,
            loss=k["loss"],
            loss_before=k["loss_before"],
            n_anchors=k["n_anchors"],
            success=k["success"],
            message=k["message"],
            stats=k["stats"],
        )
    return band


def _nan_to_none(v):
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def write_sphot(galaxy: Galaxy, path, config_toml: str = "") -> Path:
    """Write the full state of ``galaxy`` to ``path`` (atomically)."""
    import h5py

    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = "sphot"
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["sphot_version"] = __version__
            f.attrs["name"] = galaxy.name
            f.attrs["base_filter"] = galaxy.base_filter or ""
            f.attrs["filters"] = _json(galaxy.filters)
            f.attrs["crop_offset"] = np.asarray(galaxy.crop_offset, dtype=np.int64)
            f.attrs["input_shape"] = np.asarray(galaxy.input_shape or galaxy.shape, dtype=np.int64)
            f.attrs["source_path"] = galaxy.source_path
            f.attrs["meta"] = _json(galaxy.meta)
            f.attrs["config"] = config_toml
            bands = f.create_group("bands")
            for flt, band in galaxy.bands.items():
                _write_band(bands.create_group(flt), band)
    return path


def read_sphot(path) -> Tuple[Galaxy, str]:
    """Read a NAME_sphot.h5 file back into a :class:`Galaxy` and its config TOML text."""
    p = Path(path)
    with _open_h5(p, "sphot file") as f:
        if f.attrs.get("format") != "sphot":
            raise InputError(f"{p} is not a sphot output file (no 'format = sphot' attribute)", path=str(p))
        version = int(f.attrs.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise InputError(f"{p} was written by a newer sphot (format {version}); upgrade sphot", path=str(p))
        try:
            filters = json.loads(f.attrs["filters"])
            bands = {flt: _read_band(f["bands"][flt], flt) for flt in filters}
            galaxy = Galaxy(
                name=str(f.attrs["name"]),
                bands=bands,
                base_filter=str(f.attrs["base_filter"]) or None,
                crop_offset=tuple(int(v) for v in f.attrs["crop_offset"]),
                input_shape=tuple(int(v) for v in f.attrs["input_shape"]),
                source_path=str(f.attrs["source_path"]),
                meta=json.loads(f.attrs["meta"]),
            )
            config_text = str(f.attrs["config"])
        except (KeyError, OSError, RuntimeError, ValueError) as exc:
            raise InputError(f"cannot read sphot file {p} (incomplete or corrupt): {exc}", path=str(p)) from None
    return galaxy, config_text


# ------------------------------------------------------------------------ CSVs


def _n_params(band: Band) -> int:
    """Free parameters of the final joint model: Sersic, 3 per source, sky."""
    n = len(band.sersic.names) if band.sersic is not None else 0
    n += 3 * (len(band.sources) if band.sources is not None else 0)
    return n + (len(band.sky.params) if band.sky is not None else 0)


def galaxy_rows(galaxy: Galaxy) -> List[Dict[str, Any]]:
    """One row per band for NAME_galaxy.csv (coordinates on the input grid)."""
    rows = []
    dx, dy = galaxy.crop_offset
    for flt, band in galaxy.bands.items():
        res = band.sersic
        flags = int(band.flags) | (int(res.flags) if res is not None else 0)
        if band.status == "failed":
            flags |= GALAXY_FLAGS.BAND_FAILED
        row: Dict[str, Any] = {"filter": flt, "flags": flags}
        if res is not None and band.status != "failed":
            p = res.params
            row.update(
                x_0=p.get("x_0", np.nan) + dx,
                y_0=p.get("y_0", np.nan) + dy,
                amplitude=p.get("amplitude", p.get("amplitude_bulge")),
                r_eff=p.get("r_eff", p.get("r_eff_bulge")),
                n=p.get("n", p.get("n_bulge")),
                ellip=p.get("ellip", p.get("ellip_bulge")),
                theta=p.get("theta", p.get("theta_bulge")),
                flux=res.flux,
                flux_err=res.flux_err,
            )
            row["mag"], row["mag_err"] = magnitude(res.flux, res.flux_err, band.zeropoint)
            row["mag_err_colour"] = magnitude(res.flux, res.flux_err_fixed_shape, band.zeropoint)[1]
            row["sky"] = float(np.mean(band.sky_model[band.valid])) if band.sky_model is not None and band.valid.any() else 0.0
            row["chi2_dof"] = band.reduced_chi2(_n_params(band))
            row["n_sources"] = len(band.sources) if band.sources is not None else 0
            converged = res.success and not (flags & (GALAXY_FLAGS.LOOP_NOT_CONVERGED | GALAXY_FLAGS.NOT_CONVERGED))
            row["converged"] = bool(converged and band.status == "done")
        else:
            row["converged"] = False
            row["n_sources"] = len(band.sources) if band.sources is not None else 0
        rows.append(row)
    return rows


def source_rows(galaxy: Galaxy) -> List[Dict[str, Any]]:
    """One row per kept point source for NAME_sources.csv (input-grid coordinates)."""
    rows = []
    dx, dy = galaxy.crop_offset
    for flt, band in galaxy.bands.items():
        if band.sources is None or band.status == "failed":
            continue
        t = band.sources.array
        for i in range(len(t)):
            rows.append(
                {
                    "filter": flt,
                    "id": int(t["id"][i]),
                    "x": float(t["x"][i]) + dx,
                    "y": float(t["y"][i]) + dy,
                    "flux": float(t["flux"][i]),
                    "flux_err": float(t["flux_err"][i]),
                    "flags": int(t["flags"][i]),
                    "spread_model": float(t["spread_model"][i]),
                    "spread_model_err": float(t["spread_model_err"][i]),
                }
            )
    return rows


def write_galaxy_csv(galaxy: Galaxy, path) -> Path:
    return write_csv(path, GALAXY_COLUMNS, galaxy_rows(galaxy))


def write_sources_csv(galaxy: Galaxy, path) -> Path:
    return write_csv(path, SOURCE_COLUMNS, source_rows(galaxy))


def output_paths(out_dir, name: str) -> Dict[str, Path]:
    d = Path(out_dir)
    return {
        "sphot": d / f"{name}_sphot.h5",
        "galaxy": d / f"{name}_galaxy.csv",
        "sources": d / f"{name}_sources.csv",
        "aperture": d / f"{name}_aperture.csv",
        "plot": d / f"{name}.png",
    }


def write_outputs(galaxy: Galaxy, out_dir, config_toml: str = "", *, csv: bool = True) -> Dict[str, Path]:
    """Write NAME_sphot.h5 and (with ``csv``) NAME_galaxy.csv and NAME_sources.csv."""
    ensure_output_dir(out_dir)
    paths = output_paths(out_dir, galaxy.name)
    write_sphot(galaxy, paths["sphot"], config_toml)
    written = {"sphot": paths["sphot"]}
    if csv:
        write_galaxy_csv(galaxy, paths["galaxy"])
        write_sources_csv(galaxy, paths["sources"])
        written.update(galaxy=paths["galaxy"], sources=paths["sources"])
    return written
