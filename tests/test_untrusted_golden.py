"""Golden files are untrusted data: sizes checked before decompression, every field validated, tampering signed.

Truth: hand-built archives whose zip directory or ``.npy`` header declares 5 GB (refused before a
byte is decompressed, with the peak memory of a fresh process measured), manifests with one bad
field each (a :class:`GoldenError` naming that field), and a file whose array was edited and whose
SHA-256 was recomputed (caught only by the HMAC signature, as the docs say).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from portopt.conformance import golden
from portopt.conformance.cases import build_cases
from portopt.conformance.cli import main
from portopt.conformance.golden import GoldenError, load
from portopt.conformance.golden_archive import KEY_VARIABLE, MAX_TOTAL_BYTES, checksum, sign
from portopt.conformance.golden_manifest import MAX_NUMEL, MAX_STEPS

KEY = "a shared secret of enough length"
FIVE_GB = 5 * 10**9


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SGD with momentum (one state), the quick problem, 8 steps: recorded unsigned."""
    os.environ.pop(KEY_VARIABLE, None)
    path = tmp_path_factory.mktemp("golden") / "sgd.npz"
    return golden.record([build_cases(["sgd"])[1]], path)


def read_arrays(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:  # our own file: trusted here
        arrays = {name: np.array(data[name]) for name in data.files}
    manifest = json.loads(arrays.pop("manifest.json").tobytes().decode())
    return manifest, arrays


def write(
    path: Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray], *, rehash: bool = True, key: str | None = None
) -> Path:
    """Write a golden file; ``rehash`` recomputes the SHA-256 (as anyone editing a file can), ``key`` re-signs."""
    if rehash:
        manifest["checksum"] = checksum(manifest, arrays)
    if key is not None:
        manifest["signature"] = sign(manifest["checksum"], key.encode())
    blob = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{"manifest.json": blob, **arrays})  # type: ignore[arg-type]
    path.write_bytes(buffer.getvalue())
    return path


def set_field(manifest: dict[str, Any], path: str, value: Any) -> None:
    """``path`` like ``cases.0.problem.tensors.1.shape``; a missing last key is added."""
    keys: list[Any] = [int(k) if k.isdigit() else k for k in path.split(".")]
    target: Any = manifest
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value


MALFORMED: dict[str, tuple[str, Any, str]] = {
    # label: (path, bad value, the field the message must name)
    "format": ("format", "portopt.other", "format"),
    "version": ("version", 2, "version 2"),
    "unknown top-level field": ("extra", 1, "'extra'"),
    "machine": ("machine", 5, "'machine'"),
    "checksum": ("checksum", "abc", "'checksum'"),
    "no cases": ("cases", [], "'cases'"),
    "cases not a list": ("cases", {"0": 1}, "'cases'"),
    "case not an object": ("cases.0", 7, "'cases[0]'"),
    "unknown case field": ("cases.0.extra", 1, "'cases[0]'"),
    "steps 10**9": ("cases.0.steps", 10**9, "'cases[0].steps'"),
    "steps negative": ("cases.0.steps", -1, "'cases[0].steps'"),
    "steps a string": ("cases.0.steps", "8", "'cases[0].steps'"),
    "steps a boolean": ("cases.0.steps", True, "'cases[0].steps'"),
    "algorithm": ("cases.0.algorithm", "nonesuch", "'cases[0].algorithm'"),
    "name": ("cases.0.name", 5, "'cases[0].name'"),
    "name with a newline": ("cases.0.name", "a\u2028b", "'cases[0].name'"),
    "maximize": ("cases.0.maximize", "yes", "'cases[0].maximize'"),
    "options": ("cases.0.options", [[1, 2]], "'cases[0].options[0][0]'"),
    "option value": ("cases.0.options", [["momentum", [1]]], "'cases[0].options[0][1]'"),
    "hypers": ("cases.0.hypers", [["lr", "x"]], "'cases[0].hypers[0][1]'"),
    "problem": ("cases.0.problem", [], "'cases[0].problem'"),
    "negative size": ("cases.0.problem.tensors.1.shape", [-1], "'cases[0].problem.tensors[1].shape[0]'"),
    "huge size": ("cases.0.problem.tensors.1.shape", [625_000_000], "'cases[0].problem.tensors[1].shape"),
    "rank 9": ("cases.0.problem.tensors.1.shape", [1] * 9, "'cases[0].problem.tensors[1].shape'"),
    "shape a string": ("cases.0.problem.tensors.1.shape", "1", "'cases[0].problem.tensors[1].shape'"),
    "group": ("cases.0.problem.tensors.1.group", 999, "'cases[0].problem.tensors[1].group'"),
    "layout": ("cases.0.problem.tensors.1.layout", "diagonal", "'cases[0].problem.tensors[1].layout'"),
    "regime": ("cases.0.problem.tensors.1.regime", None, "'cases[0].problem.tensors[1].regime'"),
    "grads": ("cases.0.problem.tensors.1.grads", "sometimes", "'cases[0].problem.tensors[1].grads'"),
    "zero_at": ("cases.0.problem.tensors.1.zero_at", [0], "'cases[0].problem.tensors[1].zero_at[0]'"),
    "param_scale": ("cases.0.problem.tensors.1.param_scale", float("inf"), "tensors[1].param_scale'"),
    "group_hypers count": ("cases.0.group_hypers", [], "'cases[0].group_hypers'"),
    "group_hypers value": ("cases.0.group_hypers.0.lr", "x", "'cases[0].group_hypers[0].lr'"),
    "group_hypers missing": ("cases.0.group_hypers.0", {}, "'cases[0].group_hypers[0]'"),
    "group_hypers out of range": ("cases.0.group_hypers.0.lr", -1.0, "'cases[0].group_hypers[0]'"),
    "spec_json not a spec": ("cases.0.spec_json", "{}", "'cases[0].spec_json'"),
    "spec_json not a string": ("cases.0.spec_json", {}, "'cases[0].spec_json'"),
    "step_counters count": ("cases.0.step_counters", [], "'cases[0].step_counters'"),
    "step_counters value": ("cases.0.step_counters.0", [-1] * 8, "'cases[0].step_counters[0]"),
    "signature": ("signature", "forged", "'signature'"),
}


