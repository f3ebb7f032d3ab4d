"""The package's public names resolve to the real objects, lazily."""

from __future__ import annotations

import subprocess
import sys

import logd_trio


def test_every_public_name_resolves() -> None:
    for name in logd_trio.__all__:
        assert getattr(logd_trio, name) is not None, name
    assert set(logd_trio.__all__) == {"__version__", *logd_trio._EXPORTS}


def test_importing_the_package_or_the_core_does_not_import_trio() -> None:
    code = "import sys, logd_trio, logd_trio.core.framing, logd_trio.core.requests; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_package_is_in_the_distribution() -> None:
    """pyproject lists packages by name (the CLI installs under another name): a new
    subpackage missing from that list works in an editable install and breaks `pip install .`."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "logd_trio").rglob("__init__.py")}
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
