"""Configuration: packaged defaults -> merged layers -> validated, immutable objects.

Precedence (later wins, tables are deep-merged key by key)::

    packaged defaults
    < sphot_config.toml (the working directory's; if there is none, the one next to
      the galaxy file)
    < --config FILE
    < --set section.key=value   (value parsed as TOML, else taken as a string)
    < named flags (--fitter, --refit, --kernel, --sky, --executor)

Strategy choices are names looked up in the plugin registry; a strategy's options live
in a sub-table named after it (``[refit] method = "nnls"`` and ``[refit.nnls] ...``)
and are validated by the strategy's own options class. Unknown sections, keys and
names are errors that suggest close matches.

Config files of the original tool keep working: their key names are translated to
the new ones (:data:`LEGACY_KEYS`), each translation noted once in the log.

Nothing here runs at import time, and a :class:`SphotConfig` is never mutated: use
:func:`load_config` again (or :meth:`SphotConfig.with_overrides`) for a changed copy.
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
import os
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import attrs

from .errors import ConfigError
from .hookspecs import STAGES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "SphotConfig",
    "load_config",
    "default_config_dict",
    "read_toml",
    "parse_set",
    "to_toml",
    "CONFIG_FILENAME",
    "NAMED_FLAGS",
    "LEGACY_KEYS",
]

log = logging.getLogger(__name__)

CONFIG_FILENAME = "sphot_config.toml"

#: command-line flag -> dotted config key it sets
NAMED_FLAGS = {
    "fitter": "fitter.method",
    "refit": "refit.method",
    "kernel": "psf-calib.family",
    "sky": "sky.method",
    "executor": "executor.method",
}

DEFAULT_LABEL = "default"


# ---------------------------------------------------------------------- validators


def _positive(instance, attribute, value):
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _non_negative(instance, attribute, value):
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _one_of(*choices):
    def check(instance, attribute, value):
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {', '.join(map(repr, choices))}, got {value!r}")

    return check


def _at_least(minimum):
    def check(instance, attribute, value):
        if not value >= minimum:
            raise ValueError(f"{attribute.name} must be >= {minimum}, got {value!r}")

    return check


def _fraction(instance, attribute, value):
    if not 0 < value <= 1:
        raise ValueError(f"{attribute.name} must be in (0, 1], got {value!r}")


def _str_list(value):
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    return tuple(str(v) for v in value)


def _float_map(value):
    return {str(k): float(v) for k, v in dict(value).items()}


# ------------------------------------------------------------------ section classes


@attrs.frozen
class PrepConfig:
    """``[prep]``: reading and preparing the cutouts."""

    image_units: str = attrs.field(default="MJy/sr", validator=_one_of("MJy/sr", ""))
    pixel_scale: float = attrs.field(default=0.03, validator=_non_negative)
    filters: Tuple[str, ...] = attrs.field(default=(), converter=_str_list)
    psf: str = ""
    psf_oversample: int = attrs.field(default=1, validator=_positive)
    psf_kind: str = attrs.field(default="effective", validator=_one_of("effective", "optical"))
    blur_psf: Dict[str, float] = attrs.field(factory=dict, converter=_float_map)
    psf_origin: Dict[str, Any] = attrs.field(factory=dict)
    custom_initial_crop: float = attrs.field(default=1.0, validator=_fraction)
    auto_crop: bool = True
    auto_crop_factor: float = attrs.field(default=8.0, validator=_positive)
    auto_crop_min_size: int = attrs.field(default=161, validator=_at_least(31))


@attrs.frozen
class CoreConfig:
    """``[core]``: the alternating loop, base/scale/forced fits."""

    base_filter: str = "F150W"
    iter_basefit: int = attrs.field(default=10, validator=_non_negative)
    iter_scalefit: int = attrs.field(default=5, validator=_non_negative)
    mainloop_min_iter: int = attrs.field(default=2, validator=_non_negative)
    mainloop_convergence_patience: int = attrs.field(default=2, validator=_positive)
    mainloop_convergence_atol: float = attrs.field(default=0.01, validator=_positive)
    mainloop_convergence_sigma: float = attrs.field(default=0.1, validator=_non_negative)
    fit_complex_model: bool = False
    fit_nucleus: bool = False
    scale_shift_max: float = attrs.field(default=0.0, validator=_non_negative)
    allow_refit: bool = False
    scale_free: Tuple[str, ...] = attrs.field(default=(), converter=_str_list)
    forced_filters: Tuple[str, ...] = attrs.field(default=(), converter=_str_list)
    residual_clip_sigma: float = attrs.field(default=15.0, validator=_positive)
    mask_aper_size_in_r_eff: float = attrs.field(default=3.5, validator=_positive)
    joint_linear: bool = True
    joint_linear_sky: bool = True
    joint_linear_galaxy: bool = True
    wavelength_shape: bool = False
    wavelength_degree_n: int = attrs.field(default=1, validator=_non_negative)
    wavelength_degree_r_eff: int = attrs.field(default=1, validator=_non_negative)
    correlated_errors: bool = True


@attrs.frozen
class FitterConfig:
    """``[fitter]``: Sersic optimizers by name, loss and regularisation."""

    method: str = "levmar"
    primer: str = "levmar"
    first_iteration: str = "levmar"
    use_final_polish: bool = False
    polish: str = "lbfgsb"
    loss: str = attrs.field(default="chi2", validator=_one_of("chi2", "robust"))
    primer_loss: str = attrs.field(default="robust", validator=_one_of("chi2", "robust"))
    robust_kappa: float = attrs.field(default=10.0, validator=_positive)
    regularize_aspect: bool = False
    aspect_prior_sigma: float = attrs.field(default=1.0, validator=_positive)
    solve_sky: bool = False


@attrs.frozen
class PSFConfig:
    """``[psf]``: point-source photometry."""

    method: str = "ladder"
    forced_method: str = "forced"
    center_mask_r_in_fwhm: float = attrs.field(default=1.0, validator=_non_negative)
    redetect_each_iteration: bool = False
    scale_band_sources: str = attrs.field(default="base", validator=_one_of("base", "detect"))
    galaxy_footprint_r_eff: float = attrs.field(default=2.0, validator=_non_negative)
    scale_leftovers_r_eff: float = attrs.field(default=2.0, validator=_non_negative)
    scale_unresolved: bool = True
    extended_spread_epsilon: float = attrs.field(default=0.005, validator=_non_negative)
    extended_spread_kappa: float = attrs.field(default=4.0, validator=_non_negative)
    substructure_density_sigma: float = attrs.field(default=3.0, validator=_non_negative)


@attrs.frozen
class RefitConfig:
    """``[refit]``: the joint refit after detection."""

    method: str = "nnls"


@attrs.frozen
class SkyConfig:
    """``[sky]``: the sky estimator."""

    method: str = "plane"
    galaxy_mask_r_eff: float = attrs.field(default=3.5, validator=_non_negative)


@attrs.frozen
class CalibConfig:
    """``[psf-calib]``: PSF kernel calibration."""

    in_mainloop: bool = True
    family: str = "gaussian"
    method: str = "multi_source"
    kernel_fit_skip_on_convergence: bool = True
    kernel_skip_threshold: float = attrs.field(default=1e-3, validator=_positive)
    damping: float = attrs.field(default=0.5, validator=_fraction)
    center_mask_r_in_galaxy_size: float = attrs.field(default=1.5, validator=_non_negative)


@attrs.frozen
class ExecutorConfig:
    """``[executor]``: how many galaxies (or bands) run at once, and where."""

    method: str = "processes"
    timeout: float = attrs.field(default=0.0, validator=_non_negative)


@attrs.frozen
class _Section:
    """How one TOML section is validated."""

    cls: Optional[type]
    #: field name -> stage kind, for fields holding strategy names
    names: Dict[str, str] = attrs.field(factory=dict)
    #: stage kinds whose strategies may have option sub-tables in this section
    tables: Tuple[str, ...] = ()


SECTIONS: Dict[str, _Section] = {
    "prep": _Section(PrepConfig),
    "core": _Section(CoreConfig),
    "fitter": _Section(
        FitterConfig,
        {"method": "fitter", "primer": "fitter", "first_iteration": "fitter", "polish": "fitter"},
        ("fitter",),
    ),
    "psf": _Section(PSFConfig, {"method": "point_sources", "forced_method": "point_sources"}, ("point_sources",)),
    "refit": _Section(RefitConfig, {"method": "refit"}, ("refit",)),
    "sky": _Section(SkyConfig, {"method": "sky"}, ("sky",)),
    "psf-calib": _Section(CalibConfig, {"family": "kernel", "method": "calibrator"}, ("kernel", "calibrator")),
    "aperture": _Section(None),  # validated by sphot_core.aperture.ApertureOptions
    "executor": _Section(ExecutorConfig, {"method": "executor"}, ("executor",)),
    "zeropoints": _Section(None),
    "wavelengths": _Section(None),
}

_ATTR = {"psf-calib": "calib"}


def _aperture_options_class():
    from .aperture import ApertureOptions

    return ApertureOptions


# ------------------------------------------------------------------ legacy mapping

_IGNORED = object()

#: (section, key) of the original tool -> new dotted key, or (None, reason) when the
#: knob has no equivalent any more. "{calibrator}" is resolved to the calibrator chosen
#: in the same file (or the default).
LEGACY_KEYS: Dict[Tuple[str, str], Tuple[Optional[str], str]] = {
    ("prep", "PSF_file"): ("prep.psf", ""),
    ("core", "use_dual_annealing"): ("fitter.first_iteration", "true -> 'dual_annealing'"),
    ("core", "use_final_polish"): ("fitter.use_final_polish", ""),
    ("psf-calib", "kernel_family"): ("psf-calib.family", ""),
    ("psf-calib", "kernel_fit_objective"): ("psf-calib.method", ""),
    ("psf", "final_refit_method"): ("refit.method", ""),
    ("psf", "final_joint_refit"): ("refit.method", "false -> 'none' when the refit was 'iterative'"),
    ("psf", "final_refit_xy_bounds"): ("refit.iterative.xy_bounds", ""),
    ("psf", "final_refit_iterations"): ("refit.iterative.max_iterations", ""),
    ("psf", "final_refit_detect_th"): ("refit.iterative.detect_threshold", ""),
    ("psf", "final_refit_dedup_psfsigma"): ("refit.iterative.dedup_psfsigma", ""),
    ("psf", "final_refit_residual_tol"): ("refit.iterative.residual_tol", ""),
    ("psf", "final_refit_catastrophic_flux_factor"): ("refit.iterative.catastrophic_flux_factor", ""),
    ("psf", "mask_aper_size_in_r_eff"): ("core.mask_aper_size_in_r_eff", ""),
    ("psf", "residual_clip_sigma"): ("core.residual_clip_sigma", ""),
}
for _k in (
    "th_min",
    "th_max",
    "th_iter",
    "th_max_consec_empty",
    "bkg_refit_per_iteration",
    "bkg_floor_factor",
    "ladder_dedup_psfsigma",
    "finder_kwargs",
    "raise_error",
    "cuts_pos_err_max",
    "cuts_res_cen_sigma_clip",
    "cuts_cfit_sigma_clip",
    "cuts_pos_diff_median_factor",
    "cuts_flux_SNR_min",
):
    LEGACY_KEYS[("psf", _k)] = (f"psf.ladder.{_k}", "")
for _k in ("leftover_max_iterations", "leftover_detect_k_sigma", "leftover_dedup_psfsigma", "leftover_box_size"):
    LEGACY_KEYS[("psf", _k)] = (f"refit.nnls.{_k}", "")
for _k in (
    "kernel_anchor_K",
    "kernel_fit_stamp_half_min",
    "kernel_fit_stamp_half_in_sigmaeff",
    "kernel_fit_max_neighbors",
    "kernel_fit_neighbor_pad_pix",
    "calib_xy_bounds",
):
    LEGACY_KEYS[("psf-calib", _k)] = (f"psf-calib.{{calibrator}}.{_k}", "")
for _k, _why in {
    "scan_method": "the detection matched filter now always follows the calibrated PSF's measured FWHM",
    "scan_metric": "the detection matched filter now always follows the calibrated PSF's measured FWHM",
    "scan_top_k": "the detection matched filter now always follows the calibrated PSF's measured FWHM",
    "fwhm_method": "the detection matched filter now always follows the calibrated PSF's measured FWHM",
    "center_mask_r_in_fwhm": "it was never read under [psf-calib]; see center_mask_r_in_galaxy_size",
}.items():
    LEGACY_KEYS[("psf-calib", _k)] = (None, _why)
LEGACY_KEYS[("prep", "sigma_guess")] = (None, "the galaxy size now comes from its azimuthal median profile")
for _k, _why in {
    "cuts_chi2dof_median_factor": "it was never used by the original tool either",
    "final_refit_fit_shape": "stamp sizes now follow the PSF's encircled energy",
    "modelimg_render_shape": "stamp sizes now follow the PSF's encircled energy",
    "grouper_separation_in_psfsigma": "sources are fitted jointly, without photutils groups",
    "PSFPhotometry_group_warning_threshold": "sources are fitted jointly, without photutils groups",
    "final_refit_group_warning_threshold": "sources are fitted jointly, without photutils groups",
    "PSFPhotometry_aperture_radius": "initial fluxes come from the joint linear solve",
    "PSFPhotometry_fitter_maxiters": "fluxes are solved linearly",
    "PSFPhotometry_fit_shape_in_fwhm": "stamp sizes now follow the PSF's encircled energy",
    "localbkg_bounds_in_psfsigma": "the sky is a fitted component, no local annulus background",
    "bkg_sigma_clip": "noise statistics are sigma-clipped MAD estimates",
    "bkg_box_size": "noise statistics are sigma-clipped MAD estimates",
    "bkg_filter_size": "noise statistics are sigma-clipped MAD estimates",
    "dao_fwhm_factor": "the matched filter follows the PSF's measured FWHM",
}.items():
    LEGACY_KEYS[("psf", _k)] = (None, _why)
for _k, _why in {
    "plot": "use `sphot plot` for figures",
    "measure_on": "aperture fluxes are always measured on the star-subtracted image",
    "error_on": "aperture errors come from the sky-aperture scatter and the noise map",
    "measure_sky_on": "the aperture sky always comes from the masked residual",
    "custom_aperture": "not supported",
}.items():
    LEGACY_KEYS[("aperture", _k)] = (None, _why)

_LEGACY_VALUES = {
    ("aperture", "fit_isophot_to"): {"sersic_modelimg": "galaxy_model", "psf_sub_data": "star_subtracted"},
    ("aperture", "fill_replace_with"): {"sersic_modelimg": "model"},
}


def _translate_legacy(tree: Dict[str, Any], label: str, notes: List[str]) -> Dict[str, Any]:
    """Rewrite the original tool's keys of one config layer into the new layout."""
    if not any((s, k) in LEGACY_KEYS or (s, k) in _LEGACY_VALUES for s, sec in tree.items() if isinstance(sec, dict) for k in sec):
        return tree
    tree = copy.deepcopy(tree)
    calib = tree.get("psf-calib", {})
    calibrator = calib.get("kernel_fit_objective") or calib.get("method") or "multi_source"
    moves: List[Tuple[str, Any]] = []
    for (section, key), (target, why) in LEGACY_KEYS.items():
        sec = tree.get(section)
        if not isinstance(sec, dict) or key not in sec:
            continue
        value = sec.pop(key)
        if target is None:
            notes.append(f"{label}: [{section}] {key} is no longer used ({why}); ignored")
            continue
        target = target.format(calibrator=calibrator)
        if (section, key) == ("core", "use_dual_annealing"):
            if not value:
                notes.append(f"{label}: [core] use_dual_annealing = false -> default first-iteration optimizer")
                continue
            value = "dual_annealing"
        if (section, key) == ("psf", "final_joint_refit"):
            refit = tree.get("psf", {}).get("final_refit_method", "iterative")
            if value or refit != "iterative":
                notes.append(f"{label}: [psf] final_joint_refit is deprecated; ignored")
                continue
            value = "none"
        moves.append((target, value))
        notes.append(f"{label}: [{section}] {key} is deprecated, use {_fmt_key(target)}")
    for target, value in moves:
        _set_path(tree, target.split("."), value)
    for (section, key), mapping in _LEGACY_VALUES.items():
        sec = tree.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str) and sec[key] in mapping:
            new = mapping[sec[key]]
            notes.append(f"{label}: [{section}] {key} = {sec[key]!r} is now {new!r}")
            sec[key] = new
    return tree


