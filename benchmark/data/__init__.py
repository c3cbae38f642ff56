"""Datasets as uint8 image tensors that can live on the GPU.

Every dataset is a registered loader ``loader(split, root, download, **options)``
returning an :class:`ImageData`; :func:`load_dataset` is the one entry point.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from benchmark.errors import BenchError, DataError
from benchmark.registry import DATASETS

SPLITS = ("train", "test")


@dataclass
class ImageData:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64, plus what a table must say."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str
    split: str
    copy: str  # which copy of the data this is, printed under every table
    mean: tuple[float, ...]
    std: tuple[float, ...]
    indices: torch.Tensor | None = None  # positions in the full split, if a subset
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_tensors(self.images, self.labels, len(self.classes), f"{self.name}/{self.split}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> ImageData:
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def subset(self, n: int | None, seed: int = 0) -> ImageData:
        """A deterministic random subset of ``n`` examples (same ``n`` and seed, same subset)."""
        if n is None or n == len(self):
            return self
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise DataError(f"{self.name}/{self.split}: n must be a positive integer, got {n!r}")
        if n > len(self):
            raise DataError(
                f"{self.name}/{self.split}: n={n} is larger than the split ({len(self)} examples)"
            )
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(self), generator=gen)[:n].sort().values
        base = self.indices if self.indices is not None else torch.arange(len(self))
        dev = self.images.device
        return replace(
            self,
            images=self.images[idx.to(dev)],
            labels=self.labels[idx.to(dev)],
            indices=base[idx],
        )

    def head(self, n: int) -> ImageData:
        """The first ``n`` examples (a prefix of a subset is the same examples for every row)."""
        if n >= len(self):
            return self
        base = self.indices if self.indices is not None else torch.arange(len(self))
        return replace(self, images=self.images[:n], labels=self.labels[:n], indices=base[:n])

    def as_float(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        x = self.images if index is None else self.images[index]
        return x.float().div_(255.0)

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of float images in [0,1] and labels, on the data's device."""
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=generator).to(self.images.device)
        else:
            order = torch.arange(n, device=self.images.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield self.as_float(idx), self.labels[idx]

    def describe(self) -> dict:
        return {
            "dataset": self.name,
            "split": self.split,
            "copy": self.copy,
            "n": len(self),
            "shape": list(self.images.shape[1:]),
            "num_classes": self.num_classes,
        }


def validate_tensors(images: torch.Tensor, labels: torch.Tensor, num_classes: int, where: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = getattr(images, "dtype", type(images).__name__), tuple(getattr(images, "shape", ()))
        raise DataError(f"{where}: images must be a uint8 tensor (N, C, H, W), got {got}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
        raise DataError(f"{where}: labels must be an int64 tensor (N,)")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise DataError(f"{where}: the split is empty")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"{where}: labels must lie in [0, {num_classes - 1}], "
            f"found [{int(labels.min())}, {int(labels.max())}]"
        )


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, as floats in [0,1] units."""
    x = images.float().div(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def load_dataset(
    name: str,
    split: str = "train",
    *,
    n: int | None = None,
    seed: int = 0,
    root: str | None = None,
    download: bool = False,
    device: torch.device | str | None = None,
    **options,
) -> ImageData:
    """Load split ``split`` of the registered dataset ``name``, optionally a subset of ``n``."""
    loader = DATASETS.get(name)
    if split not in SPLITS:
        raise BenchError(f"dataset {name!r}: unknown split {split!r}; valid: {', '.join(SPLITS)}")
    try:
        data = loader(split=split, root=root, download=download, **options)
    except TypeError as exc:  # unknown option names
        raise BenchError(f"dataset {name!r}: bad options {sorted(options)}: {exc}") from None
    data = data.subset(n, seed)
    return data.to(device) if device is not None else data


def augment(
    x: torch.Tensor,
    *,
    crop_padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """GPU-side training augmentation: random crop with zero padding, horizontal flip.

    Works on a float batch ``(B, C, H, W)`` on any device, without leaving it.
    """
    b, c, h, w = x.shape
    dev = x.device
    if crop_padding > 0:
        p = crop_padding
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b,), device=dev, generator=generator)
        ox = torch.randint(0, 2 * p + 1, (b,), device=dev, generator=generator)
        rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(c, device=dev)[None, :, None, None]
        x = padded[bi, ci, rows, cols]
    if flip:
        mask = torch.rand(b, device=dev, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


__all__ = ["ImageData", "load_dataset", "augment", "channel_stats", "SPLITS"]