@pytest.mark.parametrize("label", sorted(MALFORMED))
def test_every_malformed_manifest_field_is_a_golden_error_naming_it(recorded: Path, tmp_path: Path, label: str) -> None:
    field, value, named = MALFORMED[label]
    manifest, arrays = read_arrays(recorded)
    set_field(manifest, field, value)
    bad = write(tmp_path / "bad.npz", manifest, arrays, rehash=field != "checksum")
    with pytest.raises(GoldenError) as info:
        load(bad)
    assert named in str(info.value), str(info.value)
    assert str(bad) in str(info.value)


def test_steps_beyond_the_limit_are_refused_at_once(recorded: Path, tmp_path: Path) -> None:
    manifest, arrays = read_arrays(recorded)
    manifest["cases"][0]["steps"] = 10**9
    with pytest.raises(GoldenError, match=rf"'cases\[0\].steps': must be an integer from 1 to {MAX_STEPS}"):
        load(write(tmp_path / "steps.npz", manifest, arrays))


def test_an_array_the_manifest_does_not_declare_is_refused(recorded: Path, tmp_path: Path) -> None:
    manifest, arrays = read_arrays(recorded)
    for extra, why in (
        ("c0/traj/1/4/not_a_state", "no state 'not_a_state'"),
        ("c0/grad/99/4", "no such array"),
        ("c1/init/0", "the manifest has 1 cases"),
        ("payload", "not a golden array"),
    ):
        bad = dict(arrays)
        bad[extra] = np.zeros(3)
        with pytest.raises(GoldenError, match=why):
            load(write(tmp_path / "extra.npz", manifest, bad))
    bad = dict(arrays)
    bad["c0/init/4"] = arrays["c0/init/4"].astype(np.float32)
    with pytest.raises(GoldenError, match="declares a float32 array"):
        load(write(tmp_path / "dtype.npz", manifest, bad))


# declared sizes: refused before decompression --------------------------------------------------------------------------
def zip_declaring(path: Path, name: str, declared: int) -> Path:
    """A one-member zip whose directory declares ``declared`` bytes uncompressed (ZIP64) for a few real bytes."""
    data = zlib.compress(b"\0" * 1024)[2:-4]  # raw deflate
    crc, raw_name = zlib.crc32(b"\0" * 1024), name.encode()
    zip64 = struct.pack("<HHQQ", 1, 16, declared, len(data))
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 8, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(raw_name), 20)
    central_extra = struct.pack("<HHQQQ", 1, 24, declared, len(data), 0)
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 8, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(raw_name), 28, 0, 0, 0,
        0, 0xFFFFFFFF,
    )  # fmt: skip
    body = local + raw_name + zip64 + data
    directory = central + raw_name + central_extra
    offset = len(body)
    eocd64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, 1, 1, len(directory), offset)
    locator = struct.pack("<IIQI", 0x07064B50, 0, offset + len(directory), 1)
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(body + directory + eocd64 + locator + eocd)
    with zipfile.ZipFile(path) as check:  # a well-formed zip, as zipfile reads it
        assert check.infolist()[0].file_size == declared
    return path