def _fmt_key(dotted: str) -> str:
    parts = dotted.split(".")
    return f"[{'.'.join(parts[:-1])}] {parts[-1]}"


# --------------------------------------------------------------------- tree helpers


def _set_path(tree: Dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[path[-1]] = value


def _walk(tree: Mapping[str, Any], prefix: Tuple[str, ...] = ()) -> Iterable[Tuple[Tuple[str, ...], Any]]:
    """Leaves of a nested dict; inline tables of scalars (e.g. blur_psf) count as leaves
    only when empty, otherwise each entry is a leaf."""
    for key, value in tree.items():
        path = prefix + (key,)
        if isinstance(value, dict) and value:
            yield from _walk(value, path)
        else:
            yield path, value


def _merge(base: Dict[str, Any], overlay: Mapping[str, Any], label: str, sources: Dict[Tuple[str, ...], str], prefix=()):
    for key, value in overlay.items():
        path = prefix + (key,)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, label, sources, path)
            if not value:
                sources.setdefault(path, label)
        else:
            base[key] = copy.deepcopy(value)
            if isinstance(value, dict):
                for leaf, _ in _walk(value, path):
                    sources[leaf] = label
                sources[path] = label
            else:
                sources[path] = label


# ------------------------------------------------------------------------- reading


def read_toml(path, what: str = "config file") -> Dict[str, Any]:
    """Parse a TOML file; errors name the file and the line."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {p}", path=str(p)) from None
    except IsADirectoryError:
        raise ConfigError(f"{what} is a directory, not a file: {p}", path=str(p)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {p}: {exc.strerror or exc}", path=str(p)) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {p} is not UTF-8 text", path=str(p)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {p}: TOML syntax error: {_toml_message(exc, raw)}", path=str(p)) from None


def _toml_message(exc: Exception, raw: bytes) -> str:
    """The parser's message, with a line number also when it says "end of document"."""
    msg = str(exc)
    if "end of document" in msg:
        n_lines = raw.decode("utf-8", "replace").rstrip("\n").count("\n") + 1
        msg = msg.replace("(at end of document)", f"(at line {n_lines}, end of file)")
    return msg


