"""Plugin discovery, name lookup, conflicts and failures (fake installed packages)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from sphot_core.errors import PluginError
from sphot_core.hookspecs import STAGES, StrategySpec, hookimpl
from sphot_core.registry import Registry, canonical

DATA = Path(__file__).parent / "plugins" / "data"

BUILTINS = {
    "fitter": {"iterative_NM", "dual_annealing", "lbfgsb", "levmar"},
    "point_sources": {"ladder", "forced"},
    "refit": {"iterative", "nnls", "none"},
    "sky": {"plane", "constant", "none"},
    "kernel": {"gaussian", "moffat", "drizzle"},
    "calibrator": {"multi_source", "single_source"},
    "executor": {"serial", "processes", "dask"},
}


@pytest.fixture
def installed(monkeypatch):
    """Make fake plugin distributions importable and discoverable, like a pip install."""
    added = []

    def install(*names):
        for name in names:
            monkeypatch.syspath_prepend(str(DATA / name))
            added.append(name)
        importlib.invalidate_caches()

    yield install
    for mod in ("sphot_tophat", "sphot_tophat_clone", "sphot_broken"):
        sys.modules.pop(mod, None)
    importlib.invalidate_caches()


def test_canonical_names():
    assert canonical("iterative_NM") == canonical("iterative-nm") == "iterative_nm"
    assert canonical(" Dual-Annealing ") == "dual_annealing"


def test_builtins_are_registered_through_the_entry_point():
    reg = Registry(autoload=True).load()
    for stage, names in BUILTINS.items():
        found = {r.name for r in reg.strategies(stage)}
        assert names <= found, (stage, names - found)
        for r in reg.strategies(stage):
            if r.name in names:
                assert r.distribution == "sphot"
                assert r.spec.description
    assert reg.problems == []


def test_lookup_is_case_and_dash_insensitive():
    reg = Registry(autoload=False)
    a = reg.get("fitter", "iterative_NM")
    assert reg.get("fitter", "ITERATIVE-nm") is a
    assert reg.get("fitter", "lbfgsb_polish").name == "lbfgsb"  # alias of the original tool


def test_unknown_name_suggests_and_lists():
    reg = Registry(autoload=False)
    with pytest.raises(PluginError) as err:
        reg.get("refit", "nnl", where="[refit] method")
    msg = str(err.value)
    assert "unknown refit strategy 'nnl'" in msg
    assert "[refit] method" in msg
    assert "Did you mean 'nnls'" in msg
    assert "Available: iterative, nnls, none" in msg
    assert "\n" not in msg


def test_unknown_stage_kind():
    with pytest.raises(PluginError, match="stage kinds"):
        Registry(autoload=False).get("optimiser", "levmar")


def test_third_party_kernel_family_is_discovered(installed):
    installed("tophat_plugin")
    reg = Registry(autoload=True)
    r = reg.get("kernel", "TopHat")
    assert r.name == "tophat"
    assert (r.distribution, r.version) == ("sphot-tophat", "1.0")
    family = reg.create("kernel", "tophat", {"supersample": 3})
    k = family.render({"radius": 1.0}, 4)
    assert k.shape[0] % 2 == 1 and abs(k.sum() - 1) < 1e-12
    described = reg.describe()["kernel"]
    assert {"name": "tophat", "distribution": "sphot-tophat"}.items() <= next(d for d in described if d["name"] == "tophat").items()


def test_autoload_disabled_loads_builtins_only(installed, monkeypatch):
    installed("tophat_plugin")
    monkeypatch.setenv("SPHOT_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = Registry()
    assert reg.autoload is False
    assert "tophat" not in reg.names("kernel")
    assert "gaussian" in reg.names("kernel")
    with pytest.raises(PluginError, match="may not be installed"):
        reg.get("kernel", "tophat")


def test_two_distributions_claiming_one_name(installed):
    installed("tophat_plugin", "conflict_plugin")
    reg = Registry(autoload=True)
    with pytest.raises(PluginError) as err:
        reg.get("kernel", "tophat")
    msg = str(err.value)
    assert "sphot-tophat 1.0" in msg and "sphot-tophat-clone 2.0" in msg
    assert any("claimed by" in p for p in reg.problems)
    # the other strategies stay usable
    assert reg.get("kernel", "gaussian").name == "gaussian"


def test_plugin_that_fails_to_import_is_reported_and_skipped(installed):
    installed("broken_plugin", "tophat_plugin")
    reg = Registry(autoload=True)
    assert reg.get("kernel", "tophat").distribution == "sphot-tophat"
    (problem,) = [p for p in reg.problems if "sphot-broken" in p]
    assert "failed to import" in problem and "ModuleNotFoundError" in problem


def test_mistyped_hook_name_fails_loudly():
    class Typo:
        @hookimpl
        def sphot_kernel_familes(self):  # noqa: D401 - deliberate typo
            return []

    with pytest.raises(PluginError, match="unknown hook"):
        Registry(autoload=False, extra_plugins=[Typo()]).load()


def test_hook_returning_garbage_is_reported():
    class Bad:
        @hookimpl
        def sphot_sky_estimators(self):
            return ["not a spec"]

    reg = Registry(autoload=False, extra_plugins=[Bad()]).load()
    assert any("not a StrategySpec" in p for p in reg.problems)
    assert "plane" in reg.names("sky")


def test_throwaway_plugin_object():
    class Mine:
        @hookimpl
        def sphot_refit_strategies(self):
            return [StrategySpec("keep", factory=lambda opts: "built", aliases=("keep-all",), description="x")]

    reg = Registry(autoload=False, extra_plugins=[Mine()])
    assert reg.create("refit", "keep_all") == "built"


def test_every_builtin_factory_builds_with_default_options():
    reg = Registry(autoload=False)
    for stage in STAGES:
        for r in reg.strategies(stage):
            if stage == "executor" and r.name == "dask":
                continue  # optional dependency; tested in test_executors
            obj = reg.create(stage, r.name)
            assert obj is not None


def test_describe_is_json_serialisable():
    data = Registry(autoload=False).describe()
    back = json.loads(json.dumps(data))  # plain JSON types only: no fallback conversion
    assert set(back) == set(STAGES)
    assert back["refit"][0]["options"] == data["refit"][0]["options"]
