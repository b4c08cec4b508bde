"""A golden file's container, read as untrusted data: sizes checked before anything is decompressed.

A golden file is a ``.npz`` archive (a zip of ``.npy`` members) written on another machine.
Reading one with ``numpy.load`` would trust it: a 5 MB file can declare a 5 GB array, and
numpy allocates what the ``.npy`` header declares before reading a byte of data. This
module reads the archive in three checked stages, each failure a :class:`GoldenError`
naming the member and the limit:

1. **the zip directory**, before the zip is parsed: the file at most :data:`MAX_FILE_BYTES`,
   its end-of-central-directory record naming at most :data:`MAX_MEMBERS` members;
2. **each member's header**: an ``.npy`` name, no duplicate, a declared uncompressed size,
   all of them together at most :data:`MAX_TOTAL_BYTES`; then the ``.npy`` header itself
   (its first bytes, read through the decompressor): dtype, shape and order, which the
   caller checks against what the manifest declares (:func:`read_members` takes an
   ``expect`` callback), and a data size that matches the member's declared size;
3. **the data**, decompressed only then; zipfile stops at the declared size and checks the CRC.

**Checksum and signature.** The manifest carries a SHA-256 checksum over the manifest and
every array (:func:`checksum`). It detects accidents (a truncated download, bit rot, a file
edited without recomputing it), *not tampering*: anyone who edits a file can recompute
it. For provenance, set :data:`KEY_VARIABLE` (``PORTOPT_GOLDEN_KEY``, a secret of at least
:data:`MIN_KEY_LENGTH` characters shared by the recording and the checking machines):
``record`` then adds an HMAC-SHA256 signature of the checksum, and ``check`` *requires*
one and verifies it (missing, or made with another key: refused). Without the key a
signed file is read with its signature unverified (:attr:`Signature.state` says so).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np

MAX_FILE_BYTES = 4 << 30
"""A golden file's size on disk (the full case set records about 2.5 GiB)."""
MAX_TOTAL_BYTES = 4 << 30
"""All members together, uncompressed, as the zip directory declares them."""
MAX_MEMBERS = 1_000_000
"""Members of the archive (the full case set records about 75,000)."""
MAX_MANIFEST_BYTES = 16 << 20
"""The manifest (JSON), uncompressed."""
KEY_VARIABLE = "PORTOPT_GOLDEN_KEY"
"""The environment variable holding the HMAC key (module doc)."""
MIN_KEY_LENGTH = 16
SIGNATURE_ALGORITHM = "hmac-sha256"
_NPY_SUFFIX = ".npy"
_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"


class GoldenError(Exception):
    """A golden file that cannot be used: unreadable, too large, malformed, tampered with, or of another format."""


@dataclass(frozen=True)
class ArrayHeader:
    """What a member's ``.npy`` header declares."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    fortran_order: bool


ExpectFn = Callable[[str, ArrayHeader], None]
"""Checks one member's declared header against the manifest (raises :class:`GoldenError`)."""


def _member_count(f: BinaryIO, size: int) -> int:
    """The number of members the zip's end-of-central-directory record declares (ZIP64 too)."""
    tail_size = min(size, 22 + 65535)
    f.seek(size - tail_size)
    tail = f.read(tail_size)
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        raise zipfile.BadZipFile("no zip end-of-central-directory record")
    (entries,) = struct.unpack_from("<H", tail, at + 10)
    if entries != 0xFFFF:
        return int(entries)
    locator = at - 20
    if locator < 0 or tail[locator : locator + 4] != _ZIP64_LOCATOR:
        raise zipfile.BadZipFile("a ZIP64 archive without its end-of-central-directory locator")
    (record_offset,) = struct.unpack_from("<Q", tail, locator + 8)
    if record_offset + 56 > size:
        raise zipfile.BadZipFile("the ZIP64 end-of-central-directory record lies outside the file")
    f.seek(record_offset)
    record = f.read(56)
    if record[:4] != _ZIP64_EOCD:
        raise zipfile.BadZipFile("no ZIP64 end-of-central-directory record where its locator points")
    (entries64,) = struct.unpack_from("<Q", record, 32)
    return int(entries64)


