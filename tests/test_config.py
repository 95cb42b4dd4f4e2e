"""Configuration: precedence, deep merge, --set parsing, legacy keys, errors."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import attrs
import pytest

from sphot_core.config import SphotConfig, load_config, parse_set
from sphot_core.errors import ConfigError, PluginError

# The key names and default values of the original tool's config file (ORIGINAL.md 4.2).
LEGACY = """
[prep]
filters = ['F555W','F814W','F090W','F150W','F160W','F277W']
PSF_file = 'PSFdata.h5'
blur_psf = {}
custom_initial_crop = 1
sigma_guess = 10
auto_crop = true
auto_crop_factor = 8

[core]
base_filter = 'F150W'
iter_basefit = 10
iter_scalefit = 3
fit_complex_model = false
allow_refit = false
mainloop_convergence_atol = 1e-3
mainloop_convergence_patience = 2
mainloop_min_iter = 2
use_dual_annealing = true
use_final_polish = true

[psf-calib]
in_mainloop = true
kernel_family = 'moffat'
kernel_anchor_K = 25
kernel_fit_skip_on_convergence = false
kernel_skip_threshold = 1e-3
kernel_fit_objective = 'multi_source'
kernel_fit_stamp_half_min = 8
kernel_fit_stamp_half_in_sigmaeff = 3.0
kernel_fit_max_neighbors = 15
kernel_fit_neighbor_pad_pix = 4.0
center_mask_r_in_galaxy_size = 1.5
calib_xy_bounds = 3.0
scan_method = 'lm'
scan_metric = 'sum_snr'
scan_top_k = 100
fwhm_method = 'empirical'

[psf]
th_min = 4
th_max = 30
th_iter = 10
th_max_consec_empty = 3
bkg_refit_per_iteration = true
bkg_floor_factor = 0.3
ladder_dedup_psfsigma = 0.5
final_refit_method = 'iterative'
final_joint_refit = true
final_refit_xy_bounds = 0.0
final_refit_iterations = 5
final_refit_detect_th = 4.0
final_refit_dedup_psfsigma = 2.0
final_refit_residual_tol = 0.01
final_refit_catastrophic_flux_factor = 20.0
final_refit_fit_shape = [11, 11]
leftover_max_iterations = 2
leftover_detect_k_sigma = 5.0
leftover_dedup_psfsigma = 1.5
leftover_box_size = 3
mask_aper_size_in_r_eff = 3.5
raise_error = false
residual_clip_sigma = 15.0
finder_kwargs = {roundness_range = [-1.0, 1.0], sharpness_range = [0.20, 1.0]}
grouper_separation_in_psfsigma = 2
bkg_sigma_clip = 3.0
bkg_box_size = [10, 10]
bkg_filter_size = [5, 5]
localbkg_bounds_in_psfsigma = [2, 5]
center_mask_r_in_fwhm = 1.5
PSFPhotometry_aperture_radius = 3
PSFPhotometry_fitter_maxiters = 300
PSFPhotometry_fit_shape_in_fwhm = 1.5
modelimg_render_shape = [25, 25]
PSFPhotometry_group_warning_threshold = 10
cuts_pos_err_max = 2
cuts_res_cen_sigma_clip = 3.0
cuts_cfit_sigma_clip = 3.0
cuts_chi2dof_median_factor = 3.0
cuts_pos_diff_median_factor = 2.0
cuts_flux_SNR_min = 1.0

