"""Shared helpers for reading dataset files: folders and tar archives, option checks, pixel scaling.

Numpy and the standard library only. Each format module (`idx`, `npz`, `cifar10`, `yale`) builds on these.
"""

from __future__ import annotations

import lzma
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robmia_db.errors import DatasetError

_UINT8_SCALE = np.float32(255.0)
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_options(dataset: str, options: dict[str, Any], allowed: Iterable[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        allowed_text = ", ".join(sorted(allowed)) or "none"
        raise DatasetError(
            f"dataset {dataset!r}: unknown option(s) {', '.join(unknown)} (allowed: {allowed_text})"
        )


def natural_key(text: str) -> list[Any]:
    """Sort key that orders `img2` before `img10`, so numbered files keep their numeric order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def is_tar_name(path: Path) -> bool:
    return path.name.lower().endswith(_TAR_SUFFIXES)


def scale_uint8_into(dst: np.ndarray, src: np.ndarray) -> None:
    """Write src/255 into the float32 array dst without an intermediate float copy of src."""
    np.divide(src, _UINT8_SCALE, out=dst, casting="unsafe")


def require_dir(path: Path, dataset: str, expected: str) -> None:
    if not path.exists():
        raise DatasetError(f"{path}: does not exist; dataset {dataset!r} expects {expected}")


def read_file_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({one_line(exc)})") from exc


@dataclass
class Members:
    """Files (name -> bytes) and folder names read from a folder tree or a tar archive, names '/'-separated."""

    files: dict[str, bytes]
    dirs: set[str]


def read_tree(path: Path, wanted: Callable[[str], bool]) -> Members:
    """Read every file whose relative name satisfies `wanted`, from a folder or (in one pass) a tar archive.

    Tar members are read in archive order because compressed archives cannot seek backwards cheaply.
    """
    files: dict[str, bytes] = {}
    dirs: set[str] = set()
    if path.is_dir():
        for item in sorted(path.rglob("*")):
            rel = item.relative_to(path).as_posix()
            if item.is_dir():
                dirs.add(rel)
            elif wanted(rel):
                files[rel] = read_file_bytes(item)
        return Members(files, dirs)
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                name = member.name.removeprefix("./")
                if member.isdir():
                    dirs.add(name.rstrip("/"))
                    continue
                parent = name.rsplit("/", 1)[0] if "/" in name else ""
                while parent:
                    dirs.add(parent)
                    parent = parent.rsplit("/", 1)[0] if "/" in parent else ""
                if member.isfile() and wanted(name):
                    handle = archive.extractfile(member)
                    if handle is None:
                        raise DatasetError(f"{path}: cannot read tar member {name}")
                    files[name] = handle.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise DatasetError(
            f"{path}: cannot read tar archive ({one_line(exc)}); expected a .tar, .tar.gz or .tar.xz file"
        ) from exc
    return Members(files, dirs)


def list_tree(path: Path) -> list[str]:
    """Relative names ('/'-separated) of every file in a folder tree or a tar archive, without reading them."""
    if path.is_dir():
        return sorted(item.relative_to(path).as_posix() for item in path.rglob("*") if item.is_file())
    try:
        with tarfile.open(path, "r:*") as archive:
            return sorted(m.name.removeprefix("./") for m in archive if m.isfile())
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise DatasetError(
            f"{path}: cannot read tar archive ({one_line(exc)}); expected a .tar, .tar.gz or .tar.xz file"
        ) from exc


def peek_tar_names(path: Path, limit: int = 64) -> list[str]:
    """The first member names of a tar archive, read without decompressing the rest."""
    names: list[str] = []
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                names.append(member.name)
                if len(names) >= limit:
                    break
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise DatasetError(
            f"{path}: cannot read tar archive ({one_line(exc)}); expected a .tar, .tar.gz or .tar.xz file"
        ) from exc
    return names


def tars_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_tar_name(p))
