"""The abstract stages and the small records they exchange.

sphot's engine alternates *stages* over one band. Each stage kind is an abstract class
here with one main method that receives what it needs explicitly (image, noise, mask,
PSF, current components) and returns a result record; no stage reads global state or
the configuration file. Concrete stages are plugins registered by name (see
:mod:`sphot_core.hookspecs`); a caller may also pass an instance built by hand.

Conventions for every stage
---------------------------
* Images are 2-D float arrays indexed ``[y, x]``; pixel ``(0, 0)`` has its centre at
  ``(0.0, 0.0)``. NaN marks pixels without data.
* ``noise`` is the per-pixel 1-sigma uncertainty (same shape), or ``None`` when the
  stage should estimate it.
* ``mask`` is a boolean array, ``True`` = do not use the pixel (NaN pixels are always
  excluded too). ``exclude`` is a boolean array of pixels where *no point source may be
  placed* (the galaxy centre); it does not remove the pixels from fits.
* PSFs are :class:`sphot_core.psf.PSFModel` objects (see its module for the centring
  and normalisation convention).
* Options: each concrete stage declares ``Options``, an attrs class whose fields are
  the keys of its TOML table (e.g. ``[refit.nnls]``). ``__init__(options=None)`` must
  accept ``None`` (all defaults).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import attrs
import numpy as np

__all__ = [
    "NoOptions",
    "Stage",
    "SersicResult",
    "SersicFitter",
    "PointSourceResult",
    "PointSourceFitter",
    "RefitStrategy",
    "SkyResult",
    "SkyEstimator",
    "KernelParameter",
    "KernelFamily",
    "KernelFit",
    "KernelCalibrator",
    "JobOutcome",
    "Executor",
]


@attrs.frozen
class NoOptions:
    """Options class of a stage that has no options."""


class Stage(abc.ABC):
    """Common base: options handling and a name."""

    #: registered name (set by the plugin's spec; informative)
    name: ClassVar[str] = ""
    #: attrs class of the stage's options (its TOML table)
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None):
        self.options = self.Options() if options is None else options

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


# ----------------------------------------------------------------------------- Sersic


@attrs.frozen(eq=False)
class SersicResult:
    """Outcome of one Sersic fit.

    Attributes
    ----------
    params : dict
        Physical parameter values by name. For the single Sersic model: ``x_0, y_0,
        amplitude, r_eff, n, ellip, theta`` (astropy ``Sersic2D`` convention: amplitude
        is the surface brightness at ``r_eff`` in image units per pixel; ``r_eff`` along
        the major axis in pixels; ``ellip = 1 - b/a``; ``theta`` radians CCW from +x,
        wrapped to [0, pi)). Other models add their own names (``_disk``/``_bulge``
        suffixes, ``flux_point``).
    errors : dict
        1-sigma uncertainties by name (NaN where unavailable).
    names : tuple
        Order of the rows/columns of ``covariance``.
    covariance : ndarray or None
        Covariance of the parameters in ``names`` (physical units).
    flux, flux_err : float
        Total flux of the model integrated to infinity (image units) and its 1-sigma
        error propagated from the covariance.
    flux_err_fixed_shape : float
        1-sigma flux error with the shape held at its fitted value (the covariance of
        the linear parameters given the shape). Bands that share a shape share its
        error, which cancels in their colours: this is the error to combine for colours.
    sky_offset : float
        Constant sky offset solved linearly with the amplitude (0 when not solved).
    loss : float
        Final value of the objective (chi-square or robust loss, plus regularisation).
    chi2, dof : float, int
        Plain chi-square of the fitted pixels and its degrees of freedom.
    success : bool
    message : str
    nfev : int
        Number of model evaluations.
    flags : int
        Bits of :data:`sphot_core.flags.GALAXY_FLAGS`.
    optimizer : str
        Name of the optimizer that produced the result.
    model : str
        Name of the model (``"sersic"``, ``"disk+bulge"``, ...).
    """

    params: Dict[str, float]
    errors: Dict[str, float]
    names: Tuple[str, ...]
    covariance: Optional[np.ndarray]
    flux: float
    flux_err: float
    loss: float
    chi2: float
    dof: int
    success: bool
    message: str
    nfev: int
    flags: int = 0
    sky_offset: float = 0.0
    optimizer: str = ""
    model: str = "sersic"
    flux_err_fixed_shape: float = float("nan")

    @property
    def chi2_dof(self) -> float:
        return self.chi2 / self.dof if self.dof > 0 else float("nan")

    def with_error_factor(self, factor: float) -> "SersicResult":
        """This result with every error (parameters, both flux errors) multiplied by
        ``factor`` and the covariance by its square (see
        :func:`sphot_core.stats.correlated_error_factor`)."""
        if not factor > 0 or factor == 1.0:
            return self
        cov = None if self.covariance is None else self.covariance * factor**2
        return attrs.evolve(
            self,
            errors={k: v * factor for k, v in self.errors.items()},
            covariance=cov,
            flux_err=self.flux_err * factor,
            flux_err_fixed_shape=self.flux_err_fixed_shape * factor,
        )


class SersicFitter(Stage):
    """An optimizer for a :class:`sphot_core.problem.SersicProblem`.

    The problem owns the model rendering, the loss, the bounds and the
    bounded <-> unbounded ("engine") variable transforms, and solves the amplitude
    (and optionally a sky offset) linearly at each evaluation. An optimizer therefore
    only searches the engine vector of the shape parameters::

        class MyFitter(SersicFitter):
            def fit(self, problem, start=None):
                q0 = problem.start_engine(start)
                res = scipy.optimize.minimize(problem.loss, q0, method="Powell")
                return problem.finalize(res.x, success=res.success,
                                        message=str(res.message), nfev=res.nfev,
                                        optimizer="powell")

    The problem's documented interface: ``free_names``, ``start_engine(start)``,
    ``loss(q)`` (scalar), ``residuals(q)`` (vector whose sum of squares is the loss),
    ``engine_box`` (finite (lower, upper) arrays for global optimizers), and
    ``finalize(q, success=..., message=..., nfev=..., optimizer=...)`` which computes
    the amplitude, covariance, total flux and flags and returns a
    :class:`SersicResult`.
    """

    @abc.abstractmethod
    def fit(self, problem: Any, start: Optional[Mapping[str, float]] = None) -> SersicResult:
        """Minimise ``problem`` from ``start`` (physical values; ``None`` = problem default)."""


# ------------------------------------------------------------------- point sources


@attrs.frozen(eq=False)
class PointSourceResult:
    """Outcome of point-source photometry on one image.

    Attributes
    ----------
    sources : sphot_core.data.SourceTable
        The kept sources. Every source in the table is in ``model`` and vice versa.
    model : ndarray
        Image of all sources in the table (sum of their PSFs times fluxes).
    noise_level : float
        Robust (MAD) 1-sigma of the final residual, image units.
    stats : dict
        Counts and diagnostics for the log (detections per threshold, cuts, ...).
    """

    sources: Any
    model: np.ndarray
    noise_level: float
    stats: Dict[str, Any] = attrs.field(factory=dict)


class RefitStrategy(Stage):
    """Re-solve all source fluxes (and optionally positions) jointly.

    Runs after detection. May add leftover sources (flag ``LEFTOVER``) and drop
    sources whose flux goes to zero. Must recompute ``flux_err`` from its own final
    design, and return a model image that is exactly the returned table rendered.
    """

    @abc.abstractmethod
    def refit(
        self,
        image: np.ndarray,
        noise: np.ndarray,
        psf: Any,
        sources: Any,
        *,
        mask: Optional[np.ndarray] = None,
        exclude: Optional[np.ndarray] = None,
    ) -> PointSourceResult:
        """Refit ``sources`` (a SourceTable) on ``image`` (galaxy and sky removed)."""


class PointSourceFitter(Stage):
    """Find and measure point sources on an image with the galaxy and sky removed."""

    @abc.abstractmethod
    def fit(
        self,
        image: np.ndarray,
        noise: Optional[np.ndarray],
        psf: Any,
        *,
        mask: Optional[np.ndarray] = None,
        exclude: Optional[np.ndarray] = None,
        positions: Optional[Tuple[np.ndarray, np.ndarray]] = None,
        refit: Optional[RefitStrategy] = None,
    ) -> PointSourceResult:
        """Detect/fit sources. ``positions`` (x, y) are used by forced photometry;
        ``refit`` is applied by detecting fitters after detection."""


# ----------------------------------------------------------------------------- sky


@attrs.frozen(eq=False)
class SkyResult:
    """A sky model: the image, its parameters and its mean level."""

    image: np.ndarray
    params: Dict[str, float] = attrs.field(factory=dict)
    method: str = ""

    @property
    def level(self) -> float:
        return float(np.mean(self.image))


class SkyEstimator(Stage):
    """Estimate the sky from a residual image (all fitted components removed)."""

    @abc.abstractmethod
    def fit(
        self,
        residual: np.ndarray,
        noise: Optional[np.ndarray] = None,
        mask: Optional[np.ndarray] = None,
    ) -> SkyResult:
        """Return the sky image for ``residual`` ignoring masked and NaN pixels."""


# ------------------------------------------------------------ kernel calibration


@attrs.frozen
class KernelParameter:
    """One parameter of a kernel family (values in image pixels unless ``unit`` says)."""

    name: str
    start: float
    lower: float
    upper: float
    unit: str = "px"
    description: str = ""
    #: "linear" or "log": how calibrators should scale the search for this parameter
    scale: str = "linear"


class KernelFamily(Stage):
    """A parametric blur kernel K with ``psf = library_psf (*) K``.

    A family only describes K: its parameters (with bounds and starting values) and how
    to render it on the oversampled PSF grid. Calibrators fit the parameters.
    """

    @abc.abstractmethod
    def parameters(self) -> Tuple[KernelParameter, ...]:
        """The parameters, in the order used by vectors of values."""

    @abc.abstractmethod
    def render(self, params: Mapping[str, float], oversample: int) -> np.ndarray:
        """K on a grid ``oversample`` times finer than the image pixels.

        Must return an odd-sized square array, centred on its middle element,
        non-negative, normalised to unit sum, large enough to hold the kernel.
        ``params`` are in image pixels.
        """

    def identity(self) -> Optional[Dict[str, float]]:
        """Parameter values for which K is (nearly) a delta function, if any."""
        return None

    def start(self) -> Dict[str, float]:
        return {p.name: p.start for p in self.parameters()}


@attrs.frozen(eq=False)
class KernelFit:
    """Outcome of one kernel calibration.

    Attributes
    ----------
    family : str
    params : dict
        Fitted kernel parameters (image pixels).
    psf : PSFModel
        The calibrated PSF, ``library (*) K(params)``.
    loss, loss_before : float
        Calibration objective with the fitted kernel and with the PSF used before.
    n_anchors : int
    success : bool
    message : str
    stats : dict
    """

    family: str
    params: Dict[str, float]
    psf: Any
    loss: float
    loss_before: float
    n_anchors: int
    success: bool
    message: str = ""
    stats: Dict[str, Any] = attrs.field(factory=dict)


class KernelCalibrator(Stage):
    """Fit the kernel K so that ``library (*) K`` best reproduces bright isolated stars."""

    @abc.abstractmethod
    def calibrate(
        self,
        image: np.ndarray,
        noise: Optional[np.ndarray],
        library_psf: Any,
        family: KernelFamily,
        *,
        mask: Optional[np.ndarray] = None,
        exclude: Optional[np.ndarray] = None,
        previous: Optional[KernelFit] = None,
    ) -> KernelFit:
        """Calibrate on ``image`` (the galaxy and sky removed; stars present).

        Anchors come from the calibrator's own photometry with free positions, never
        from a pinned table; pixels in ``exclude`` provide no anchors.
        """


# ------------------------------------------------------------------- executors


@attrs.frozen(eq=False)
class JobOutcome:
    """What became of one job submitted to an :class:`Executor`."""

    job: Any
    result: Any = None
    error: Optional[str] = None
    traceback: Optional[str] = None
    seconds: float = float("nan")

    @property
    def ok(self) -> bool:
        return self.error is None


class Executor(Stage):
    """Runs independent jobs (one galaxy each) and yields outcomes as they finish.

    Use as a context manager::

        with executor:
            for outcome in executor.run(fn, jobs, timeout=600):
                ...

    ``fn`` must be a picklable top-level function taking one job. A job that raises,
    crashes its worker or exceeds ``timeout`` seconds becomes a :class:`JobOutcome`
    with ``error`` set; it never stops the other jobs.
    """

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release workers."""

    @property
    def slots(self) -> int:
        """How many jobs run at once (used to size the work handed out)."""
        return 1

    @abc.abstractmethod
    def run(self, fn, jobs: Sequence[Any], *, timeout: Optional[float] = None) -> Iterator[JobOutcome]:
        """Run ``fn(job)`` for every job; yield outcomes in completion order."""
