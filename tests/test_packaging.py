"""Packaging: ``backends/`` and ``conformance/`` install inside the ``portopt`` namespace only.

Checked three ways: the explicit package list in pyproject.toml covers every source file; the
editable install imports ``portopt.backends.*`` / ``portopt.conformance`` and nothing generic; a
wheel built from the sources holds exactly the mapped tree and, installed into a fresh venv,
imports the same way. Also: the README names the commands that .ci/ runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = ("portopt", "backends", "conformance")
# The fixed top level of the repository (DESIGN.md); only portopt/ may be a package there.
TOP_LEVEL_PACKAGES = {"portopt", "backends", "conformance"}

# Run in a subprocess from a directory outside the repository: prints what can be imported.
IMPORT_PROBE = """
import importlib.metadata, importlib.util, json
import portopt, portopt.backends, portopt.backends.reference, portopt.conformance
print(json.dumps({
    "direct_url": importlib.metadata.distribution("portopt").read_text("direct_url.json"),
    "portopt": portopt.__file__,
    "reference": portopt.backends.reference.__file__,
    "conformance": portopt.conformance.__file__,
    "backends_spec": repr(importlib.util.find_spec("backends")),
    "conformance_spec": repr(importlib.util.find_spec("conformance")),
}))
"""


def setuptools_config() -> dict[str, Any]:
    with open(REPO / "pyproject.toml", "rb") as f:
        config: dict[str, Any] = tomllib.load(f)["tool"]["setuptools"]
    return config


def package_of(source_dir: Path, package_dir: dict[str, str]) -> str:
    """The installed package name of a source folder, through setuptools' ``package-dir`` map."""
    rel = source_dir.relative_to(REPO).parts
    matches = [(pkg, Path(d).parts) for pkg, d in package_dir.items() if rel[: len(Path(d).parts)] == Path(d).parts]
    assert matches, f"{source_dir} is under no package-dir entry of pyproject.toml"
    pkg, root = max(matches, key=lambda m: len(m[1]))  # the most specific mapping wins
    return ".".join((pkg, *rel[len(root) :]))


def installed_path(source: Path, package_dir: dict[str, str]) -> str:
    """Where a source file lands inside site-packages (or a wheel), e.g. ``portopt/backends/reference.py``."""
    return "/".join((*package_of(source.parent, package_dir).split("."), source.name))


def python_sources() -> list[Path]:
    return sorted(p for root in SOURCE_ROOTS for p in (REPO / root).rglob("*.py") if "__pycache__" not in p.parts)


