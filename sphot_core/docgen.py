"""Reference pages generated from the code (used by ``docs/conf.py``).

The configuration reference comes from the packaged ``default_config.toml`` (values and
the comments above each key) and from the options classes of the registered
strategies; the flag tables come from :mod:`sphot_core.flags`. So the documentation
cannot drift from the code.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Dict, List, Tuple

import attrs

from .config import _value, default_config_dict
from .flags import GALAXY_FLAGS, SOURCE_FLAGS
from .hookspecs import STAGES

__all__ = ["config_reference", "flags_reference", "plugins_reference"]


def _default_comments() -> Dict[Tuple[str, str], str]:
    """(section, key) -> the comment block right above the key in default_config.toml."""
    text = resources.files("sphot_core").joinpath("default_config.toml").read_text(encoding="utf-8")
    out: Dict[Tuple[str, str], str] = {}
    section, pending = "", []
    for line in text.splitlines():
        s = line.strip()
        m = re.match(r"^\[([^\]]+)\]$", s)
        if m:
            section, pending = m.group(1), []
            out[(section, "")] = ""
            continue
        if s.startswith("#"):
            pending.append(s.lstrip("#").strip())
            continue
        m = re.match(r"^([A-Za-z0-9_-]+)\s*=", s)
        if m:
            out[(section, m.group(1))] = " ".join(pending)
        pending = []
    return out


def _table(rows: List[Tuple[str, str, str]]) -> str:
    lines = [".. list-table::", "   :header-rows: 1", "   :widths: 25 20 55", "", "   * - key", "     - default", "     - meaning"]
    for key, default, doc in rows:
        lines += [f"   * - ``{key}``", f"     - ``{default}``" if default else "     -", f"     - {doc or ''}"]
    return "\n".join(lines) + "\n"


def _field_doc(f) -> str:
    return str(f.metadata.get("help", "")) if f.metadata else ""


def config_reference(registry=None) -> str:
    """reST page: every section and key of the packaged defaults, and the options of
    every registered strategy."""
    from .registry import get_registry, option_defaults

    registry = registry or get_registry()
    comments = _default_comments()
    tree = default_config_dict()
    parts = [
        "Configuration reference",
        "=======================",
        "",
        "Generated from the packaged ``default_config.toml`` and the options classes of the",
        "registered strategies. Strategy options go in a sub-table named after the strategy,",
        "e.g. ``[refit.nnls]``; unknown keys are errors.",
        "",
    ]
    for section, table in tree.items():
        title = f"``[{section}]``"
        parts += [title, "-" * len(title), ""]
        rows = [(k, _value(v), comments.get((section, k), "")) for k, v in table.items() if not isinstance(v, dict) or not v]
        if section == "aperture":
            from .aperture import ApertureOptions

            rows = [(f.name, _value(f.default), _field_doc(f)) for f in attrs.fields(ApertureOptions)]
        if rows:
            parts.append(_table(rows))
        else:
            parts += [comments.get((section, ""), "") or "Filter names mapped to numbers; see the comment in the defaults.", ""]
        for stage, (_hook, label, sec) in STAGES.items():
            if sec != section:
                continue
            for reg in registry.strategies(stage):
                sub = f"``[{section}.{reg.name}]`` ({label}, from {reg.origin})"
                parts += [sub, "~" * len(sub), "", reg.spec.description or "", ""]
                cls = reg.spec.options
                if cls is None or not attrs.has(cls) or not attrs.fields(cls):
                    parts += ["No options.", ""]
                    continue
                defaults = option_defaults(cls)
                rows = [(f.name, _value(defaults[f.name]) if f.name in defaults else "", _field_doc(f)) for f in attrs.fields(cls)]
                parts.append(_table(rows))
    return "\n".join(parts) + "\n"


def flags_reference() -> str:
    from .aperture import APERTURE_FLAGS

    parts = ["Flags", "=====", "", "Bit masks; combine with ``|``, test with ``&``.", ""]
    for reg in (GALAXY_FLAGS, SOURCE_FLAGS, APERTURE_FLAGS):
        parts += [reg.title, "-" * len(reg.title), "", reg.table_rst()]
    return "\n".join(parts) + "\n"


def plugins_reference(registry=None) -> str:
    from .registry import get_registry

    registry = registry or get_registry()
    parts = ["Built-in strategies", "===================", ""]
    for stage, (_hook, label, section) in STAGES.items():
        title = f"{label} (``{stage}``, chosen in ``[{section}]``)"
        parts += [title, "-" * len(title), ""]
        for reg in registry.strategies(stage):
            alias = f" (aliases: {', '.join('``' + a + '``' for a in reg.spec.aliases)})" if reg.spec.aliases else ""
            parts.append(f"* ``{reg.name}`` — {reg.spec.description}{alias}")
        parts.append("")
    return "\n".join(parts) + "\n"