def _header(stream: IO[bytes], name: str) -> tuple[ArrayHeader, int]:
    """The ``.npy`` header at the start of ``stream`` and its length in bytes."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=10_000)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=10_000)
        else:
            raise ValueError(f"unknown .npy format version {version}")
    except (ValueError, SyntaxError, TypeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise GoldenError(f"member {name!r}: not a readable .npy header ({exc})") from None
    header = ArrayHeader(np.dtype(dtype), tuple(int(n) for n in shape), bool(fortran))
    return header, stream.tell() if stream.seekable() else -1


def read_members(
    path: Path, expect: Callable[[Mapping[str, Any]], ExpectFn]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The manifest (parsed JSON) and every array of the golden file at ``path``, checked as the module says.

    ``expect(manifest)`` is called with the parsed manifest once it is read and returns the
    function that checks each array member's declared header (it raises for a member the
    manifest does not declare, or one of another dtype or shape).
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise GoldenError(f"golden file {path} does not exist") from None
    except OSError as exc:
        raise GoldenError(f"golden file {path} cannot be read ({exc})") from None
    if size > MAX_FILE_BYTES:
        raise GoldenError(f"golden file {path} has {size} bytes; at most {MAX_FILE_BYTES} (MAX_FILE_BYTES) are read")
    try:
        with path.open("rb") as f:
            members = _member_count(f, size)
            if members > MAX_MEMBERS:
                raise GoldenError(f"the archive declares {members} members; at most {MAX_MEMBERS} (MAX_MEMBERS)")
            f.seek(0)
            with zipfile.ZipFile(f) as archive:
                return _read_archive(archive, expect)
    except GoldenError as exc:
        raise GoldenError(f"golden file {path}: {exc}") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, NotImplementedError, struct.error) as exc:
        raise GoldenError(f"golden file {path} is not a readable .npz archive ({exc}); it is corrupted") from None


def _read_archive(
    archive: zipfile.ZipFile, expect: Callable[[Mapping[str, Any]], ExpectFn]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    infos = archive.infolist()
    names: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        if not info.filename.endswith(_NPY_SUFFIX) or info.is_dir():
            raise GoldenError(f"member {info.filename[:80]!r} is not an .npy array")
        name = info.filename[: -len(_NPY_SUFFIX)]
        if name in names:
            raise GoldenError(f"member {name[:80]!r} appears twice")
        names[name] = info
        total += info.file_size
    if total > MAX_TOTAL_BYTES:
        raise GoldenError(
            f"its members declare {total} bytes uncompressed; at most {MAX_TOTAL_BYTES} (MAX_TOTAL_BYTES) are read"
        )
    manifest_info = names.pop("manifest.json", None)
    if manifest_info is None:
        raise GoldenError("it has no manifest.json: not a portopt golden file")
    manifest = _manifest(archive, manifest_info)
    check = expect(manifest)
    headers = {}
    for name, info in names.items():
        with archive.open(info) as stream:
            header, length = _header(stream, name)
        check(name, header)
        if length >= 0 and length + _nbytes(header) != info.file_size:
            raise GoldenError(
                f"member {name!r}: its header declares {_nbytes(header)} bytes of data, the archive holds "
                f"{info.file_size - length}"
            )
        headers[name] = header
    arrays = {}
    for name, info in names.items():
        with archive.open(info) as stream:
            arrays[name] = np.lib.format.read_array(stream, allow_pickle=False)
    return manifest, arrays


def _nbytes(header: ArrayHeader) -> int:
    count = 1
    for n in header.shape:
        count *= n
    return count * header.dtype.itemsize


def _manifest(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> dict[str, Any]:
    if info.file_size > MAX_MANIFEST_BYTES:
        raise GoldenError(f"its manifest declares {info.file_size} bytes; at most {MAX_MANIFEST_BYTES}")
    with archive.open(info) as stream:
        header, _ = _header(stream, "manifest.json")
    if header.dtype != np.dtype(np.uint8) or len(header.shape) != 1:
        raise GoldenError(f"its manifest is a {header.dtype} array of shape {header.shape}, not bytes")
    with archive.open(info) as stream:
        raw = np.lib.format.read_array(stream, allow_pickle=False)
    try:
        manifest = json.loads(raw.tobytes().decode("utf-8"), parse_int=_bounded_int)
    except RecursionError:
        raise GoldenError("its manifest is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise GoldenError(f"its manifest is not valid JSON ({exc}); the file was modified") from None
    if not isinstance(manifest, dict):
        raise GoldenError(f"its manifest is a JSON {type(manifest).__name__}, not an object")
    return manifest


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 20:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def checksum(manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the manifest (without its checksum and signature) and every array: accidents, not tampering."""
    digest = hashlib.sha256()
    body = {k: v for k, v in manifest.items() if k not in ("checksum", "signature")}
    digest.update(json.dumps(body, sort_keys=True).encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def signing_key() -> bytes | None:
    """The HMAC key from :data:`KEY_VARIABLE`, or ``None`` when it is unset; too short a key is refused."""
    text = os.environ.get(KEY_VARIABLE)
    if text is None or text == "":
        return None
    if len(text) < MIN_KEY_LENGTH:
        raise GoldenError(f"{KEY_VARIABLE} holds {len(text)} characters; a signing key needs at least {MIN_KEY_LENGTH}")
    return text.encode("utf-8")


def sign(digest: str, key: bytes) -> dict[str, str]:
    """The manifest's ``signature`` entry: HMAC-SHA256 of the checksum ``digest`` under ``key``."""
    return {"algorithm": SIGNATURE_ALGORITHM, "value": hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()}


@dataclass(frozen=True)
class Signature:
    """What the check of a file's signature found: ``"verified"``, ``"unsigned"`` or ``"unverified"``
    (signed, but :data:`KEY_VARIABLE` is not set here)."""

    state: str


def verify_signature(manifest: Mapping[str, Any], digest: str) -> Signature:
    """Check the manifest's signature of ``digest`` (module doc); :class:`GoldenError` when it must fail."""
    key = signing_key()
    signature = manifest.get("signature")
    if signature is None:
        if key is not None:
            raise GoldenError(
                f"it is not signed, but {KEY_VARIABLE} is set, so a signature is required; record it again "
                f"with {KEY_VARIABLE} set, or unset {KEY_VARIABLE} to accept unsigned files"
            )
        return Signature("unsigned")
    if (
        not isinstance(signature, dict)
        or set(signature) != {"algorithm", "value"}
        or signature["algorithm"] != SIGNATURE_ALGORITHM
        or not isinstance(signature["value"], str)
    ):
        raise GoldenError(f"manifest field 'signature' must be {{'algorithm': {SIGNATURE_ALGORITHM!r}, 'value': hex}}")
    if key is None:
        return Signature("unverified")
    expected = sign(digest, key)["value"]
    if not hmac.compare_digest(expected, signature["value"]):
        raise GoldenError(
            f"its HMAC signature does not match: the file was modified after it was signed, or signed with "
            f"another key than {KEY_VARIABLE} holds here"
        )
    return Signature("verified")