def default_config_dict() -> Dict[str, Any]:
    """The packaged defaults as a dict (a fresh copy)."""
    text = resources.files("sphot_core").joinpath("default_config.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_set(assignment: str) -> Tuple[Tuple[str, ...], Any]:
    """Parse ``section.key=value`` (value as TOML, else a string)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    key, _, value = assignment.partition("=")
    path = tuple(p.strip() for p in key.strip().split("."))
    if len(path) < 2 or not all(path):
        raise ConfigError(f"--set {assignment!r}: the key must be section.key (e.g. refit.method=nnls)")
    return path, _parse_value(value.strip())


def find_user_config(galaxy_path=None, cwd=None) -> Optional[Path]:
    """``sphot_config.toml`` of the working directory, else next to the galaxy file."""
    candidates = [Path(cwd or os.getcwd()) / CONFIG_FILENAME]
    if galaxy_path is not None:
        candidates.append(Path(galaxy_path).resolve().parent / CONFIG_FILENAME)
    for c in candidates:
        if c.is_file():
            return c
    return None


# ---------------------------------------------------------------------- validation


def _suggest(key: str, valid: Iterable[str]) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"{hint} Valid: {', '.join(sorted(valid))}"


def _where(sources: Mapping[Tuple[str, ...], str], path: Tuple[str, ...]) -> str:
    label = sources.get(path)
    while label is None and len(path) > 1:
        path = path[:-1]
        label = sources.get(path)
    return f" (from {label})" if label and label != DEFAULT_LABEL else ""


def _build_section(cls, values: Mapping[str, Any], section: str, sources) -> Any:
    from .registry import build_options

    def where(key):
        return f"[{section}]{_where(sources, (section, key) if key else (section,))}"

    return build_options(cls, values, where)


@attrs.frozen(eq=False)
class SphotConfig:
    """The validated, immutable configuration.

    Attributes
    ----------
    prep, core, fitter, psf, refit, sky, calib, executor
        Section objects (``calib`` is ``[psf-calib]``).
    aperture
        The aperture-photometry options object.
    zeropoints : dict
        Filter -> AB zeropoint.
    wavelengths : dict
        Filter -> pivot wavelength in micron (``[core] wavelength_shape``).
    options : dict
        ``(stage, canonical name) -> options object`` for every strategy that is
        selected or has a table in the configuration.
    tree : dict
        The effective configuration as nested dicts (what ``config show`` prints).
    sources : dict
        Dotted key -> where its value came from.
    notes : tuple of str
        Deprecation notes (original-tool keys that were translated).
    """

    prep: PrepConfig
    core: CoreConfig
    fitter: FitterConfig
    psf: PSFConfig
    refit: RefitConfig
    sky: SkyConfig
    calib: CalibConfig
    executor: ExecutorConfig
    aperture: Any
    zeropoints: Dict[str, float]
    options: Dict[Tuple[str, str], Any]
    tree: Dict[str, Any]
    sources: Dict[str, str]
    notes: Tuple[str, ...] = ()
    layers: Tuple[Tuple[str, Dict[str, Any]], ...] = ()
    wavelengths: Dict[str, float] = attrs.field(factory=dict)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_layers(cls, layers: Sequence[Tuple[str, Dict[str, Any]]], registry=None) -> "SphotConfig":
        """Merge ``(label, tree)`` layers over the defaults and validate."""
        from .registry import build_options, get_registry

        registry = registry or get_registry()
        notes: List[str] = []
        tree = default_config_dict()
        src: Dict[Tuple[str, ...], str] = {}
        for path, _ in _walk(tree):
            src[path] = DEFAULT_LABEL
        translated = []
        for label, layer in layers:
            layer = _translate_legacy(layer, label, notes)
            translated.append((label, layer))
            _check_sections(layer, label)
            _merge(tree, layer, label, src)
        for n in notes:
            log.info("deprecated config key: %s", n)
        sections: Dict[str, Any] = {}
        options: Dict[Tuple[str, str], Any] = {}
        for name, spec in SECTIONS.items():
            values = tree.get(name, {})
            if name == "zeropoints":
                sections["zeropoints"] = _number_table("zeropoints", values, src, what="finite number")
                continue
            if name == "wavelengths":
                sections["wavelengths"] = _number_table("wavelengths", values, src, positive=True, what="positive wavelength in micron")
                continue
            if name == "aperture":
                sections["aperture"] = _build_section(_aperture_options_class(), values, name, src)
                continue
            plain = {k: v for k, v in values.items() if not (isinstance(v, dict) and k not in _dict_fields(spec.cls))}
            subtables = {k: v for k, v in values.items() if k not in plain}
            obj = _build_section(spec.cls, plain, name, src)
            # strategy names must be registered
            for fname, stage in spec.names.items():
                reg = registry.get(stage, getattr(obj, fname), where=f"[{name}] {fname}{_where(src, (name, fname))}")
                obj = attrs.evolve(obj, **{fname: reg.name})
            # option tables
            for tname, table in subtables.items():
                reg = _lookup_table(registry, spec.tables, tname, name, src)
                options[(reg.stage, reg.name)] = build_options(
                    reg.spec.options,
                    table,
                    lambda key, n=name, t=tname: f"[{n}.{t}]{_where(src, (n, t, key) if key else (n, t))}",
                )
                if reg.name != tname:
                    values.pop(tname)
                    values[reg.name] = table
            for fname, stage in spec.names.items():
                reg = registry.get(stage, getattr(obj, fname))
                if (stage, reg.name) not in options:
                    options[(stage, reg.name)] = build_options(reg.spec.options, {}, f"[{name}.{reg.name}]")
            sections[_ATTR.get(name, name)] = obj
        effective = _effective_tree(sections, options)
        sources = {".".join(k): v for k, v in src.items()}
        return cls(
            options=options,
            tree=effective,
            sources=sources,
            notes=tuple(notes),
            layers=tuple(translated),
            **sections,
        )

    def with_overrides(self, overrides: Mapping[str, Any], label: str = "override", registry=None) -> "SphotConfig":
        """A new config with dotted-key overrides applied on top of this one."""
        layer: Dict[str, Any] = {}
        for key, value in overrides.items():
            _set_path(layer, tuple(key.split(".")), value)
        return SphotConfig.from_layers(list(self.layers) + [(label, layer)], registry=registry)

    @classmethod
    def from_toml_text(cls, text: str, label: str = "stored config", registry=None) -> "SphotConfig":
        """Rebuild from the TOML text stored in a NAME_sphot.h5 file."""
        try:
            tree = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{label}: TOML syntax error: {exc}") from None
        return cls.from_layers([(label, tree)], registry=registry)

    # ---------------------------------------------------------------- access
    def strategy_options(self, stage: str, name: str) -> Any:
        from .registry import canonical

        for (s, n), opts in self.options.items():
            if s == stage and canonical(n) == canonical(name):
                return opts
        return None

    def build(self, stage: str, name: Optional[str] = None, registry=None) -> Any:
        """Instantiate a strategy (default: the one selected by the stage's section)."""
        from .registry import get_registry

        registry = registry or get_registry()
        if name is None:
            section = STAGES[stage][2]
            field = {"kernel": "family"}.get(stage, "method")
            name = getattr(getattr(self, _ATTR.get(section, section)), field)
        reg = registry.get(stage, name)
        opts = self.strategy_options(stage, reg.name)
        if opts is None:
            return registry.create(stage, reg.name, {})
        return reg.create(opts)

    def to_toml(self, with_sources: bool = False) -> str:
        """The effective configuration as TOML (optionally with each value's origin)."""
        return to_toml(self.tree, self.sources if with_sources else None)


def _dict_fields(cls) -> Tuple[str, ...]:
    if cls is None or not attrs.has(cls):
        return ()
    return tuple(f.name for f in attrs.fields(cls) if isinstance(f.default, attrs.Factory) and f.default.factory is dict)


def _check_sections(layer: Mapping[str, Any], label: str) -> None:
    for key, value in layer.items():
        if key not in SECTIONS:
            raise ConfigError(f"{label}: unknown section [{key}].{_suggest(key, SECTIONS)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: [{key}] must be a table, got {value!r}")


def _lookup_table(registry, stages: Sequence[str], tname: str, section: str, src):
    from .errors import PluginError

    where = f"[{section}.{tname}]{_where(src, (section, tname))}"
    if not stages:
        raise ConfigError(f"{where}: [{section}] has no sub-tables")
    found = []
    errors = []
    for stage in stages:
        try:
            found.append(registry.get(stage, tname, where=where))
        except PluginError as exc:
            errors.append(exc)
    if len(found) > 1:
        raise ConfigError(f"{where}: {tname!r} names both a {STAGES[found[0].stage][1]} and a {STAGES[found[1].stage][1]}")
    if not found:
        if len(errors) == 1:
            raise ConfigError(str(errors[0]))
        names = sorted({n for stage in stages for n in registry.names(stage)})
        raise ConfigError(f"{where}: no strategy named {tname!r}.{_suggest(tname, names)}")
    return found[0]


def _number_table(section: str, values: Mapping[str, Any], src, *, positive: bool = False, what: str = "number") -> Dict[str, float]:
    """A ``filter -> number`` table (``[zeropoints]``, ``[wavelengths]``), validated."""
    out = {}
    for key, value in values.items():
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not ok or (positive and not value > 0):
            raise ConfigError(f"[{section}]{_where(src, (section, key))}: {key} must be a {what}, got {value!r}")
        out[str(key)] = float(value)
    return out


def _effective_tree(sections: Mapping[str, Any], options: Mapping[Tuple[str, str], Any]) -> Dict[str, Any]:
    """The validated configuration as nested plain dicts, in the defaults' order, with
    the option tables of every selected or configured strategy."""
    out: Dict[str, Any] = {}
    for name in SECTIONS:
        obj = sections[_ATTR.get(name, name)]
        out[name] = _plain(dict(obj) if isinstance(obj, dict) else _asdict(obj))
    for (stage, sname), opts in sorted(options.items(), key=lambda kv: (kv[0][0] != "fitter", kv[0][1])):
        section = STAGES[stage][2]
        out[section][sname] = _plain(_asdict(opts)) if opts is not None else {}
    return out


def _asdict(obj) -> Dict[str, Any]:
    if obj is None:
        return {}
    if attrs.has(type(obj)):
        return {(f.alias or f.name): getattr(obj, f.name) for f in attrs.fields(type(obj)) if f.init}
    return dict(vars(obj))


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------- loading


def load_config(
    path=None,
    *,
    overrides: Optional[Mapping[str, Any]] = None,
    sets: Sequence[str] = (),
    flags: Optional[Mapping[str, Optional[str]]] = None,
    galaxy_path=None,
    cwd=None,
    use_user_config: bool = True,
    stored: Optional[str] = None,
    registry=None,
) -> SphotConfig:
    """Build the effective configuration.

    Parameters
    ----------
    path : path-like, optional
        ``--config FILE``.
    overrides : mapping, optional
        Dotted keys -> values (Python API equivalent of ``--set``).
    sets : sequence of str
        ``--set section.key=value`` strings.
    flags : mapping, optional
        Named flags (``fitter``, ``refit``, ``kernel``, ``sky``, ``executor``) -> name
        or ``None`` (not given).
    galaxy_path : path-like, optional
        A galaxy file; its folder is searched for ``sphot_config.toml`` when the
        working directory has none.
    use_user_config : bool
        Look for ``sphot_config.toml`` at all.
    stored : str, optional
        TOML text of the configuration stored in a NAME_sphot.h5 being continued
        (``--resume``/``--rerun``): it replaces the user config file as the first layer,
        so a continued run keeps the settings of the run that wrote the file; the other
        arguments still apply on top of it.
    """
    layers: List[Tuple[str, Dict[str, Any]]] = []
    if stored:
        try:
            layers.append(("stored config", tomllib.loads(stored)))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"stored config: TOML syntax error: {exc}") from None
    elif use_user_config:
        user = find_user_config(galaxy_path, cwd)
        if user is not None:
            layers.append((str(user), read_toml(user)))
    if path is not None:
        layers.append((f"--config {path}", read_toml(path)))
    set_layer: Dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        _set_path(set_layer, tuple(key.split(".")), value)
    for assignment in sets:
        p, v = parse_set(assignment)
        _set_path(set_layer, p, v)
    if set_layer:
        layers.append(("--set", set_layer))
    for flag, value in (flags or {}).items():
        if value is None:
            continue
        if flag not in NAMED_FLAGS:
            raise ConfigError(f"unknown named flag --{flag}; flags: {', '.join('--' + f for f in NAMED_FLAGS)}")
        layer: Dict[str, Any] = {}
        _set_path(layer, tuple(NAMED_FLAGS[flag].split(".")), value)
        layers.append((f"--{flag}", layer))
    return SphotConfig.from_layers(layers, registry=registry)


# ------------------------------------------------------------------------- writing

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else '"' + k.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _is_table(v: Any) -> bool:
    return isinstance(v, dict)


def to_toml(tree: Mapping[str, Any], sources: Optional[Mapping[str, str]] = None) -> str:
    """Write nested dicts as TOML (sections, strategy sub-tables, inline scalar dicts)."""
    lines: List[str] = []

    def emit(table: Mapping[str, Any], path: Tuple[str, ...], inline_keys: Tuple[str, ...]):
        inline = lambda k: "*" in inline_keys or k in inline_keys  # noqa: E731
        scalars = [(k, v) for k, v in table.items() if not (_is_table(v) and not inline(k))]
        tables = [(k, v) for k, v in table.items() if _is_table(v) and not inline(k)]
        if path:
            if lines:
                lines.append("")
            lines.append("[" + ".".join(_key(p) for p in path) + "]")
        for k, v in scalars:
            line = f"{_key(k)} = {_value(v)}"
            if sources is not None:
                origin = sources.get(".".join(path + (k,)))
                if isinstance(v, dict) and v:
                    origins = {sources.get(".".join(path + (k, kk))) for kk in v} - {None}
                    origin = ", ".join(sorted(origins)) if origins else origin
                line += f"  # {origin or (DEFAULT_LABEL if len(path) == 1 else 'strategy default')}"
            lines.append(line)
        for k, v in tables:
            emit(v, path + (k,), _inline_fields(path + (k,)))

    for section, table in tree.items():
        emit(table, (section,), _inline_fields((section,)))
    return "\n".join(lines) + "\n"


def _inline_fields(path: Tuple[str, ...]) -> Tuple[str, ...]:
    """Dict-valued keys written inline in this table (``"*"``: all of them). Sections
    write their dict-typed fields (blur_psf) inline and other dicts as strategy
    sub-tables; inside a strategy table every dict is inline (finder_kwargs)."""
    if len(path) == 1 and path[0] in SECTIONS:
        cls = SECTIONS[path[0]].cls
        return _dict_fields(cls)
    return ("*",)
