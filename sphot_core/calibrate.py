"""Engine-side helpers of PSF kernel calibration: exclusion ellipse, convergence, damping.

The calibrators (``sphot_plugins.calibration``) fit one kernel from one image. Between
engine iterations the engine needs three more things, provided here:

* :func:`galaxy_exclusion_mask` -- the ellipse around the galaxy centre where no
  calibration anchor may be taken (``center_mask_r_in_galaxy_size``);
* :class:`KernelTracker` -- receives the successive :class:`~sphot_core.stages.KernelFit`
  of one band, refuses fits that fail or do worse than the PSF in use, damps
  oscillations, says when the kernel stopped changing (``kernel_skip_threshold``) and
  returns the PSF to use next;
* :func:`kernel_rms_change` -- the kernel difference measure the tracker uses.

Typical use by the engine, once per band::

    tracker = KernelTracker(band.library_psf, family, skip_threshold=1e-3,
                            skip_on_convergence=True, damping=0.5)   # [psf-calib] keys
    for iteration in range(n_iter):
        ...  # Sersic, stars, sky
        if in_mainloop and tracker.should_calibrate():
            exclude = galaxy_exclusion_mask(band.shape, sersic.params, factor=1.5)
            fit = calibrator.calibrate(image, noise, band.library_psf, family,
                                       mask=band.mask, exclude=exclude,
                                       previous=tracker.fit)
            record = tracker.update(fit, iteration)
            band.kernel_history.append(record)
            band.psf, band.kernel = tracker.psf, tracker.fit
            # re-render (not refit) the galaxy with band.psf
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Mapping, Optional

import attrs
import numpy as np

from .errors import InputError
from .psf import PSFModel
from .stages import KernelFamily, KernelFit

__all__ = ["galaxy_exclusion_mask", "kernel_rms_change", "KernelTracker"]

log = logging.getLogger(__name__)


def galaxy_exclusion_mask(
    shape,
    params: Mapping[str, float],
    *,
    factor: float = 1.5,
    cap_fraction: float = 0.45,
    min_axis: float = 1.0,
) -> np.ndarray:
    """Pixels inside the calibration exclusion ellipse around the galaxy centre.

    The ellipse is centred on ``(x_0, y_0)``, has the galaxy's ellipticity and position
    angle, and a semi-major axis ``a = factor * r_eff``. ``a`` is capped at
    ``cap_fraction * min(shape)`` (the minor axis shrinks with it, keeping the axis
    ratio) so the mask can never cover the whole cutout; the minor axis
    ``b = a (1 - ellip)`` is floored at ``min(a, min_axis)`` pixels so a needle-thin
    fit cannot make it vanish. A pixel belongs to the mask when its *centre* lies inside
    the ellipse (pixel ``(0, 0)`` has its centre at ``(0.0, 0.0)``).

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)`` of the image.
    params : mapping
        Sersic parameters in the :class:`~sphot_core.stages.SersicResult` convention:
        ``x_0, y_0, r_eff`` (semi-major axis, pixels), ``ellip = 1 - b/a`` (default 0)
        and ``theta`` (radians CCW from +x, default 0).
    factor : float
        ``center_mask_r_in_galaxy_size``; ``0`` disables the mask (all False).
    cap_fraction : float
        Largest semi-major axis as a fraction of the smaller image side.
    min_axis : float
        Floor of the minor semi-axis, pixels.

    Raises
    ------
    InputError
        Missing or non-finite centre or size, negative ``factor``.
    """
    ny, nx = (int(shape[0]), int(shape[1]))
    if factor < 0:
        raise InputError(f"calibration centre mask: center_mask_r_in_galaxy_size must be >= 0, got {factor!r}")
    if factor == 0:
        return np.zeros((ny, nx), dtype=bool)
    try:
        x0, y0, r_eff = (float(params["x_0"]), float(params["y_0"]), float(params["r_eff"]))
    except KeyError as exc:
        raise InputError(f"calibration centre mask: Sersic parameter {exc.args[0]!r} missing") from None
    ellip = float(params.get("ellip", 0.0))
    theta = float(params.get("theta", 0.0))
    if not all(math.isfinite(v) for v in (x0, y0, r_eff, ellip, theta)) or r_eff <= 0:
        raise InputError(
            f"calibration centre mask: need finite x_0, y_0, ellip, theta and r_eff > 0, got "
            f"x_0={x0}, y_0={y0}, r_eff={r_eff}, ellip={ellip}, theta={theta}"
        )
    a = min(factor * r_eff, cap_fraction * min(ny, nx))
    b = max(a * (1.0 - min(max(ellip, 0.0), 0.99)), min(a, min_axis))
    yy, xx = np.mgrid[0:ny, 0:nx]
    dx, dy = xx - x0, yy - y0
    c, s = math.cos(theta), math.sin(theta)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def kernel_rms_change(kernel_a: np.ndarray, kernel_b: np.ndarray, oversample: int, window: int = 20) -> float:
    """RMS difference of two kernels per image pixel (``kernel_skip_threshold`` units).

    Both kernels (odd, centred, unit sum, on the grid ``oversample`` times finer than
    the image) are converted to densities per image pixel (``oversample**2`` times the
    element values), centred on a common square of ``2 window + 1`` image pixels and
    compared by the root mean square of their difference over that square. For
    kernels resolved by the image grid this equals the RMS difference of the kernels
    sampled on image pixels over a ``(2 window + 1)**2`` window, the measure of the
    original tool.
    """
    half = window * oversample
    a = _centred(np.asarray(kernel_a, dtype=float), half)
    b = _centred(np.asarray(kernel_b, dtype=float), half)
    return float(np.sqrt(np.mean(((a - b) * oversample**2) ** 2)))


def _centred(k: np.ndarray, half: int) -> np.ndarray:
    """``k`` (odd, centred) cropped or zero-padded to ``2 half + 1`` on a side."""
    out = np.zeros((2 * half + 1, 2 * half + 1))
    hk = k.shape[0] // 2
    m = min(hk, half)
    out[half - m : half + m + 1, half - m : half + m + 1] = k[hk - m : hk + m + 1, hk - m : hk + m + 1]
    return out


@attrs.define
class KernelTracker:
    """Follows the kernel calibrations of one band across engine iterations.

    Parameters
    ----------
    library_psf : PSFModel
        The band's library PSF (the kernel is always applied to it, never compounded).
    family : KernelFamily
        The kernel family the calibrator fits (used to re-render damped kernels).
    skip_threshold : float
        ``kernel_skip_threshold``: the kernel has converged when the RMS change of the
        accepted kernel (:func:`kernel_rms_change`) falls below this.
    skip_on_convergence : bool
        ``kernel_fit_skip_on_convergence``: once converged, :meth:`should_calibrate`
        returns False (no more calibrations for this band).
    damping : float
        Weight of the new kernel when its step reverses the direction of the previous
        accepted step (an oscillation): the parameters move by ``damping`` of the way
        from the kernel in use to the new fit. ``1`` disables damping.

    Attributes
    ----------
    fit : KernelFit or None
        The accepted calibration (pass it as ``previous`` to the next calibration).
    history : list of dict
        One record per :meth:`update` (see there), ready for ``NAME_sphot.h5``.
    """

    library_psf: PSFModel
    family: KernelFamily
    skip_threshold: float = attrs.field(default=1e-3, validator=attrs.validators.ge(0.0))
    skip_on_convergence: bool = True
    damping: float = attrs.field(default=0.5, validator=[attrs.validators.gt(0.0), attrs.validators.le(1.0)])
    fit: Optional[KernelFit] = attrs.field(default=None, init=False)
    history: List[Dict[str, Any]] = attrs.field(factory=list, init=False)
    _step: Optional[np.ndarray] = attrs.field(default=None, init=False)
    _converged: bool = attrs.field(default=False, init=False)

    @property
    def psf(self) -> PSFModel:
        """The PSF to use now: the accepted calibrated PSF, else the library PSF."""
        return self.fit.psf if self.fit is not None else self.library_psf

    @property
    def converged(self) -> bool:
        """The kernel stopped changing: the last accepted update moved it by less than
        ``skip_threshold``, or a later fit could not beat the PSF in use."""
        return self._converged

    def should_calibrate(self) -> bool:
        """False once the kernel converged and ``skip_on_convergence`` is set."""
        return not (self.skip_on_convergence and self._converged)

    def _kernel(self, params: Optional[Mapping[str, float]]) -> np.ndarray:
        if params is None:
            return np.ones((1, 1))
        return self.family.render(params, self.library_psf.oversample)

    def _unit(self, params: Mapping[str, float]) -> np.ndarray:
        """Parameters scaled by their ranges (so steps in different units compare)."""
        return np.array([(params[p.name] - p.lower) / (p.upper - p.lower or 1.0) for p in self.family.parameters()])

    def update(self, fit: KernelFit, iteration: Optional[int] = None) -> Dict[str, Any]:
        """Take a new calibration into account and return its history record.

        The fit is *rejected* (the PSF in use is kept) when it failed or when its loss
        is higher than the loss of the PSF in use on the same anchors
        (``fit.loss > fit.loss_before``). An accepted fit whose parameter step points
        against the previous accepted step is *damped* (see ``damping``) and its PSF
        re-rendered. The kernel has *converged* when the accepted kernel differs from
        the previous one by less than ``skip_threshold``, or when the fit was rejected
        for doing worse than the PSF in use (the kernel cannot improve); a failed
        calibration leaves the convergence state as it was.

        Returns
        -------
        dict
            ``iteration``; ``family``; ``params`` (the kernel in use after this update);
            ``fitted_params`` (what the calibrator returned); ``loss``, ``loss_before``,
            ``n_anchors``, ``success`` (from the fit); ``accepted``, ``damped``,
            ``rms_change``, ``converged``; ``fwhm`` (of the PSF in use, pixels);
            ``message``.
        """
        old_params = self.fit.params if self.fit is not None else None
        accepted, stable, message = self._judge(fit)
        damped = False
        if accepted:
            new = fit
            if old_params is not None and self.damping < 1:
                new, damped = self._damped(fit, old_params)
            rms = kernel_rms_change(
                self._kernel(old_params), self._kernel(new.params), self.library_psf.oversample
            )
            if old_params is not None:
                self._step = self._unit(new.params) - self._unit(old_params)
            self.fit = new
            self._converged = rms < self.skip_threshold
        else:
            rms = 0.0
            self._converged = self._converged or stable
        record = {
            "iteration": -1 if iteration is None else int(iteration),
            "family": fit.family,
            "params": dict(self.fit.params) if self.fit is not None else {},
            "fitted_params": dict(fit.params),
            "loss": float(fit.loss),
            "loss_before": float(fit.loss_before),
            "n_anchors": int(fit.n_anchors),
            "success": bool(fit.success),
            "accepted": accepted,
            "damped": damped,
            "rms_change": float(rms),
            "converged": self._converged,
            "fwhm": float(self.psf.fwhm),
            "message": message,
        }
        self.history.append(record)
        log.info(
            "kernel tracker: iteration %s %s%s, RMS change %.3g%s",
            record["iteration"],
            "accepted" if accepted else "rejected",
            " (damped)" if damped else "",
            rms,
            ", converged" if self._converged else "",
        )
        return record

    def _judge(self, fit: KernelFit):
        """``(accepted, stable, message)``; ``stable``: rejected because the PSF in use
        already does better (the kernel cannot improve any more)."""
        if not fit.success:
            return False, False, f"calibration failed: {fit.message}"
        expected = {p.name for p in self.family.parameters()}
        if set(fit.params) != expected:
            return False, False, f"fit parameters {sorted(fit.params)} do not match the family's {sorted(expected)}"
        if not math.isfinite(fit.loss):
            return False, False, "calibration loss is not finite"
        if math.isfinite(fit.loss_before) and fit.loss > fit.loss_before:
            return False, True, f"loss {fit.loss:.6g} is worse than the PSF in use ({fit.loss_before:.6g})"
        return True, False, fit.message

    def _damped(self, fit: KernelFit, old_params: Mapping[str, float]):
        """``fit``, or a damped copy when its step reverses the previous step."""
        step = self._unit(fit.params) - self._unit(old_params)
        if self._step is None or float(step @ self._step) >= 0:
            return fit, False
        params = {k: old_params[k] + self.damping * (fit.params[k] - old_params[k]) for k in fit.params}
        k = self.family.render(params, self.library_psf.oversample)
        lib = self.library_psf
        psf = lib if k.size == 1 else lib.convolved(k, source=f"{lib.source} (*) damped kernel")
        stats = dict(fit.stats, undamped_params=dict(fit.params))
        return attrs.evolve(fit, params=params, psf=psf, message=f"{fit.message} (damped)", stats=stats), True
