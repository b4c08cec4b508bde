"""``portopt doctor``: every device and backend here, vendor kernels and why not; exit 0 whatever it finds.

Also the promise that a broken torch_npu breaks nothing else: with a ``torch_npu`` on the path
that raises on import, ``import portopt`` works and both ``portopt doctor`` and
``portopt.backends.available()`` give the reason; with a torch_npu whose ``torch.backends``
entry point makes ``import torch`` itself fail (torch_npu without CANN), ``import portopt``
and ``portopt doctor`` still work and say how to get around it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from portopt import doctor
from portopt.cli import main as portopt_main


def run_doctor(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "400")
    assert portopt_main(["doctor"]) == 0
    return capsys.readouterr().out


def test_doctor_reports_versions_cpu_devices_backends_and_kernels(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = run_doctor(capsys, monkeypatch)
    assert torch.__version__ in out
    for section in ("versions", "CPU", "devices", "backends", "vendor kernels"):
        assert section in out
    for backend in ("torch", "torch_fused", "npu", "npu-contract", "reference", "compiled"):
        assert f" {backend} " in out
    assert "instruction sets" in out
    if not torch.cuda.is_available():
        assert "no cuda device" in out
    assert "_fused_adamw_" in out
    assert "npu_apply_adam_w" in out
    assert "portopt.backends.npu_emulation (emulation of torch_npu" in out
    assert "(emulated" in out  # the npu-contract rows: on CPU, the emulated SoC
    assert "Ascend950PR" in out


def test_isa_flags_come_from_cpuinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "_cpuinfo", lambda: {"model name": "Test CPU", "flags": "fpu sse4_2 avx2 fma"})
    facts = dict(doctor.cpu_facts())
    assert facts["model"] == "Test CPU"
    assert facts["instruction sets"] == "SSE4.2, AVX2, FMA"


def test_cann_version_is_read_from_the_toolkit_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arch = tmp_path / "x86_64-linux"
    arch.mkdir()
    (arch / "ascend_toolkit_install.info").write_text("package_name=Ascend-cann-toolkit\nversion=8.1.RC1\n")
    monkeypatch.setenv("ASCEND_HOME_PATH", str(tmp_path))
    assert doctor.cann_version(torch_ok=False).startswith("8.1.RC1 (")
    monkeypatch.setenv("ASCEND_HOME_PATH", str(tmp_path / "absent"))
    monkeypatch.setattr(doctor, "CANN_ROOTS", ())
    assert doctor.cann_version(torch_ok=False).startswith("not found")


def _run(code: list[str], path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(path), "COLUMNS": "400", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, *code], capture_output=True, text=True, encoding="utf-8", env=env, timeout=300, check=False
    )


def test_a_broken_torch_npu_breaks_nothing_else(tmp_path: Path) -> None:
    package = tmp_path / "torch_npu"
    package.mkdir()
    (package / "__init__.py").write_text('raise OSError("libhccl.so: cannot open shared object file")\n')
    check = textwrap.dedent(
        """
        import portopt
        from portopt.backends import available, select_backend
        from portopt.cli import main
        rows = {r.name: r for r in available()}
        print("npu:", rows["npu"].usable, rows["npu"].reason)
        print("cpu:", select_backend("cpu").name)
        raise SystemExit(main(["doctor"]))
        """
    )
    done = _run(["-c", check], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "npu: False package torch_npu failed to import: OSError: libhccl.so" in done.stdout
    assert "cpu: " in done.stdout
    doctor_output = done.stdout.split("cpu: ", 1)[1]
    assert "unusable: package torch_npu failed to import: OSError: libhccl.so" in doctor_output


def test_a_broken_torch_npu_in_this_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from portopt import backends

    package = tmp_path / "torch_npu"
    package.mkdir()
    (package / "__init__.py").write_text('raise ImportError("libascendcl.so: cannot open shared object file")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(backends, "_import_failures", {})
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    rows = {r.name: r for r in backends.available()}
    assert (
        rows["npu"].reason
        == "package torch_npu failed to import: ImportError: libascendcl.so: cannot open shared object file"
    )
    assert rows["npu-contract"].usable
    assert backends.select_backend("cpu").name in rows
    out = run_doctor(capsys, monkeypatch)
    assert "failed to import: ImportError: libascendcl.so" in out


def test_doctor_survives_a_torch_that_does_not_import(tmp_path: Path) -> None:
    """torch_npu's torch.backends entry point, failing, makes `import torch` fail: portopt still answers."""
    package = tmp_path / "torch_npu"
    package.mkdir()
    (package / "__init__.py").write_text('def _autoload():\n    raise OSError("libhccl.so: cannot open")\n')
    info = tmp_path / "torch_npu-2.13.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.13.0\n")
    (info / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    done = _run(["-c", "import torch"], tmp_path)
    assert done.returncode != 0, "the fake entry point must break `import torch`, as a torch_npu without CANN does"
    done = _run(["-c", "import portopt; print(portopt.__version__)"], tmp_path)
    assert done.returncode == 0, done.stderr
    done = _run(["-m", "portopt", "doctor"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in done.stdout
    assert "torch_npu = torch_npu:_autoload" in done.stdout
