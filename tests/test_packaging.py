"""The package's metadata tells the truth, and the built wheel installs beside a user's torch.

- every third-party package that ``src/mednext`` imports is declared (core or an extra), and every
  package the core and the ``pipeline``/``export`` extras declare is imported;
- nothing pins torch or torchvision exactly;
- ``python -m build`` makes a wheel and an sdist that carry LICENSE and NOTICE, and the wheel
  installed into a fresh environment that already holds torch leaves that torch as it was and runs.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "mednext"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]

# Imported only when present, never required: the reason stands beside each.
OPTIONAL_IMPORTS = {
    "triton": "CUDA kernels; comes with torch's CUDA builds on Linux, the CPU path needs none",
    "nibabel": "Segmenter accepts a nibabel image; a user who passes one has nibabel",
}
# Extras whose every declared package must be imported by the package itself.
RUNTIME_EXTRAS = ("pipeline", "export")


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared() -> dict[str, set[str]]:
    """Distribution names per group: ``""`` for the core dependencies, else the extra's name."""
    groups = {"": {_name(r) for r in PROJECT["dependencies"]}}
    for extra, requirements in PROJECT["optional-dependencies"].items():
        groups[extra] = {_name(r) for r in requirements if not r.startswith("mednext")}
    return groups


def imported_top_level_names() -> dict[str, list[str]]:
    """Top-level module names of third-party imports in the package, with the files importing each."""
    found: dict[str, list[str]] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "mednext":
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_import_is_declared_and_every_runtime_declaration_imported():
    distributions = importlib.metadata.packages_distributions()
    groups = declared()
    everything = set().union(*groups.values())
    imported_distributions = set()
    for module, files in imported_top_level_names().items():
        if module in OPTIONAL_IMPORTS:
            continue
        assert module in distributions, f"{module} (imported by {files[0]}) is not installed here"
        names = {_name(d) for d in distributions[module]}
        imported_distributions |= names
        assert names & everything, f"{module} (imported by {files[0]}) comes from {names}: declare it in pyproject.toml"
    runtime = groups[""].union(*(groups[e] for e in RUNTIME_EXTRAS))
    unused = sorted(runtime - imported_distributions)
    assert not unused, f"declared but never imported by src/mednext: {unused}; drop them from pyproject.toml"


def test_the_import_check_sees_a_missing_declaration():
    """The scanner finds the imports that matter (so the rule above cannot pass vacuously)."""
    names = imported_top_level_names()
    assert {"torch", "safetensors", "nnunetv2", "numpy", "SimpleITK", "PIL", "onnx"} <= set(names)
    assert "pillow" not in declared()[""] and "pillow" in declared()["pipeline"]


def test_torch_is_never_pinned_exactly():
    for group, requirements in [("dependencies", PROJECT["dependencies"]), *PROJECT["optional-dependencies"].items()]:
        for requirement in requirements:
            if _name(requirement) in ("torch", "torchvision"):
                assert not re.search(r"==|~=|===", requirement), f"{group}: {requirement} would replace a user's torch"
    assert "torchvision" not in set().union(*declared().values()), "mednext never imports torchvision"


def test_license_metadata():
    assert PROJECT["license"] == "Apache-2.0"
    assert set(PROJECT["license-files"]) == {"LICENSE", "NOTICE"}
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    notice = (ROOT / "NOTICE").read_text(encoding="utf-8")
    for credit in ("Roy", "MICCAI 2023", "MIC-DKFZ/MedNeXt", "nnU-Net"):
        assert credit in notice


# ----------------------------------------------------------------------------- the built wheel


def _run(*args: str | os.PathLike, cwd: Path | None = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _site_packages(prefix: Path) -> Path:
    return prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


@pytest.mark.slow
def test_wheel_installs_beside_an_existing_torch(tmp_path):
    """Build wheel and sdist, install the wheel with its dependencies into a fresh environment that
    already holds this environment's torch and packages, then use it. pip must keep that torch, not
    replace it. (pip fetches from the index only what it does not count as installed: the
    ``argparse`` backport that an nnunetv2 dependency asks for, which pip never lists.)"""
    import torch

    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--wheel", "--sdist", "--outdir", dist, ROOT)
    wheel = next(dist.glob("mednext-*.whl"))
    sdist = next(dist.glob("mednext-*.tar.gz"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith("licenses/LICENSE") for n in names) and any(n.endswith("licenses/NOTICE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    assert any(line.startswith("Requires-Dist: torch>=") for line in metadata.splitlines())
    assert "mednext/nn/mednext.py" in names and not any(n.startswith("tests/") for n in names)
    assert sdist.stat().st_size > 0

    # A fresh environment that sees this one's packages (torch among them) through a .pth file, as a
    # user's environment with torch already installed: pip may add to it but must not replace torch.
    target = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(target)
    site = _site_packages(target)
    here = Path(torch.__file__).resolve().parents[1]
    (site / "existing.pth").write_text(f"{here}\n")
    python = target / "bin" / "python"
    torch_before = (torch.__version__, str(Path(torch.__file__).resolve()))
    extras = "pipeline,export"
    _run(sys.executable, "-m", "pip", "--python", python, "install", f"{wheel}[{extras}]")
    listed = _run(sys.executable, "-m", "pip", "--python", python, "list", "--path", site)
    assert not re.search(r"^torch\s", listed, flags=re.M), f"pip put a torch of its own into the environment:\n{listed}"
    probe = (
        "import json, torch, mednext; from mednext import create_mednext;"
        "m = create_mednext('S', 1, 3, spatial_dims=2).eval();"
        "y = m(torch.randn(1, 1, 32, 32));"
        "print(json.dumps([torch.__version__, torch.__file__, mednext.__file__, list(y.shape),"
        " bool(torch.isfinite(y).all())]))"
    )
    version, torch_file, mednext_file, shape, finite = json.loads(_run(python, "-c", probe).strip().splitlines()[-1])
    assert (version, str(Path(torch_file).resolve())) == torch_before
    assert Path(mednext_file).resolve().is_relative_to(site.resolve()), f"mednext imported from {mednext_file}"
    assert shape == [1, 3, 32, 32] and finite
    assert "plan" in _run(target / "bin" / "mednext", "--help")
    _run(sys.executable, "-m", "pip", "--python", python, "check")
