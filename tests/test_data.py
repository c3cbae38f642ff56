import gzip
import io
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from purifybench_testing import SHARED_CIFAR

from benchmark.data import ImageData, augment, load_dataset
from benchmark.data.imagefolder import read_image_folder, safe_extract
from benchmark.errors import BenchError, DataError


# ----------------------------------------------------------------------------- digits and subsets
def test_digits_split_shapes_and_determinism(digits_train, digits_test):
    assert digits_train.images.dtype == torch.uint8 and digits_train.labels.dtype == torch.int64
    assert digits_train.images.shape[1:] == (1, 16, 16)
    assert len(digits_train) + len(digits_test) == 1797
    assert len(digits_test) == 359  # round(20%) of each class
    assert sorted(digits_test.labels.unique().tolist()) == list(range(10))
    again = load_dataset("digits", "test")
    assert torch.equal(again.images, digits_test.images)
    counts = digits_test.labels.bincount().tolist()
    assert all(35 <= c <= 37 for c in counts)  # stratified
    assert load_dataset("digits", "train", size=8, channels=3).images.shape[1:] == (3, 8, 8)


def test_subset_is_deterministic_and_checked(digits_test):
    a = digits_test.subset(50, seed=3)
    b = digits_test.subset(50, seed=3)
    c = digits_test.subset(50, seed=4)
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    assert torch.equal(a.images, digits_test.images[a.indices])
    nested = a.subset(10, seed=0)
    assert torch.equal(nested.images, digits_test.images[nested.indices])
    with pytest.raises(DataError, match="n=361 is larger than the split"):
        digits_test.subset(361)
    with pytest.raises(DataError, match="positive integer"):
        digits_test.subset(0)


def test_bad_split_and_option_errors():
    with pytest.raises(BenchError, match="unknown split 'valid'"):
        load_dataset("digits", "valid")
    with pytest.raises(BenchError, match="bad options"):
        load_dataset("digits", "train", colour=True)
    with pytest.raises(DataError, match="size must be an integer"):
        load_dataset("digits", "train", size=1)


def test_imagedata_validates_tensors():
    with pytest.raises(DataError, match="uint8"):
        ImageData(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), ["a"], "t", "train", "c", (0.0,), (1.0,))
    with pytest.raises(DataError, match="labels must lie in"):
        ImageData(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]), ["a", "b"], "t", "train", "c",
                  (0.0,), (1.0,))