def npy_declaring(shape: tuple[int, ...]) -> bytes:
    """An .npy member whose header declares ``shape`` (float64) but holds 16 bytes of data."""
    out = io.BytesIO()
    np.lib.format.write_array_header_2_0(out, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return out.getvalue() + b"\0" * 16


def _peak_memory_of_load(path: Path) -> tuple[str, int]:
    """Load ``path`` in a fresh process: the error and how much the peak resident memory grew (bytes)."""
    code = f"""
        import resource
        from portopt.conformance.golden import GoldenError, load
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load({str(path)!r})
            print("LOADED")
        except GoldenError as exc:
            print(exc)
        print(1024 * (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before))
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    message, grown = done.stdout.strip().rsplit("\n", 1)
    return message, int(grown)


def test_a_zip_directory_declaring_5_gb_is_refused_before_decompression(tmp_path: Path) -> None:
    bomb = zip_declaring(tmp_path / "bomb.npz", "c0/init/0.npy", FIVE_GB)
    assert bomb.stat().st_size < 2000
    message, grown = _peak_memory_of_load(bomb)
    assert f"declare {FIVE_GB} bytes uncompressed; at most {MAX_TOTAL_BYTES}" in message
    assert grown < 50 << 20  # measured: under 1 MB


def test_an_npy_header_declaring_5_gb_is_refused_before_numpy_allocates(recorded: Path, tmp_path: Path) -> None:
    """numpy allocates what an .npy header declares before reading its data: 5 GB from a 5 MB file."""
    with zipfile.ZipFile(recorded) as source, zipfile.ZipFile(tmp_path / "header.npz", "w") as target:
        for info in source.infolist():
            body = source.read(info)
            if info.filename == "c0/init/4.npy":
                body = npy_declaring((FIVE_GB // 8,))
            target.writestr(info.filename, body, compress_type=zipfile.ZIP_DEFLATED)
    message, grown = _peak_memory_of_load(tmp_path / "header.npz")
    assert "member 'c0/init/4': declares a float64 array of shape (625000000,)" in message
    assert grown < 50 << 20
    manifest, arrays = read_arrays(recorded)
    manifest["cases"][0]["problem"]["tensors"][4]["shape"] = [FIVE_GB // 8]  # the manifest agrees: still refused
    with pytest.raises(GoldenError, match=rf"shape\[0\]': must be an integer from 0 to {MAX_NUMEL}, got 625000000"):
        load(write(tmp_path / "declared.npz", manifest, arrays))


def test_an_npy_header_that_disagrees_with_its_zip_size_is_refused(recorded: Path, tmp_path: Path) -> None:
    _, arrays = read_arrays(recorded)
    shape = arrays["c0/init/4"].shape
    with zipfile.ZipFile(recorded) as source, zipfile.ZipFile(tmp_path / "short.npz", "w") as target:
        for info in source.infolist():
            body = source.read(info) if info.filename != "c0/init/4.npy" else npy_declaring(shape)
            target.writestr(info.filename, body)
    with pytest.raises(GoldenError, match=r"its header declares \d+ bytes of data, the archive holds 16"):
        load(tmp_path / "short.npz")


def test_junk_and_foreign_archives_are_golden_errors(tmp_path: Path) -> None:
    cases: dict[str, tuple[Callable[[Path], object], str]] = {
        "empty": (lambda p: p.write_bytes(b""), "not a readable .npz archive"),
        "text": (lambda p: p.write_text("hello"), "not a readable .npz archive"),
        "truncated": (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(40)), "not a readable .npz archive"),
        "not npy": (lambda p: zipfile.ZipFile(p, "w").writestr("run.py", "print(1)"), "is not an .npy array"),
        "no manifest": (lambda p: np.savez(p, x=np.zeros(3)), "no manifest.json"),
        "object array": (
            lambda p: np.savez(p, **{"manifest.json": np.array([{"a": 1}], dtype=object)}),  # type: ignore[arg-type]
            "not readable|not bytes|object",
        ),
    }
    for label, (make, why) in cases.items():
        path = tmp_path / f"{label.replace(' ', '_')}.npz"
        make(path)
        with pytest.raises(GoldenError, match=why):
            load(path)


# checksum and signature ------------------------------------------------------------------------------------------------
def _tamper(path: Path, target: Path, *, key: str | None = None) -> Path:
    """Edit one trajectory value and recompute the SHA-256, as an attacker can; re-sign with ``key``."""
    manifest, arrays = read_arrays(path)
    arrays["c0/traj/3/4/param"][5] += 1e-3
    return write(target, manifest, arrays, key=key)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("signed") / "sgd.npz"
    os.environ[KEY_VARIABLE] = KEY
    try:
        return golden.record([build_cases(["sgd"])[1]], path)
    finally:
        del os.environ[KEY_VARIABLE]


def test_the_sha256_detects_accidents_not_tampering(recorded: Path, tmp_path: Path) -> None:
    manifest, arrays = read_arrays(recorded)
    arrays["c0/traj/3/4/param"][5] += 1e-3
    with pytest.raises(GoldenError, match="SHA-256 checksum mismatch"):
        load(write(tmp_path / "accident.npz", manifest, arrays, rehash=False))
    tampered = load(_tamper(recorded, tmp_path / "tampered.npz"))  # recomputed: the checksum cannot tell
    assert tampered.signature.state == "unsigned"


def test_a_signed_file_verifies_and_tampering_is_caught_with_the_key(
    signed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    assert load(signed).signature.state == "verified"
    tampered = _tamper(signed, tmp_path / "tampered.npz")
    with pytest.raises(GoldenError, match="HMAC signature does not match: the file was modified after it was signed"):
        load(tampered)
    forged = _tamper(signed, tmp_path / "forged.npz", key="another key of enough length")
    with pytest.raises(GoldenError, match="HMAC signature does not match"):
        load(forged)
    monkeypatch.delenv(KEY_VARIABLE)
    assert load(tampered).signature.state == "unverified"  # without the key, nothing can be verified


def test_with_a_key_set_an_unsigned_file_is_refused(recorded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    with pytest.raises(GoldenError, match=f"it is not signed, but {KEY_VARIABLE} is set, so a signature is required"):
        load(recorded)
    monkeypatch.setenv(KEY_VARIABLE, "short")
    with pytest.raises(GoldenError, match="a signing key needs at least 16"):
        load(recorded)


def test_checking_a_tampered_signed_file_exits_1_with_the_reason(
    signed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    tampered = _tamper(signed, tmp_path / "tampered.npz")
    assert main(["check", "--golden", str(tampered), "--backend", "reference", "--precision", "fp32"]) == 1
    assert "HMAC signature does not match" in capsys.readouterr().err


# specs inside golden files -----------------------------------------------------------------------------------------------
def test_specs_inside_golden_files_go_through_the_spec_loader(recorded: Path, tmp_path: Path) -> None:
    manifest, arrays = read_arrays(recorded)
    spec = json.loads(manifest["cases"][0]["spec_json"])
    spec["title"] = '"""\n__import__("builtins").PORTOPT_GOLDEN_PAYLOAD = 1\n"""'
    manifest["cases"][0]["spec_json"] = json.dumps(spec)
    with pytest.raises(GoldenError, match=r"'cases\[0\].spec_json': spec JSON: top level title: character U\+000A"):
        load(write(tmp_path / "payload.npz", manifest, arrays))


def test_a_quoted_title_in_a_golden_file_is_inert(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, arrays = read_arrays(recorded)
    spec = json.loads(manifest["cases"][0]["spec_json"])
    spec["title"] = '"""; __import__("builtins").PORTOPT_GOLDEN_PAYLOAD = 1; """'
    manifest["cases"][0]["spec_json"] = json.dumps(spec)
    path = write(tmp_path / "quoted.npz", manifest, arrays)
    argv = ["check", "--golden", str(path), "--backend", "torch", "--precision", "fp32"]
    assert main([*argv, "--report-dir", str(tmp_path)]) == 0, capsys.readouterr()
    assert not hasattr(builtins, "PORTOPT_GOLDEN_PAYLOAD")
