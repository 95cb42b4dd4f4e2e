"""Diagnostic figures: data, galaxy model, star model and residual of every band.

matplotlib is an optional dependency (``pip install sphot[plot]``) imported only when a
figure is made. Figures are built with the object-oriented API on the Agg canvas, so
plotting never changes the user's pyplot backend and works without a display; when
``matplotlib.pyplot`` is already imported (an interactive session, a notebook) the
figure is created through pyplot so that it shows up there.

Images use ``astropy.visualization.simple_norm(..., percent=99.5)`` and
``origin="lower"``: pixel ``(0, 0)`` is at the bottom left, x to the right, and
coordinates are cutout pixels (those of ``Band`` and its source table).
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .errors import InputError, OutputError, SphotError
from .stats import robust_sigma

__all__ = ["plot_galaxy", "plot_band", "show_image", "plot_petrosian"]

log = logging.getLogger(__name__)

#: panels of one band row, left to right
PANELS = ("data", "galaxy model", "star model", "residual")
_PANEL_SIZE = 3.2  # inches


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SphotError("plotting needs matplotlib: install sphot[plot] (pip install 'sphot[plot]')") from None


def _new_figure(figsize):
    """A figure on the Agg canvas, or through pyplot when pyplot is already in use."""
    _require_matplotlib()
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        return plt.figure(figsize=figsize)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _norm(image: np.ndarray, stretch: str):
    from astropy.visualization import simple_norm
    from matplotlib.colors import Normalize

    finite = image[np.isfinite(image)]
    if finite.size == 0 or finite.min() == finite.max():
        level = float(finite[0]) if finite.size else 0.0
        return Normalize(vmin=level - 1.0, vmax=level + 1.0)
    return simple_norm(finite, stretch=stretch, percent=99.5)


def show_image(
    image: np.ndarray,
    ax: Any = None,
    *,
    title: str = "",
    stretch: str = "asinh",
    sources: Optional[Any] = None,
    source_radius: float = 3.0,
    aperture: Optional[Any] = None,
    cmap: str = "gray",
):
    """Show one image with ``simple_norm(percent=99.5)`` and ``origin="lower"``.

    Parameters
    ----------
    image : ndarray
    ax : matplotlib Axes, optional
        Default: a new figure with one axes.
    title : str
    stretch : str
        ``simple_norm`` stretch (``"linear"``, ``"sqrt"``, ``"asinh"``, ...).
    sources : SourceTable or (x, y) arrays, optional
        Marked with open circles of ``source_radius`` pixels.
    aperture : ApertureGeometry, optional
        Drawn as an ellipse.
    cmap : str

    Returns
    -------
    matplotlib Axes
    """
    if ax is None:
        ax = _new_figure((_PANEL_SIZE, _PANEL_SIZE)).add_subplot()
    image = np.asarray(image, dtype=float)
    ax.imshow(image, origin="lower", norm=_norm(image, stretch), cmap=cmap, interpolation="nearest")
    if sources is not None:
        _mark_sources(ax, sources, source_radius)
    if aperture is not None:
        _draw_aperture(ax, aperture)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6)
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(-0.5, image.shape[0] - 0.5)
    return ax


def _mark_sources(ax, sources, radius: float) -> None:
    from matplotlib.collections import EllipseCollection

    x, y = (sources.x, sources.y) if hasattr(sources, "x") else sources
    x, y = np.atleast_1d(x), np.atleast_1d(y)
    if x.size == 0:
        return
    d = np.full(x.size, 2.0 * radius)
    ax.add_collection(
        EllipseCollection(d, d, np.zeros(x.size), units="xy", offsets=np.column_stack([x, y]),
                          offset_transform=ax.transData, facecolors="none", edgecolors="tab:cyan", linewidths=0.5)
    )


def _draw_aperture(ax, aperture) -> None:
    from matplotlib.patches import Ellipse

    ax.add_patch(
        Ellipse((aperture.x, aperture.y), 2 * aperture.a, 2 * aperture.b, angle=np.degrees(aperture.theta),
                fill=False, edgecolor="tab:orange", linewidth=0.8)
    )


def _titles(band, resid: np.ndarray) -> dict:
    """Panel titles; ``resid`` is ``band.residual()`` (computed once by the caller)."""
    status = " FAILED" if band.status == "failed" else ""
    sersic = band.sersic
    if band.galaxy_model is None:
        galaxy = "galaxy model (not fitted)"
    elif sersic is not None and "n" in sersic.params:
        p = sersic.params
        galaxy = f"galaxy  n={p['n']:.2f}  r_eff={p['r_eff']:.1f} px  flux={sersic.flux:.4g}"
    else:
        galaxy = "galaxy model"
    n_src = 0 if band.sources is None else len(band.sources)
    stars = f"stars  N={n_src}" if band.star_model is not None else "star model (not fitted)"
    sigma = robust_sigma(resid, mask=~band.valid)
    chi2 = f"  chi2/dof={sersic.chi2_dof:.2f}" if sersic is not None else ""
    return {
        "data": f"{band.filter} data{status}",
        "galaxy model": f"{band.filter} {galaxy}",
        "star model": f"{band.filter} {stars}",
        "residual": f"{band.filter} residual  robust sigma={sigma:.3g}{chi2}",
    }


def plot_band(band, axes: Optional[Sequence[Any]] = None, *, aperture: Optional[Any] = None):
    """One band in four panels: data, galaxy model, star model, residual.

    Sources are circled on the data and residual panels, with a radius of the PSF FWHM
    but at least 1.5 pixels.

    Parameters
    ----------
    band : Band
    axes : sequence of 4 Axes, optional
        Default: a new one-row figure.
    aperture : ApertureGeometry, optional
        Drawn on the data panel.

    Returns
    -------
    list of Axes
    """
    if axes is None:
        fig = _new_figure((4 * _PANEL_SIZE, _PANEL_SIZE))
        axes = fig.subplots(1, 4)
    resid = band.residual()
    titles = _titles(band, resid)
    images = {
        "data": band.data,
        "galaxy model": band.component("galaxy"),
        "star model": band.component("stars"),
        "residual": resid,
    }
    radius = max(band.psf.fwhm, 1.5)
    for ax, panel in zip(axes, PANELS):
        marked = panel in ("data", "residual")
        show_image(
            images[panel], ax, title=titles[panel], stretch="linear" if panel == "residual" else "asinh",
            sources=band.sources if marked else None, source_radius=radius,
            aperture=aperture if panel == "data" else None,
        )
    return list(axes)


def plot_galaxy(galaxy, path=None, *, bands: Optional[Sequence[str]] = None, aperture: Optional[Any] = None, dpi: int = 100):
    """The diagnostic figure of a galaxy: one row of four panels per band.

    Parameters
    ----------
    galaxy : Galaxy
    path : str or Path, optional
        Write the figure there as PNG (atomically: a temporary file in the same
        directory, then renamed).
    bands : sequence of str, optional
        Filters to show, in this order; default all, in galaxy order.
    aperture : ApertureGeometry, optional
        Aperture (cutout pixels) drawn on the data panels.
    dpi : int

    Returns
    -------
    matplotlib Figure

    Raises
    ------
    SphotError
        matplotlib is not installed.
    InputError
        A requested band does not exist.
    OutputError
        The PNG could not be written.
    """
    names = list(galaxy.filters if bands is None else bands)
    unknown = [b for b in names if b not in galaxy.bands]
    if unknown:
        raise InputError(f"plot of {galaxy.name}: no band {', '.join(unknown)}; bands: {', '.join(galaxy.filters)}")
    if not names:
        raise InputError(f"plot of {galaxy.name}: no band to plot")
    fig = _new_figure((4 * _PANEL_SIZE, _PANEL_SIZE * len(names) + 0.4))
    axes = np.atleast_2d(fig.subplots(len(names), 4, squeeze=False))
    for row, name in zip(axes, names):
        plot_band(galaxy.bands[name], row, aperture=aperture)
    fig.suptitle(galaxy.name, fontsize=10)
    fig.tight_layout()
    if path is not None:
        _save_png(fig, Path(path), dpi)
    return fig


def _save_png(fig, path: Path, dpi: int) -> None:
    """Write ``fig`` as PNG to a temporary file next to ``path``, then rename it.

    The temporary file is opened with the process umask (unlike ``mkstemp``'s 0600),
    so the PNG gets the same permissions as any other output.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fig.savefig(fh, format="png", dpi=dpi)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write the plot {path}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    log.info("wrote %s", path)


def plot_petrosian(result, ax: Any = None):
    """Petrosian ratio of the isophote ladder versus semi-major axis, and the chosen aperture.

    Parameters
    ----------
    result : PetrosianResult
        From :func:`sphot_core.aperture.science_aperture` or
        :func:`~sphot_core.aperture.petrosian_aperture`.
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
    """
    new = ax is None
    if new:
        ax = _new_figure((4.5, 3.2)).add_subplot()
    a = result.semi_major_axes
    ax.plot(a, result.eta_raw, ".", color="0.6", ms=3, label="finite differences")
    ax.plot(a, result.eta, "-", color="tab:blue", lw=1, label="smoothing spline")
    ax.axhline(result.petro, color="tab:orange", lw=0.8, ls="--")
    ax.axvline(result.aperture.a, color="tab:orange", lw=0.8, label=f"a = {result.aperture.a:.2f} px")
    ax.set_xlabel("semi-major axis (px)")
    ax.set_ylabel("Petrosian ratio")
    ax.set_title(f"{result.filter}: eta = {result.petro:g}" + ("" if result.bracketed else " (not reached)"), fontsize=9)
    ax.legend(fontsize=7)
    if new:
        ax.figure.tight_layout()
    return ax