def test_gpu_side_augmentation_crop_and_flip():
    x = torch.rand(64, 3, 8, 8)
    same = augment(x, crop_padding=0, flip=False)
    assert torch.equal(same, x)
    gen = torch.Generator().manual_seed(0)
    flipped = augment(x, crop_padding=0, flip=True, generator=gen)
    is_flip = [torch.equal(f, o.flip(2)) for f, o in zip(flipped, x)]
    is_same = [torch.equal(f, o) for f, o in zip(flipped, x)]
    assert all(a or b for a, b in zip(is_flip, is_same)) and 10 < sum(is_flip) < 54
    cropped = augment(x, crop_padding=2, flip=False, generator=gen)
    assert cropped.shape == x.shape
    # every crop is a shifted window of the zero-padded image
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(8):
        ok = any(torch.equal(cropped[i], padded[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5))
        assert ok


# ----------------------------------------------------------------------------- IDX (fashion-mnist)
def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_fashion(folder, n=6, truncate=False, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        imgs = rng.integers(0, 256, (n, 28, 28))
        labels = np.arange(n) % 10
        for kind, arr, dim in (("images", imgs, 3), ("labels", labels, 1)):
            data = _idx_bytes(arr)
            if truncate and kind == "images":
                data = data[:-100]
            name = f"{prefix}-{kind}-idx{dim}-ubyte" + (".gz" if gz else "")
            (folder / name).write_bytes(gzip.compress(data) if gz else data)
    return folder


def test_fashion_mnist_debian_and_torchvision_layouts(tmp_path):
    _write_fashion(tmp_path / "debian")
    d = load_dataset("fashion-mnist", "test", root=str(tmp_path / "debian"))
    assert d.images.shape == (6, 1, 28, 28) and d.labels.tolist() == [0, 1, 2, 3, 4, 5]
    _write_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", gz=False)
    d2 = load_dataset("fashion-mnist", "train", root=str(tmp_path / "tv"), size=16, channels=3)
    assert d2.images.shape == (6, 3, 16, 16)


def test_fashion_mnist_truncated_and_missing_files(tmp_path):
    _write_fashion(tmp_path / "bad", truncate=True)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz.*truncated or corrupt"):
        load_dataset("fashion-mnist", "test", root=str(tmp_path / "bad"))
    with pytest.raises(DataError, match="not found in .*install Debian"):
        load_dataset("fashion-mnist", "test", root=str(tmp_path / "empty"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "t10k-images-idx3-ubyte").write_bytes(b"GIF89a" + bytes(20))
    (tmp_path / "junk" / "t10k-labels-idx1-ubyte").write_bytes(b"x")
    with pytest.raises(DataError, match="bad magic"):
        load_dataset("fashion-mnist", "test", root=str(tmp_path / "junk"))


# ----------------------------------------------------------------------------- CIFAR-10 batches
def _write_cifar(root, n=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": list(range(n)),
                 b"batch_label": b"x"}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_cifar10_python_batches(tmp_path):
    folder = _write_cifar(tmp_path)
    train = load_dataset("cifar10", "train", root=str(tmp_path))
    test = load_dataset("cifar10", "test", root=str(tmp_path))
    assert train.images.shape == (20, 3, 32, 32) and len(test) == 4
    raw = pickle.loads((folder / "test_batch").read_bytes())
    assert torch.equal(test.images[1], torch.from_numpy(raw[b"data"][1].reshape(3, 32, 32)))
    assert test.copy == "CIFAR-10 (original)"


def test_cifar10_refuses_code_in_pickles_and_truncation(tmp_path):
    folder = _write_cifar(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}))
    with pytest.raises(DataError, match="not allowed"):
        load_dataset("cifar10", "test", root=str(tmp_path))
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    (folder / "test_batch").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="corrupt, truncated"):
        load_dataset("cifar10", "test", root=str(tmp_path))
    with pytest.raises(DataError, match="not found.*pass download: true"):
        load_dataset("cifar10", "test", root=str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------- SVHN
def test_svhn_mat_files(tmp_path):
    from scipy.io import savemat

    x = np.random.default_rng(2).integers(0, 256, (32, 32, 3, 5)).astype(np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [3], [10]])})
    d = load_dataset("svhn", "test", root=str(tmp_path))
    assert d.labels.tolist() == [0, 1, 2, 3, 0]
    assert torch.equal(d.images[2], torch.from_numpy(x[:, :, :, 2]).permute(2, 0, 1))
    (tmp_path / "train_32x32.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(DataError, match="not a readable .mat"):
        load_dataset("svhn", "train", root=str(tmp_path))


# ----------------------------------------------------------------------------- image folders
def _png_bytes(value: int, size=(6, 6), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (value,) * (3 if mode == "RGB" else 1) if mode == "RGB" else value).save(buf, format="PNG")
    return buf.getvalue()


def _make_tree(root, split="train", per_class=3):
    for ci, cls in enumerate(["cat", "dog"]):
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (d / f"{i}.png").write_bytes(_png_bytes(10 * ci + i))
    return root / split


def _tar_from_tree(tree_parent, archive, mode="w:xz"):
    with tarfile.open(archive, mode) as tf:
        tf.add(tree_parent / "train", arcname="train")
    return archive


def test_image_folder_tree_archives_and_cache(tmp_path):
    tree = _make_tree(tmp_path / "src")
    images, labels, classes = read_image_folder(tree)
    assert images.shape == (6, 3, 6, 6) and labels.tolist() == [0, 0, 0, 1, 1, 1] and classes == ["cat", "dog"]
    assert images[4, 0, 0, 0] == 11
    archive = _tar_from_tree(tmp_path / "src", tmp_path / "train.tar.xz")
    a_images, a_labels, _ = read_image_folder(archive, "train")
    assert torch.equal(a_images, images) and torch.equal(a_labels, labels)
    caches = list(tmp_path.glob(".train.tar.xz.train.decoded-*.safetensors"))
    assert len(caches) == 1  # written beside the (writable) data
    caches[0].write_bytes(b"garbage")  # a damaged cache is rebuilt, not trusted
    with pytest.warns(UserWarning, match="unreadable"):
        b_images, _, _ = read_image_folder(archive, "train")
    assert torch.equal(b_images, images)
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        for f in sorted(tree.rglob("*.png")):
            zf.write(f, f"train/{f.parent.name}/{f.name}")
    z_images, _, _ = read_image_folder(tmp_path / "z.zip", "train")
    assert torch.equal(z_images, images)
    ds = load_dataset("imagefolder", "train", root=str(tmp_path / "src"), title="pets")
    assert ds.name == "pets" and len(ds) == 6 and len(ds.mean) == 3


def test_decoded_cache_never_lands_inside_the_repository(tmp_path, monkeypatch):
    """Data kept in the repository's ignored folders (.gpu/data) travels to the GPU machine; its
    decoded cache goes to the suite's cache folder instead."""
    from benchmark.data import imagefolder

    repo = tmp_path / "repo"
    _make_tree(repo / ".gpu")
    archive = _tar_from_tree(repo / ".gpu", repo / ".gpu" / "train.tar.xz")
    monkeypatch.setattr(imagefolder, "REPO_ROOT", repo)
    monkeypatch.setenv("PURIFYBENCH_CACHE", str(tmp_path / "cache"))
    images, _, _ = read_image_folder(archive, "train")
    assert len(images) == 6
    assert not list((repo / ".gpu").glob(".*decoded*"))
    assert len(list((tmp_path / "cache" / "decoded").glob(".train.tar.xz.train.decoded-*.safetensors"))) == 1


def test_path_traversal_and_links_are_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        data = _png_bytes(5)
        info = tarfile.TarInfo("train/cat/ok.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("../../escaped.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    dest = tmp_path / "out"
    with pytest.raises(DataError, match=r"member '../../escaped.png' would write outside"):
        safe_extract(evil, dest)
    assert not (tmp_path / "escaped.png").exists() and not (dest / "train").exists()
    with pytest.raises(DataError, match="would write outside"):
        read_image_folder(evil, "train")
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tf:
        info = tarfile.TarInfo("train/cat/x.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(DataError, match="link or special file"):
        safe_extract(link, tmp_path / "out2")
    zevil = tmp_path / "evil.zip"
    with zipfile.ZipFile(zevil, "w") as zf:
        zf.writestr("/abs/evil.png", _png_bytes(1))
    with pytest.raises(DataError, match="would write outside"):
        safe_extract(zevil, tmp_path / "out3")


def test_truncated_archive_and_non_images_give_clear_errors(tmp_path):
    _make_tree(tmp_path / "src", per_class=20)
    archive = _tar_from_tree(tmp_path / "src", tmp_path / "train.tar.xz")
    data = archive.read_bytes()
    cut = tmp_path / "cut.tar.xz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut.tar.xz is corrupt or truncated"):
        read_image_folder(cut, "train")
    bad = tmp_path / "bad" / "train" / "cat"
    bad.mkdir(parents=True)
    (bad / "0.jpg").write_bytes(b"this is text, not a jpeg")
    with pytest.raises(DataError, match=r"cat/0.jpg is not a readable image"):
        read_image_folder(tmp_path / "bad" / "train")
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        read_image_folder(tmp_path / "empty" / "train")
    with pytest.raises(DataError, match="does not exist"):
        read_image_folder(tmp_path / "nope")
    mixed = tmp_path / "mixed" / "train" / "cat"
    mixed.mkdir(parents=True)
    (mixed / "a.png").write_bytes(_png_bytes(1, (6, 6)))
    (mixed / "b.png").write_bytes(_png_bytes(1, (7, 7)))
    with pytest.raises(DataError, match="all images must have one size"):
        read_image_folder(tmp_path / "mixed" / "train")


@pytest.mark.skipif(not (SHARED_CIFAR / "test.tar.xz").is_file(), reason="offline CIFAR-10 JPEG copy not present")
def test_cifar10_jpeg_copy_is_labelled():
    d = load_dataset("cifar10-jpeg", "test", root=str(SHARED_CIFAR), n=200, seed=0)
    assert d.images.shape == (200, 3, 32, 32)
    assert d.classes[0] == "airplane" and d.classes[-1] == "truck"
    assert "JPEG" in d.copy and "not the original" in d.copy


def test_cifar10_jpeg_missing_root_error(tmp_path):
    with pytest.raises(DataError, match=r"cifar10-jpeg: test.tar.xz not found in .*PURIFYBENCH_CIFAR10_JPEG"):
        load_dataset("cifar10-jpeg", "test", root=str(tmp_path))
