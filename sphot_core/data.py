"""The data model: a band (one filter), a galaxy (all filters), a source table.

A :class:`Band` holds the data, noise and mask, its PSFs and three model
**components** (galaxy, point sources, sky) plus the results that made them. Every
residual is derived on demand from the components (:meth:`Band.residual`), so no
stale residual copy can exist.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

import attrs
import numpy as np

from .psf import PSFModel
from .stages import KernelFit, SersicResult, SkyResult

__all__ = ["SourceTable", "SOURCE_DTYPE", "Band", "Galaxy"]

#: columns of a source table (and of the ``sources`` datasets in NAME_sphot.h5)
SOURCE_DTYPE = np.dtype(
    [
        ("id", "i8"),
        ("x", "f8"),
        ("y", "f8"),
        ("flux", "f8"),
        ("flux_err", "f8"),
        ("x_err", "f8"),
        ("y_err", "f8"),
        ("flags", "i8"),
        ("spread_model", "f8"),
        ("spread_model_err", "f8"),
        ("qfit", "f8"),
        ("cfit", "f8"),
    ]
)

_DEFAULTS = {
    "id": 0,
    "flux_err": np.nan,
    "x_err": np.nan,
    "y_err": np.nan,
    "flags": 0,
    "spread_model": np.nan,
    "spread_model_err": np.nan,
    "qfit": np.nan,
    "cfit": np.nan,
}


class SourceTable:
    """A table of point sources backed by a NumPy structured array.

    Columns (:data:`SOURCE_DTYPE`): ``id, x, y, flux, flux_err, x_err, y_err, flags,
    spread_model, spread_model_err, qfit, cfit``. Columns are read as attributes
    (``table.x``); tables are immutable in spirit: methods return new tables.
    """

    __slots__ = ("_a",)

    def __init__(self, array: Optional[np.ndarray] = None):
        if array is None:
            array = np.zeros(0, dtype=SOURCE_DTYPE)
        a = np.asarray(array)
        if a.dtype != SOURCE_DTYPE:
            b = np.zeros(a.shape[0], dtype=SOURCE_DTYPE)
            for name in SOURCE_DTYPE.names:
                if a.dtype.names and name in a.dtype.names:
                    b[name] = a[name]
                else:
                    b[name] = _DEFAULTS.get(name, np.nan)
            a = b
        object.__setattr__(self, "_a", a)

    @classmethod
    def from_columns(cls, x, y, flux, **columns) -> "SourceTable":
        """Build from column arrays; ``id`` defaults to 1..N, other columns to NaN/0."""
        x = np.atleast_1d(np.asarray(x, dtype=float))
        a = np.zeros(x.size, dtype=SOURCE_DTYPE)
        for name in SOURCE_DTYPE.names:
            a[name] = _DEFAULTS.get(name, np.nan)
        a["id"] = np.arange(1, x.size + 1)
        a["x"] = x
        a["y"] = y
        a["flux"] = flux
        for name, value in columns.items():
            if name not in SOURCE_DTYPE.names:
                raise KeyError(f"unknown source-table column {name!r}; columns: {', '.join(SOURCE_DTYPE.names)}")
            a[name] = value
        return cls(a)

    @classmethod
    def empty(cls) -> "SourceTable":
        return cls()

    @classmethod
    def concatenate(cls, tables: Iterable["SourceTable"]) -> "SourceTable":
        arrays = [t.array for t in tables]
        if not arrays:
            return cls()
        return cls(np.concatenate(arrays))

    @property
    def array(self) -> np.ndarray:
        return self._a

    @property
    def columns(self) -> Tuple[str, ...]:
        return SOURCE_DTYPE.names

    def __getattr__(self, name):
        if name.startswith("_"):  # e.g. during unpickling, before _a exists
            raise AttributeError(name)
        try:
            return self._a[name]
        except (ValueError, KeyError):
            raise AttributeError(name) from None

    def __getstate__(self):
        return self._a

    def __setstate__(self, state):
        object.__setattr__(self, "_a", state)

    def __len__(self) -> int:
        return self._a.shape[0]

    def __getitem__(self, item) -> "SourceTable":
        if isinstance(item, str):
            return self._a[item]
        return SourceTable(np.atleast_1d(self._a[item]))

    def select(self, keep) -> "SourceTable":
        return SourceTable(self._a[np.asarray(keep)])

    def with_columns(self, **columns) -> "SourceTable":
        a = self._a.copy()
        for name, value in columns.items():
            a[name] = value
        return SourceTable(a)

    def renumbered(self) -> "SourceTable":
        """Copy with ids 1..N in table order."""
        return self.with_columns(id=np.arange(1, len(self) + 1))

    def copy(self) -> "SourceTable":
        return SourceTable(self._a.copy())

    def __eq__(self, other) -> bool:
        if not isinstance(other, SourceTable):
            return NotImplemented
        return self._a.shape == other._a.shape and all(
            np.array_equal(self._a[n], other._a[n], equal_nan=self._a[n].dtype.kind == "f") for n in SOURCE_DTYPE.names
        )

    def __repr__(self) -> str:
        return f"SourceTable({len(self)} sources)"


def _as_float_image(a):
    return None if a is None else np.asarray(a, dtype=float)


@attrs.define(eq=False)
class Band:
    """One filter of a galaxy cutout and everything fitted to it.

    Attributes
    ----------
    filter : str
    data : ndarray
        The image (cropped), image units, NaN = no data.
    psf : PSFModel
        The working PSF (the library PSF after optional blur and calibration).
    library_psf : PSFModel
        The PSF as loaded (after the optional ``blur_psf``): the base that kernel
        calibration convolves, so kernels never compound.
    noise : ndarray or None
        Per-pixel 1-sigma uncertainty.
    mask : ndarray of bool or None
        ``True`` = pixel not used (NaN pixels are excluded in any case).
    zeropoint : float or None
        ``mag = -2.5 log10(flux) + zeropoint``.
    pixel_scale : float or None
        arcsec per pixel.
    galaxy_model, star_model, sky_model : ndarray or None
        The three model components.
    sersic : SersicResult or None
    sources : SourceTable or None
    sky : SkyResult or None
    kernel : KernelFit or None
        The latest PSF kernel calibration.
    kernel_history : list of dict
        One record per calibration (iteration, family, params, loss).
    history : list of dict
        One record per engine iteration (stage timings, losses, parameter changes).
    status : str
        ``"pending"``, ``"done"`` or ``"failed"``.
    message : str
        Why a band failed (or notes).
    flags : int
        Band-level :data:`~sphot_core.flags.GALAXY_FLAGS` bits set by the engine.
    stages_done : list of str
        Stages completed (for ``--resume``).
    """

    filter: str
    data: np.ndarray = attrs.field(converter=np.asarray)
    psf: PSFModel
    library_psf: Optional[PSFModel] = None
    noise: Optional[np.ndarray] = attrs.field(default=None, converter=_as_float_image)
    mask: Optional[np.ndarray] = None
    zeropoint: Optional[float] = None
    pixel_scale: Optional[float] = None
    galaxy_model: Optional[np.ndarray] = None
    star_model: Optional[np.ndarray] = None
    sky_model: Optional[np.ndarray] = None
    sersic: Optional[SersicResult] = None
    sources: Optional[SourceTable] = None
    sky: Optional[SkyResult] = None
    kernel: Optional[KernelFit] = None
    kernel_history: List[Dict[str, Any]] = attrs.field(factory=list)
    history: List[Dict[str, Any]] = attrs.field(factory=list)
    status: str = "pending"
    message: str = ""
    flags: int = 0
    stages_done: List[str] = attrs.field(factory=list)

    def __attrs_post_init__(self):
        if self.library_psf is None:
            self.library_psf = self.psf

    @property
    def shape(self) -> Tuple[int, int]:
        return self.data.shape

    @property
    def valid(self) -> np.ndarray:
        """Pixels that carry data and are not masked."""
        v = np.isfinite(self.data)
        if self.mask is not None:
            v &= ~self.mask
        return v

    def component(self, name: str) -> np.ndarray:
        """A model component (``"galaxy"``, ``"stars"``, ``"sky"``), zeros if not fitted yet."""
        value = {"galaxy": self.galaxy_model, "stars": self.star_model, "sky": self.sky_model}[name]
        return np.zeros(self.data.shape) if value is None else value

    def residual(self, *, galaxy: bool = True, stars: bool = True, sky: bool = True) -> np.ndarray:
        """``data`` minus the selected model components (NaN stays NaN).

        ``residual()`` is the full residual; ``residual(galaxy=False)`` is the image the
        galaxy is fitted to (stars and sky removed); ``residual(stars=False)`` the image
        the stars are fitted to.
        """
        out = np.array(self.data, dtype=float, copy=True)
        if galaxy and self.galaxy_model is not None:
            out -= self.galaxy_model
        if stars and self.star_model is not None:
            out -= self.star_model
        if sky and self.sky_model is not None:
            out -= self.sky_model
        return out

    def reduced_chi2(self, n_params: int = 0) -> float:
        """Reduced chi-square of the full model (galaxy + stars + sky) over the usable
        pixels (valid data, not masked, positive noise): sum((residual / noise)^2) /
        (N - n_params). NaN without a noise map or with no degrees of freedom."""
        if self.noise is None:
            return float("nan")
        r = self.residual()
        use = self.valid & np.isfinite(r) & (self.noise > 0)
        dof = int(use.sum()) - int(n_params)
        if dof <= 0:
            return float("nan")
        return float(np.sum((r[use] / self.noise[use]) ** 2) / dof)

    @property
    def star_subtracted(self) -> np.ndarray:
        """``data - stars`` (the PSF-subtracted image; sky not removed)."""
        return self.residual(galaxy=False, sky=False)


@attrs.define(eq=False)
class Galaxy:
    """All bands of one galaxy cutout, on one pixel grid.

    Attributes
    ----------
    name : str
        Galaxy name (file stem), used to name the outputs.
    bands : dict
        Filter name -> :class:`Band`, in input order.
    base_filter : str or None
    crop_offset : tuple of int
        ``(x0, y0)``: pixel ``(0, 0)`` of the bands is pixel ``(x0, y0)`` of the input
        images. Output coordinates add this offset, so they are on the input grid.
    input_shape : tuple of int
        Shape of the input images before cropping.
    source_path : str
        The galaxy file it was read from.
    meta : dict
        Galaxy-level values (centre and size guess, aperture geometry, timings ...).
    """

    name: str
    bands: Dict[str, Band] = attrs.field(factory=dict)
    base_filter: Optional[str] = None
    crop_offset: Tuple[int, int] = (0, 0)
    input_shape: Optional[Tuple[int, int]] = None
    source_path: str = ""
    meta: Dict[str, Any] = attrs.field(factory=dict)

    @property
    def filters(self) -> List[str]:
        return list(self.bands)

    @property
    def shape(self) -> Tuple[int, int]:
        return next(iter(self.bands.values())).shape

    def __getitem__(self, filter_name: str) -> Band:
        return self.bands[filter_name]

    def to_input_frame(self, x, y):
        """Convert cutout pixel coordinates to the input image grid."""
        return np.asarray(x) + self.crop_offset[0], np.asarray(y) + self.crop_offset[1]
