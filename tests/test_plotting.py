"""The diagnostic figure: panels, PNG output, missing matplotlib."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from sphot_core.aperture import ApertureGeometry, isophotal_ellipses, petrosian_aperture  # noqa: E402
from sphot_core.data import Band, Galaxy, SourceTable  # noqa: E402
from sphot_core.errors import InputError, OutputError, SphotError  # noqa: E402
from sphot_core.plotting import plot_galaxy, plot_petrosian  # noqa: E402
from sphot_core.psf import PSFModel, gaussian_kernel  # noqa: E402
from sphot_core.stages import SersicResult  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _band(name, sigma, rng, status="done"):
    shape = (64, 72)
    psf = PSFModel.from_array(gaussian_kernel(sigma, half=8), 1, filter=name)
    yy, xx = np.indices(shape)
    galaxy = 5.0 * np.exp(-np.hypot(xx - 36.0, yy - 30.0) / 5.0)
    x, y = rng.uniform(0, 70, 12), rng.uniform(0, 62, 12)
    stars = psf.render(shape, x, y, rng.uniform(10, 100, 12))
    data = galaxy + stars + 1.0 + rng.normal(0, 0.05, shape)
    data[:, :4] = np.nan
    sersic = SersicResult(
        params=dict(x_0=36.0, y_0=30.0, amplitude=1.0, r_eff=8.4, n=1.0, ellip=0.0, theta=0.0),
        errors={}, names=(), covariance=None, flux=float(galaxy.sum()), flux_err=1.0, loss=1.0,
        chi2=1000.0, dof=900, success=True, message="", nfev=1,
    )
    return Band(
        name, data, psf, noise=np.full(shape, 0.05), galaxy_model=galaxy, star_model=stars,
        sky_model=np.ones(shape), sersic=sersic, sources=SourceTable.from_columns(x, y, np.ones(12)), status=status,
    )


@pytest.fixture(scope="module")
def galaxy():
    rng = np.random.default_rng(3)
    bands = {"F090W": _band("F090W", 1.0, rng), "F150W": _band("F150W", 1.6, rng), "F160W": _band("F160W", 3.0, rng, "failed")}
    return Galaxy("g001", bands, base_filter="F150W")


def _image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def test_png_written_with_four_panels_per_band(galaxy, tmp_path):
    import matplotlib.image as mpimg

    path = tmp_path / "g001.png"
    fig = plot_galaxy(galaxy, path, aperture=ApertureGeometry(36.0, 30.0, 8.0, 6.0, 0.3))
    assert len(_image_axes(fig)) == 4 * 3
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 600 and pixels.shape[1] > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g001.png"]  # no temporary file left
    titles = [ax.get_title() for ax in fig.axes]
    assert "F160W data FAILED" in titles
    assert any("n=1.00" in t and "r_eff=8.4" in t for t in titles)
    assert any("N=12" in t for t in titles)
    # sources are circled on the data panel: one circle per source
    data_ax = _image_axes(fig)[0]
    assert sum(len(c.get_offsets()) for c in data_ax.collections) == 12


def test_band_subset_in_the_requested_order(galaxy):
    fig = plot_galaxy(galaxy, bands=["F150W", "F090W"])
    axes = _image_axes(fig)
    assert len(axes) == 8
    assert axes[0].get_title().startswith("F150W") and axes[4].get_title().startswith("F090W")
    # origin lower: the first image row is at the bottom
    assert axes[0].images[0].origin == "lower"


def test_unknown_band_and_unwritable_path(galaxy, tmp_path):
    with pytest.raises(InputError, match="F999W"):
        plot_galaxy(galaxy, bands=["F999W"])
    with pytest.raises(OutputError, match="cannot write"):
        plot_galaxy(galaxy, tmp_path / "missing_dir" / "g.png", bands=["F090W"])


def test_missing_matplotlib_gives_a_clear_error(galaxy, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SphotError, match=r"sphot\[plot\]"):
        plot_galaxy(galaxy)


def test_petrosian_diagnostic_marks_the_chosen_axis():
    yy, xx = np.indices((81, 81))
    image = np.exp(-np.hypot(xx - 40.0, yy - 40.0) / 4.0)
    result = petrosian_aperture(image, isophotal_ellipses(image, np.linspace(0.05, 0.95, 60)), 0.5)
    ax = plot_petrosian(result)
    vertical = [line for line in ax.lines if np.ptp(line.get_xdata()) == 0]
    assert vertical and vertical[0].get_xdata()[0] == pytest.approx(result.aperture.a)
