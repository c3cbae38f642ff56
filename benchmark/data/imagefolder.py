"""Image-folder trees (``<root>/<class>/<image>``) from a folder or an archive.

Archives (``.tar``, ``.tar.gz``, ``.tar.xz``, ``.tgz``, ``.zip``) are extracted
safely: every member name is checked first, and one that is absolute, climbs
out with ``..``, or is a link, device or other special file refuses the whole
archive. An archive is read in one pass in memory (nothing extracted to disk); images
are decoded once and the decoded tensors are cached (beside the data when that folder
is writable, otherwise in the suite's cache folder).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
import warnings
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from benchmark.errors import DataError
from benchmark.io import atomic_write
from benchmark.paths import REPO_ROOT, cache_dir, writable_dir

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".zip")
CACHE_VERSION = "1"


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _check_member_name(archive: Path, name: str) -> None:
    norm = posixpath.normpath(name.replace("\\", "/"))
    if (
        name.startswith(("/", "\\"))
        or (len(name) > 1 and name[1] == ":")
        or norm == ".."
        or norm.startswith("../")
    ):
        raise DataError(f"archive {archive}: member {name!r} would write outside the extraction folder; refused")


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract ``archive`` into ``dest``; refuse it whole if any member could escape ``dest``."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DataError(f"archive {archive} does not exist (expected a .tar/.tar.xz/.zip of an image folder)")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                for info in members:
                    _check_member_name(archive, info.filename)
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise DataError(f"archive {archive}: member {info.filename!r} is a symbolic link; refused")
                for info in members:
                    zf.extract(info, dest)
        else:
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for m in members:
                    _check_member_name(archive, m.name)
                    if not (m.isfile() or m.isdir()):
                        raise DataError(
                            f"archive {archive}: member {m.name!r} is a link or special file; refused"
                        )
                try:
                    tf.extractall(dest, members=members, filter="data")
                except TypeError:  # Python without extraction filters: names were checked above
                    tf.extractall(dest, members=members)
    except DataError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise DataError(f"archive {archive} is corrupt or truncated: {type(exc).__name__}: {exc}") from None
    return dest


def _decode_folder(root: Path, where: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    if not root.is_dir():
        raise DataError(f"{where}: folder {root} not found (expected {root}/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[str, int, object]] = []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append((str(f.relative_to(root)), label, f))
    if not files:
        raise DataError(f"{where}: no images found in {root} (expected {root}/<class>/<image>)")
    return _decode_images(files, where) + (classes,)


def _archive_members(archive: Path):
    """Yield ``(name, is_dir, read)`` for every member of ``archive`` in one sequential pass (a
    compressed tar is read once, never sought back), refusing names that would escape an
    extraction folder and links or special files, as :func:`safe_extract` does."""
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_member_name(archive, info.filename)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise DataError(f"archive {archive}: member {info.filename!r} is a symbolic link; refused")
                yield info.filename, info.is_dir(), lambda info=info: zf.read(info)
        return
    with tarfile.open(archive) as tf:
        for m in tf:
            _check_member_name(archive, m.name)
            if not (m.isfile() or m.isdir()):
                raise DataError(f"archive {archive}: member {m.name!r} is a link or special file; refused")
            yield m.name, m.isdir(), lambda m=m: tf.extractfile(m).read()


def _decode_archive(archive: Path, subdir: str | None, where: str
                    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Like :func:`_decode_folder` on the archive's extracted tree (same classes, order and
    errors), read from the archive in memory: nothing is written to disk."""
    prefix = PurePosixPath(subdir) if subdir else PurePosixPath()
    class_dirs: set[str] = set()
    found: dict[PurePosixPath, bytes] = {}
    try:
        for name, is_dir, read in _archive_members(archive):
            path = PurePosixPath(posixpath.normpath(name.replace("\\", "/")))
            if prefix.parts and path.parts[:len(prefix.parts)] != prefix.parts:
                continue
            rel = path.parts[len(prefix.parts):]
            if not rel or rel[0].startswith("."):
                continue
            if is_dir or len(rel) > 1:
                class_dirs.add(rel[0])
            if not is_dir and len(rel) > 1 and path.suffix.lower() in IMAGE_SUFFIXES:
                found[PurePosixPath(*rel)] = read()
    except DataError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise DataError(f"archive {archive} is corrupt or truncated: {type(exc).__name__}: {exc}") from None
    classes = sorted(class_dirs)
    label = {cls: i for i, cls in enumerate(classes)}
    files = [(str(rel), label[rel.parts[0]], data) for rel, data in
             sorted(found.items(), key=lambda kv: (label[kv[0].parts[0]], kv[0]))]
    if not files:
        root = archive.name + (f"/{subdir}" if subdir else "")
        raise DataError(f"{where}: no images found in {root} (expected {root}/<class>/<image>)")
    return _decode_images(files, where) + (classes,)