[aperture]
petro = 0.5
center_mask = 4.0
plot = true
isophot_base_filter = 'F150W'
isophot_frac_min = 0.05
isophot_frac_max = 0.95
fit_isophot_to = 'sersic_modelimg'
measure_on = 'psf_sub_data'
error_on = 'psf_sub_data_error'
measure_sky_on = 'residual_masked'
fill_max_nan_frac = 0.7
fill_replace_with = 'median'
PSF_corr_base_filter = 'F090W'
"""


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    d = tmp_path / "work"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults(cwd):
    cfg = load_config()
    assert cfg.refit.method == "nnls"
    assert cfg.fitter.method == "levmar"
    assert cfg.calib.family == "gaussian" and cfg.calib.in_mainloop is True
    assert cfg.core.base_filter == "F150W"
    # strategy defaults come from the strategies' own options classes
    ladder = cfg.strategy_options("point_sources", "ladder")
    assert ladder.th_max == 30 and ladder.th_iter == 10
    assert cfg.sources["refit.method"] == "default"
    assert cfg.notes == ()


def test_precedence_of_all_layers(cwd, tmp_path):
    write(cwd / "sphot_config.toml", """
        [refit]
        method = "iterative"
        [sky]
        method = "constant"
        [core]
        iter_basefit = 4
    """)
    extra = write(tmp_path / "extra.toml", """
        [sky]
        method = "none"
        [fitter]
        method = "lbfgsb"
        [core]
        iter_basefit = 5
    """)
    cfg = load_config(extra, sets=["fitter.method=iterative_NM", "core.iter_basefit=6"], flags={"fitter": "dual-annealing", "refit": None})
    assert cfg.refit.method == "iterative"  # user file
    assert cfg.sky.method == "none"  # --config over the user file
    assert cfg.core.iter_basefit == 6  # --set over --config
    assert cfg.fitter.method == "dual_annealing"  # named flag over --set, name normalised
    assert cfg.sources["refit.method"].endswith("sphot_config.toml")
    assert cfg.sources["sky.method"] == f"--config {extra}"
    assert cfg.sources["core.iter_basefit"] == "--set"
    assert cfg.sources["fitter.method"] == "--fitter"
    assert cfg.sources["core.base_filter"] == "default"


def test_user_config_next_to_the_galaxy_file(cwd, tmp_path):
    gdir = tmp_path / "galaxies"
    gdir.mkdir()
    write(gdir / "sphot_config.toml", "[core]\nbase_filter = 'F277W'\n")
    cfg = load_config(galaxy_path=gdir / "g1.h5")
    assert cfg.core.base_filter == "F277W"
    # a config in the working directory is found first
    write(cwd / "sphot_config.toml", "[core]\nbase_filter = 'F090W'\n")
    assert load_config(galaxy_path=gdir / "g1.h5").core.base_filter == "F090W"


def test_deep_merge_keeps_other_defaults(cwd):
    write(cwd / "sphot_config.toml", """
        [psf.ladder]
        th_min = 3.0
        [prep]
        blur_psf = {F160W = 9.0}
    """)
    cfg = load_config(sets=["prep.blur_psf.F555W=4"])
    ladder = cfg.strategy_options("point_sources", "ladder")
    assert ladder.th_min == 3.0 and ladder.th_max == 30  # partial table keeps the rest
    assert cfg.prep.blur_psf == {"F160W": 9.0, "F555W": 4.0}
    assert cfg.psf.method == "ladder"  # the [psf] section itself untouched


@pytest.mark.parametrize(
    "text, value",
    [
        ("core.iter_basefit=7", 7),
        ("core.mainloop_convergence_atol=2e-3", 2e-3),
        ("core.auto=true", True),
        ("prep.filters=['F150W', 'F277W']", ["F150W", "F277W"]),
        ("prep.filters=F150W,F277W", "F150W,F277W"),
        ("refit.method=nnls", "nnls"),
        ("refit.method='nnls'", "nnls"),
        ("prep.blur_psf={F160W=9}", {"F160W": 9}),
        ("psf-calib.family = moffat", "moffat"),
    ],
)
def test_parse_set(text, value):
    path, parsed = parse_set(text)
    assert parsed == value
    assert len(path) >= 2


@pytest.mark.parametrize("bad", ["refit", "refit.method", "=nnls", "method=nnls", "refit..method=1"])
def test_parse_set_errors(bad):
    with pytest.raises(ConfigError, match="--set"):
        parse_set(bad)


def test_set_list_from_comma_string(cwd):
    cfg = load_config(sets=["prep.filters=F150W,F277W", "core.forced_filters=F160W"])
    assert cfg.prep.filters == ("F150W", "F277W")
    assert cfg.core.forced_filters == ("F160W",)


def test_original_tool_config_keeps_working(cwd, caplog):
    write(cwd / "sphot_config.toml", LEGACY)
    with caplog.at_level(logging.INFO, logger="sphot_core.config"):
        cfg = load_config()
    assert cfg.prep.psf == "PSFdata.h5"
    assert cfg.fitter.first_iteration == "dual_annealing"
    assert cfg.fitter.use_final_polish is True
    assert cfg.refit.method == "iterative"
    assert cfg.calib.family == "moffat"
    assert cfg.calib.method == "multi_source"
    assert cfg.calib.kernel_fit_skip_on_convergence is False
    assert cfg.strategy_options("calibrator", "multi_source").kernel_anchor_K == 25
    assert cfg.strategy_options("point_sources", "ladder").th_min == 4
    assert cfg.strategy_options("refit", "iterative").xy_bounds == 0.0
    assert cfg.strategy_options("refit", "nnls").leftover_max_iterations == 2
    assert cfg.core.residual_clip_sigma == 15.0
    assert cfg.aperture.fit_isophot_to == "galaxy_model"
    assert cfg.aperture.PSF_corr_base_filter == "F090W"
    notes = "\n".join(cfg.notes)
    assert "final_refit_method is deprecated, use [refit] method" in notes
    assert "kernel_anchor_K is deprecated, use [psf-calib.multi_source] kernel_anchor_K" in notes
    assert "modelimg_render_shape is no longer used" in notes
    assert "sigma_guess is no longer used" in notes
    assert "deprecated config key" in caplog.text
    assert cfg.sources["refit.method"].endswith("sphot_config.toml")


def test_legacy_final_joint_refit_false_means_no_refit(cwd):
    write(cwd / "sphot_config.toml", "[psf]\nfinal_joint_refit = false\n")
    assert load_config().refit.method == "none"


def test_unknown_section_key_and_name(cwd, tmp_path):
    bad = write(tmp_path / "a.toml", "[refits]\nmethod = 'nnls'\n")
    with pytest.raises(ConfigError, match=r"unknown section \[refits\]\. Did you mean 'refit'"):
        load_config(bad)
    bad = write(tmp_path / "b.toml", "[core]\niter_basefitt = 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "unknown option 'iter_basefitt'" in str(err.value) and "Did you mean 'iter_basefit'" in str(err.value)
    assert str(bad) in str(err.value)
    with pytest.raises(PluginError) as err:
        load_config(sets=["refit.method=nnl"])
    assert "Did you mean 'nnls'" in str(err.value) and "Available:" in str(err.value)
    with pytest.raises(ConfigError, match=r"unknown option 'thmin'.*th_min"):
        load_config(sets=["psf.ladder.thmin=3"])
    with pytest.raises(ConfigError, match=r"\[psf.ladders\]"):
        load_config(sets=["psf.ladders.th_min=3"])


def test_broken_toml_names_file_and_line(tmp_path):
    bad = write(tmp_path / "broken.toml", "[core]\niter_basefit = 3\nbase_filter = 'F150W\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, use_user_config=False)
    msg = str(err.value)
    assert str(bad) in msg and "line 3" in msg and "\n" not in msg
    bad = write(tmp_path / "broken2.toml", "[core]\niter_basefit = = 3\n[prep]\n")
    with pytest.raises(ConfigError, match=r"broken2.toml: TOML syntax error: .*line 2"):
        load_config(bad, use_user_config=False)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", use_user_config=False)


def test_type_and_value_errors(cwd):
    with pytest.raises(ConfigError, match="iter_basefit must be an integer"):
        load_config(sets=["core.iter_basefit=many"])
    with pytest.raises(ConfigError, match="must be >= 0"):
        load_config(sets=["core.iter_basefit=-1"])
    with pytest.raises(ConfigError, match="psf_kind must be one of"):
        load_config(sets=["prep.psf_kind=weird"])
    with pytest.raises(ConfigError, match="zeropoints"):
        load_config(sets=["zeropoints.F150W=abc"])


def test_config_is_immutable_and_overrides_make_copies(cwd):
    cfg = load_config()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.refit = None
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.core.iter_basefit = 2
    other = cfg.with_overrides({"refit.method": "none"})
    assert other.refit.method == "none" and cfg.refit.method == "nnls"


def test_toml_round_trip_and_sources(cwd):
    cfg = load_config(sets=["refit.method=iterative", "psf.ladder.th_min=2.5"], flags={"kernel": "moffat"})
    text = cfg.to_toml()
    again = SphotConfig.from_toml_text(text)
    assert again.tree == cfg.tree
    annotated = cfg.to_toml(with_sources=True)
    assert 'method = "iterative"  # --set' in annotated
    assert 'family = "moffat"  # --kernel' in annotated
    assert "th_max = 30" in annotated and "strategy default" in annotated


def test_build_strategy_objects(cwd):
    cfg = load_config(sets=["refit.method=iterative", "refit.iterative.max_iterations=2"])
    refit = cfg.build("refit")
    assert refit.options.max_iterations == 2
    assert cfg.build("kernel").parameters()


def test_config_not_read_at_import(tmp_path):
    (tmp_path / "sphot_config.toml").write_text("this is [not toml")
    code = "import sphot_core, sphot_core.config, sphot_core.cli, sphot_core.io, sphot_plugins"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
