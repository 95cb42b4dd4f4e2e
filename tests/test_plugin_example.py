"""The worked third-party plugin of docs/plugins.rst, installed the way pip would.

``tests/plugins/data/lorentz_plugin`` holds the module ``sphot_lorentz.py`` and the
metadata directory ``sphot_lorentz-1.0.dist-info`` (``METADATA``, ``entry_points.txt``
with the ``[sphot]`` group). Putting that folder on ``sys.path`` is exactly what
installing the distribution does, so a fresh registry must discover the family through
its entry point, list it with its distribution, render it and calibrate with it.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from sphot_core.errors import ConfigError
from sphot_core.psf import PSFModel
from sphot_core.registry import Registry

PLUGIN_DIR = Path(__file__).resolve().parent / "plugins" / "data" / "lorentz_plugin"
OS = 4


@pytest.fixture
def registry(monkeypatch):
    """A fresh registry that sees the example distribution (and forgets it afterwards)."""
    monkeypatch.delenv("SPHOT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, "sphot_lorentz", raising=False)
    yield Registry().load()
    sys.modules.pop("sphot_lorentz", None)


def test_discovered_through_the_entry_point(registry):
    reg = registry.get("kernel", "lorentzian")
    assert reg.distribution == "sphot-lorentz" and reg.version == "1.0"
    assert registry.get("kernel", "Lorentz").spec is reg.spec  # alias, case-insensitive
    assert {"gaussian", "moffat", "drizzle", "lorentzian"} <= set(registry.names("kernel"))
    listed = {row["name"]: row for row in registry.describe()["kernel"]}
    assert listed["lorentzian"]["distribution"] == "sphot-lorentz"
    assert listed["lorentzian"]["options"] == {"radius": 10.0, "max_gamma": 3.0}
    assert not [p for p in registry.problems if "lorentz" in p]


def test_not_visible_without_the_distribution(monkeypatch):
    monkeypatch.delenv("SPHOT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    assert "lorentzian" not in Registry().load().names("kernel")


def test_renders_a_valid_kernel(registry):
    fam = registry.create("kernel", "lorentzian", {"radius": 6.0})
    gamma = 1.0  # 4 grid elements: the profile is sampled exactly at r = gamma
    k = fam.render({"gamma": gamma}, OS)
    c = k.shape[0] // 2
    assert k.shape == (2 * 6 * OS + 1,) * 2 and np.all(k >= 0)
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)  # centred
    # the 2-D Cauchy profile: (1 + r^2/gamma^2)^-1.5, so 2^-1.5 of the peak at r = gamma
    assert k[c, c + int(gamma * OS)] / k[c, c] == pytest.approx(2.0**-1.5, rel=1e-12)
    np.testing.assert_array_equal(fam.render(fam.identity(), OS), np.ones((1, 1)))
    with pytest.raises(ConfigError, match="unknown option"):
        registry.create("kernel", "lorentzian", {"radius_px": 6.0})


def test_calibrates_with_the_plugin_family(registry):
    r = np.arange(-80, 81) / OS
    g = np.exp(-0.5 * (r / 0.75) ** 2)
    library = PSFModel.from_array(np.outer(g, g), OS, source="synthetic")
    fam = registry.create("kernel", "lorentzian", {})
    truth = library.convolved(fam.render({"gamma": 0.6}, OS))
    rng = np.random.default_rng(2)
    grid = np.linspace(14, 126, 7)
    x, y = (a.ravel() + rng.uniform(-2, 2, a.size) for a in np.meshgrid(grid, grid))
    flux = 10 ** rng.uniform(2.8, 3.8, x.size)
    image = truth.render((140, 140), x, y, flux, half=20) + rng.normal(0, 1.0, (140, 140))
    cal = registry.create("calibrator", "multi_source", {"kernel_anchor_K": 25})
    fit = cal.calibrate(image, None, library, fam)
    assert fit.success and fit.family == "lorentzian" and fit.n_anchors >= 15
    assert fit.params["gamma"] == pytest.approx(0.6, rel=0.05)
    assert fit.loss < fit.loss_before


def test_passes_the_conformance_checks(registry):
    """What the plugin's author runs in their own test suite (one line)."""
    from sphot_core.testing import check_plugin

    check_plugin(registry.create("kernel", "lorentzian"))