def clean_env() -> dict[str, str]:
    """The environment for a subprocess that must not see this checkout through PYTHONPATH."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def run_probe(python: str | Path, cwd: Path) -> dict[str, str]:
    result = subprocess.run(
        [str(python), "-c", IMPORT_PROBE], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"import probe failed:\n{result.stderr}"
    probe: dict[str, str] = json.loads(result.stdout.strip().splitlines()[-1])
    return probe


# --- the explicit package list ---------------------------------------------------------------


def test_every_source_file_is_in_a_listed_package() -> None:
    config = setuptools_config()
    packages, package_dir = set(config["packages"]), config["package-dir"]
    assert package_dir == {"portopt": "portopt", "portopt.backends": "backends", "portopt.conformance": "conformance"}
    for source in python_sources():
        package = package_of(source.parent, package_dir)
        assert package in packages, (
            f"{source.relative_to(REPO)} belongs to package {package!r}, which is missing from the explicit "
            f"`packages` list in pyproject.toml: add it there or it is left out of the wheel"
        )


def test_every_listed_package_has_an_init() -> None:
    config = setuptools_config()
    package_dir = {pkg: Path(d) for pkg, d in config["package-dir"].items()}
    for package in config["packages"]:
        assert package.split(".")[0] == "portopt", f"package {package!r} would install outside the portopt namespace"
        head = max((p for p in package_dir if package == p or package.startswith(p + ".")), key=len)
        folder = REPO / package_dir[head] / Path(*package.split(".")[len(head.split(".")) :])
        assert (folder / "__init__.py").is_file(), f"package {package!r} has no {folder.relative_to(REPO)}/__init__.py"


def test_only_the_fixed_top_level_holds_packages() -> None:
    found = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert found <= TOP_LEVEL_PACKAGES, f"unexpected top-level packages {sorted(found - TOP_LEVEL_PACKAGES)}"
    assert (REPO / "portopt" / "py.typed").is_file()
    assert "py.typed" in setuptools_config()["package-data"]["portopt"]


# --- the editable install --------------------------------------------------------------------


def test_editable_install_maps_backends_and_conformance_into_portopt(tmp_path: Path) -> None:
    probe = run_probe(sys.executable, cwd=tmp_path)
    direct_url = json.loads(probe["direct_url"] or "{}")
    url = direct_url.get("url", "")
    if not direct_url.get("dir_info", {}).get("editable") or Path(url.removeprefix("file://")).resolve() != REPO:
        pytest.skip(f"portopt is not installed editable from {REPO} (direct_url.json: {direct_url})")
    assert Path(probe["reference"]) == REPO / "backends" / "reference.py"
    assert Path(probe["conformance"]) == REPO / "conformance" / "__init__.py"
    assert probe["backends_spec"] == "None", f"a top-level `backends` is importable: {probe['backends_spec']}"
    assert probe["conformance_spec"] == "None", f"a top-level `conformance` is importable: {probe['conformance_spec']}"


# --- the wheel, built from the sources and installed into a fresh venv ----------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (so no build/ or egg-info lands in the checkout)."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools (pip install -e '.[test]')")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCE_ROOTS:
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    out = work / "dist"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    result = subprocess.run(
        [*pip_wheel, "-w", str(out), str(src)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"building the wheel failed:\n{result.stdout}\n{result.stderr}"
    (built,) = out.glob("portopt-*.whl")
    return built


def test_wheel_holds_exactly_the_mapped_tree(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"portopt"}, f"the wheel installs more than portopt/ at the top: {sorted(top)}"
    assert {"portopt/backends/reference.py", "portopt/conformance/__init__.py", "portopt/py.typed"} <= names
    package_dir = setuptools_config()["package-dir"]
    missing = sorted(p for s in python_sources() if (p := installed_path(s, package_dir)) not in names)
    assert not missing, f"source files missing from the wheel: {missing}"
    (info,) = dist_info
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert re.search(r"^portopt\s*=\s*portopt\.cli:main$", entry_points, re.M), entry_points


def test_wheel_in_fresh_venv_imports_only_inside_portopt(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Install the wheel alone (no network): its runtime dependencies come from this environment's
    # site folders, added as plain path entries (so no .pth of theirs runs, e.g. an editable finder).
    pip_install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile"]
    subprocess.run(
        [*pip_install, "--target", purelib, str(wheel)],
        check=True,
        env=clean_env(),
        timeout=300,
    )
    import numpy
    import rich
    import torch

    dep_dirs = sorted({str(Path(m.__file__ or "").resolve().parent.parent) for m in (torch, numpy, rich)})
    Path(purelib, "_outer_deps.pth").write_text("\n".join(dep_dirs) + "\n")

    installed = {p.name for p in Path(purelib).iterdir()}
    assert "backends" not in installed, sorted(installed)
    assert "conformance" not in installed, sorted(installed)
    probe = run_probe(python, cwd=tmp_path)
    assert Path(probe["portopt"]).resolve() == (Path(purelib) / "portopt" / "__init__.py").resolve()
    assert Path(probe["reference"]).resolve() == (Path(purelib) / "portopt" / "backends" / "reference.py").resolve()
    assert probe["backends_spec"] == "None", f"a top-level `backends` is importable: {probe['backends_spec']}"
    assert probe["conformance_spec"] == "None", f"a top-level `conformance` is importable: {probe['conformance_spec']}"


# --- the README's commands are the ones .ci/ runs ------------------------------------------


def readme_blocks() -> list[tuple[str, str]]:
    """The README's fenced code blocks as (language, text); language "" for a plain block."""
    blocks: list[tuple[str, str]] = []
    language: str | None = None
    lines: list[str] = []
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if language is None:
                language, lines = line[3:].strip(), []
            else:
                blocks.append((language, "\n".join(lines) + "\n"))
                language = None
        elif language is not None:
            lines.append(line)
    assert language is None, "README.md has an unclosed code block"
    return blocks


def readme_commands() -> set[str]:
    """Every line of the README's plain code blocks (the commands a person types)."""
    return {line.strip() for language, text in readme_blocks() if not language for line in text.splitlines()}


def test_ci_runs_the_readme_test_command() -> None:
    run = (REPO / ".ci" / "run").read_text()
    calls = re.findall(r"^\s*(bash \.ci/test\.sh)\b", run, re.M)
    assert calls == ["bash .ci/test.sh"], f".ci/run must call the test command exactly once, found {calls}"
    assert calls[0] in readme_commands(), "README.md must show the test command that .ci/run calls"
    assert "bash .ci/main-job.sh" in readme_commands(), "README.md must show the main job's command"


def test_ci_scripts_are_valid_bash() -> None:
    assert os.access(REPO / ".ci" / "run", os.X_OK), ".ci/run must be executable"
    for script in (".ci/run", ".ci/setup.sh", ".ci/test.sh", ".ci/main-job.sh"):
        result = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


def test_readme_example_is_python() -> None:
    examples = [text for language, text in readme_blocks() if language == "python"]
    assert examples, "README.md has no python example"
    for text in examples:
        compile(text, "README.md", "exec")
