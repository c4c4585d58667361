"""The supported nnunetv2 range: one place (nnunet_compat), the same in setup.py, enforced at import."""
import os
import runpy
import subprocess
import sys
from importlib import metadata

import pytest
import setuptools

from nnunet_sud import nnunet_compat
from nnunet_sud.errors import UserFacingError
from nnunet_sud.nnunet_compat import (NNUNETV2_BELOW, NNUNETV2_MIN, NNUNETV2_REQUIREMENT, UnsupportedNnUNetError,
                                      check_nnunetv2, is_supported)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_nnunetv2_version(monkeypatch, version):
    real = metadata.version

    def fake(name):
        if name == "nnunetv2":
            if version is None:
                raise metadata.PackageNotFoundError(name)
            return version
        return real(name)

    monkeypatch.setattr(metadata, "version", fake)


def test_requirement_string_is_built_from_the_range():
    assert NNUNETV2_REQUIREMENT == f"nnunetv2>={NNUNETV2_MIN},<{NNUNETV2_BELOW}"


def test_setup_py_declares_the_compat_range(monkeypatch):
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(os.path.join(REPO, "tests"))  # setup.py must not depend on the working directory
    runpy.run_path(os.path.join(REPO, "setup.py"), run_name="__main__")
    nnunet_reqs = [r for r in captured["install_requires"] if r.replace(" ", "").startswith("nnunetv2")]
    assert nnunet_reqs == [NNUNETV2_REQUIREMENT]


def test_the_installed_nnunetv2_is_supported():
    # the environment running this suite is one the range claims; if not, the range is untested
    assert is_supported(check_nnunetv2()), metadata.version("nnunetv2")


@pytest.mark.parametrize("version,ok", [
    ("2.8.0", True), ("2.8.1", True), ("2.8", True), ("2.8.1.post1", True), ("2.8.2.dev0", True),
    ("2.7.0", False), ("2.6.4", False), ("2.5.2", False), ("2.9.0", False), ("2.9.0rc1", False),
    ("2.10.0", False), ("3.0", False), ("1.7.1", False), ("garbage", False),
])
def test_is_supported(version, ok):
    assert is_supported(version) is ok


def test_in_range_version_passes(monkeypatch):
    _fake_nnunetv2_version(monkeypatch, "2.8.0")
    assert check_nnunetv2() == "2.8.0"


@pytest.mark.parametrize("version", ["2.7.0", "2.6.4", "2.9.0"])
def test_out_of_range_version_names_version_range_and_fix(monkeypatch, version):
    _fake_nnunetv2_version(monkeypatch, version)
    with pytest.raises(UnsupportedNnUNetError) as ei:
        check_nnunetv2()
    msg = str(ei.value)
    assert f"nnunetv2 {version} is installed" in msg
    assert f">={NNUNETV2_MIN},<{NNUNETV2_BELOW}" in msg
    assert f'pip install "{NNUNETV2_REQUIREMENT}"' in msg
    # the CLI prints UserFacingErrors without a traceback; importers see an ImportError
    assert isinstance(ei.value, UserFacingError) and isinstance(ei.value, ImportError)


def test_missing_nnunetv2_says_so(monkeypatch):
    _fake_nnunetv2_version(monkeypatch, None)
    with pytest.raises(UnsupportedNnUNetError, match="nnunetv2 is not installed") as ei:
        check_nnunetv2()
    assert NNUNETV2_REQUIREMENT in str(ei.value)


def test_import_of_nnunet_sud_stops_on_an_unsupported_nnunetv2():
    """The check runs when the package is imported (what nnUNetv2_train and `nnunet-sud` do first),
    before any module that would fail on a missing nnU-Net name."""
    code = ("from importlib import metadata; real = metadata.version; "
            "metadata.version = lambda n: '2.7.0' if n == 'nnunetv2' else real(n); "
            "import nnunet_sud.trainers")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("nnunet_sud.nnunet_compat.UnsupportedNnUNetError: "), p.stderr[-2000:]
    assert "nnunetv2 2.7.0 is installed" in last and NNUNETV2_REQUIREMENT in last
    assert "nnunetv2.training" not in p.stderr  # stopped before importing any nnU-Net module


def test_compat_module_stays_light():
    """Importing the check must not pull in nnunetv2 or torch (it runs on every import of the package)."""
    code = ("import sys, nnunet_sud; "
            "print(sorted(m for m in ('torch', 'nnunetv2') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"
    assert nnunet_compat.metadata is metadata  # the lookup the tests above patch


def nnunetv2_names_imported_by_nnunet_sud():
    """(module, name, where) for every ``from nnunetv2... import name`` in the package, including the
    imports inside functions (which an import of the package does not execute)."""
    import ast

    pkg = os.path.join(REPO, "nnunet_sud")
    found = []
    for folder, _, files in os.walk(pkg):
        for fn in sorted(files):
            if not fn.endswith(".py"):
                continue
            path = os.path.join(folder, fn)
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "nnunetv2":
                    found += [(node.module, a.name, f"{os.path.relpath(path, REPO)}:{node.lineno}") for a in node.names]
    return found


def test_every_nnunetv2_name_nnunet_sud_imports_exists():
    """What broke on 2.6/2.7 (LocalLogger, comp_blosc2_params) were names imported from nnunetv2 that
    the installed release lacks, some only inside functions; check all of them against this release."""
    import importlib

    names = nnunetv2_names_imported_by_nnunet_sud()
    assert len(names) > 20 and ("nnunetv2.training.logging.nnunet_logger", "LocalLogger") in [n[:2] for n in names]
    missing = []
    for module, name, where in names:
        try:
            ok = hasattr(importlib.import_module(module), name)
        except ImportError:
            ok = False
        if not ok:
            missing.append(f"{module}.{name} ({where})")
    assert not missing, f"nnunetv2 {metadata.version('nnunetv2')} lacks: {missing}"