def _decode_images(files: list[tuple[str, int, object]], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``(name, label, path or bytes)`` entries, all of one size, into uint8 ``(N,C,H,W)`` and labels."""
    from PIL import Image, UnidentifiedImageError

    arrays, labels = [], []
    size = mode = None
    for name, label, source in files:
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                img.load()
                if mode is None:
                    mode = "L" if img.mode in ("L", "1", "I;16", "I", "F") else "RGB"
                    size = img.size
                if img.size != size:
                    raise DataError(
                        f"{where}: image {name} is {img.size[0]}x{img.size[1]}, "
                        f"but the first image is {size[0]}x{size[1]}; all images must have one size"
                    )
                arr = np.asarray(img.convert(mode), dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{where}: {name} is not a readable image ({exc})") from None
        arrays.append(arr if arr.ndim == 3 else arr[:, :, None])
        labels.append(label)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(labels, dtype=torch.int64)


def _cache_path(source: Path, subdir: str | None) -> Path:
    st = source.stat()
    key = json.dumps([str(source.resolve()), st.st_size, st.st_mtime_ns, subdir, CACHE_VERSION])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = source.name + (f".{subdir}" if subdir else "")
    name = f".{stem}.decoded-{digest}.safetensors"
    beside = source.parent
    # Beside the source when it may write there, but never inside the repository (its ignored
    # folders, e.g. .gpu/data, travel to other machines: a 185 MB cache there would go with them).
    in_repo = beside.resolve().is_relative_to(REPO_ROOT)
    return beside / name if writable_dir(beside) and not in_repo else cache_dir() / "decoded" / name


def _load_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
        classes = json.loads(meta["classes"])
        if images.dtype != torch.uint8 or images.shape[0] != labels.shape[0]:
            raise ValueError("inconsistent tensors")
        return images, labels, classes
    except Exception as exc:  # a damaged cache is rebuilt, never trusted
        warnings.warn(f"decoded-image cache {path} is unreadable ({exc}); decoding again", stacklevel=3)
        return None


def read_image_folder(
    source: str | Path, subdir: str | None = None, *, use_cache: bool = True
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode an image folder (or an archive of one) into uint8 ``(N,C,H,W)``, int64 labels, classes.

    ``subdir`` selects a folder inside the tree (e.g. ``"train"`` for an archive whose
    members are ``train/<class>/<image>``).
    """
    from safetensors.torch import save_file

    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"image folder {source} does not exist (expected a folder or a .tar/.tar.xz/.zip archive)")
    cache = _cache_path(source, subdir) if use_cache else None
    if cache is not None and cache.is_file():
        cached = _load_cache(cache)
        if cached is not None:
            return cached
    if source.is_dir():
        root = source / subdir if subdir else source
        images, labels, classes = _decode_folder(root, f"image folder {source}")
    elif is_archive(source):
        images, labels, classes = _decode_archive(source, subdir, f"archive {source}")
    else:
        raise DataError(
            f"image folder {source} is neither a folder nor an archive ({', '.join(ARCHIVE_SUFFIXES)})"
        )
    if cache is not None:
        try:
            meta = {"classes": json.dumps(classes), "source": str(source), "subdir": subdir or ""}
            atomic_write(cache, lambda tmp: save_file({"images": images, "labels": labels}, str(tmp), metadata=meta))
        except OSError as exc:
            warnings.warn(f"could not write decoded-image cache {cache}: {exc}", stacklevel=2)
    return images, labels, classes
