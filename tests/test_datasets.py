"""Dataset loaders from local files, `describe_dataset` and the `data` CLI, on fixtures written here."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from robmia_db.datasets import cifar10, idx, yale
from robmia_db.datasets.base import count_dataset, load_dataset
from robmia_db.datasets.describe import describe_dataset
from robmia_db.errors import DatasetError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    monkeypatch.delenv("ROBMIA_DATA", raising=False)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------------ IDX


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """IDX written from the format's definition: 0, 0, type 0x08, ndim, big-endian dims, raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_idx_folder(folder: Path, n_train=7, n_test=4, size=(5, 4), gz_mask=(True, False, True, False)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *size), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    paths = {}
    for (name, array), gz in zip(arrays.items(), gz_mask, strict=True):
        paths[name] = write_idx(folder / name, array, gz)
    return arrays, paths


def test_idx_loads_mixed_gzip_and_plain_files(tmp_path):
    arrays, _ = make_idx_folder(tmp_path / "fm")
    ds = load_dataset("fashion_mnist", tmp_path / "fm")
    x_ref = np.concatenate([arrays["train-images-idx3-ubyte"], arrays["t10k-images-idx3-ubyte"]])
    np.testing.assert_array_equal(ds.x[:, 0], x_ref.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(
        ds.y, np.concatenate([arrays["train-labels-idx1-ubyte"], arrays["t10k-labels-idx1-ubyte"]])
    )
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.split_counts() == {"train": 7, "test": 4}
    assert ds.origin_split[:7].tolist() == ["train"] * 7
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert "gzipped" in ds.source


def test_mnist_in_torchvision_raw_folder_with_dot_names(tmp_path):
    arrays, paths = make_idx_folder(tmp_path / "MNIST" / "raw", gz_mask=(False,) * 4)
    renamed = paths["train-images-idx3-ubyte"].with_name("train-images.idx3-ubyte")
    paths["train-images-idx3-ubyte"].rename(renamed)
    ds = load_dataset("mnist", tmp_path)
    assert ds.classes == [str(d) for d in range(10)]
    np.testing.assert_array_equal(ds.x[0, 0] * 255, arrays["train-images-idx3-ubyte"][0])


def test_fashion_mnist_found_in_default_folder_without_root(tmp_path, monkeypatch):
    make_idx_folder(tmp_path / "debian")
    monkeypatch.setitem(idx.DEFAULT_IDX_DIRS, "fashion_mnist", (tmp_path / "nowhere", tmp_path / "debian"))
    ds = load_dataset("fashion_mnist")
    assert ds.split_counts() == {"train": 7, "test": 4}
    monkeypatch.setitem(idx.DEFAULT_IDX_DIRS, "fashion_mnist", (tmp_path / "nowhere",))
    with pytest.raises(DatasetError, match=r"nowhere: no IDX files found; dataset 'fashion_mnist' expects"):
        load_dataset("fashion_mnist")


def test_idx_bad_magic(tmp_path):
    _, paths = make_idx_folder(tmp_path)
    path = paths["t10k-labels-idx1-ubyte"]
    raw = bytearray(path.read_bytes())
    raw[2] = 0x42
    path.write_bytes(bytes(raw))
    with pytest.raises(
        DatasetError,
        match=r"t10k-labels-idx1-ubyte: not an IDX file \(magic 0x00004201, expected 0x00000801\)",
    ):
        load_dataset("mnist", tmp_path)


def test_idx_images_file_where_labels_expected(tmp_path):
    arrays, paths = make_idx_folder(tmp_path)
    write_idx(paths["train-labels-idx1-ubyte"], arrays["train-images-idx3-ubyte"], gz=False)
    with pytest.raises(
        DatasetError, match=r"train-labels-idx1-ubyte: IDX magic 0x00000803 but expected 0x00000801"
    ):
        load_dataset("mnist", tmp_path)


def test_idx_truncated_plain_and_gzip(tmp_path):
    _, paths = make_idx_folder(tmp_path, gz_mask=(False,) * 4)
    plain = paths["t10k-images-idx3-ubyte"]
    plain.write_bytes(plain.read_bytes()[:-3])
    with pytest.raises(
        DatasetError,
        match=r"t10k-images-idx3-ubyte: IDX file truncated: header says 4x5x4 \(96 bytes\), file has 93",
    ):
        load_dataset("mnist", tmp_path)
    _, paths = make_idx_folder(tmp_path / "b")
    gz = paths["train-images-idx3-ubyte"]
    gz.write_bytes(gz.read_bytes()[:-12])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz: corrupt or truncated gzip data"):
        load_dataset("mnist", tmp_path / "b")


def test_idx_wrong_counts_and_label_range(tmp_path):
    arrays, paths = make_idx_folder(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", arrays["train-labels-idx1-ubyte"][:5], gz=False)
    with pytest.raises(
        DatasetError, match=r"train-labels-idx1-ubyte: 5 labels but train-images-idx3-ubyte.gz has 7 images"
    ):
        load_dataset("mnist", tmp_path)
    labels = arrays["t10k-labels-idx1-ubyte"].copy()
    labels[0] = 10
    make_idx_folder(tmp_path / "c")
    write_idx(tmp_path / "c" / "t10k-labels-idx1-ubyte", labels, gz=False)
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte: label 10 outside 0..9"):
        load_dataset("mnist", tmp_path / "c")


def test_idx_missing_file_and_missing_folder(tmp_path):
    _, paths = make_idx_folder(tmp_path)
    paths["t10k-labels-idx1-ubyte"].unlink()
    with pytest.raises(
        DatasetError,
        match=r"missing t10k-labels-idx1-ubyte\[.gz\]; dataset 'mnist' expects the four IDX files",
    ):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DatasetError, match=r"does-not-exist: does not exist; dataset 'mnist' expects"):
        load_dataset("mnist", tmp_path / "does-not-exist")
    with pytest.raises(DatasetError, match=r"dataset 'mnist' needs its files: set data.root"):
        load_dataset("mnist")


def test_unknown_option_is_refused(tmp_path):
    make_idx_folder(tmp_path)
    with pytest.raises(DatasetError, match=r"dataset 'mnist': unknown option\(s\) colour"):
        load_dataset("mnist", tmp_path, colour=True)


# ------------------------------------------------------------------------------------------------ CIFAR-10


def make_cifar_batches(folder: Path, per_batch=3, n_test=4, meta=True) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(2)
    datas, labels = [], []
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        lab = rng.integers(0, 10, n).tolist()
        batch = {b"batch_label": name.encode(), b"labels": lab, b"data": data, b"filenames": [b"x.png"] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        datas.append(data)
        labels.extend(lab)
    if meta:
        names = [f"class{i}".encode() for i in range(10)]
        (folder / "batches.meta").write_bytes(
            pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2)
        )
    return np.concatenate(datas).reshape(-1, 3, 32, 32), np.array(labels)


def test_cifar_python_batches(tmp_path):
    x_ref, y_ref = make_cifar_batches(tmp_path / "cifar-10-batches-py")
    ds = load_dataset("cifar10", tmp_path)
    np.testing.assert_array_equal(ds.x, x_ref.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(ds.y, y_ref)
    assert ds.split_counts() == {"train": 15, "test": 4}
    assert ds.classes == [f"class{i}" for i in range(10)]
    assert "python batches" in ds.source
    assert any("subset: 15 of 50,000 training and 4 of 10,000 test" in n for n in ds.notes)


def test_cifar_python_batches_from_tar_gz_and_without_meta(tmp_path):
    x_ref, _ = make_cifar_batches(tmp_path / "src" / "cifar-10-batches-py", meta=False)
    archive = tmp_path / "dl" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds = load_dataset("cifar10", archive.parent)
    np.testing.assert_array_equal(ds.x, x_ref.astype(np.float32) / np.float32(255))
    assert ds.classes == cifar10.CIFAR10_CLASSES
    assert any("batches.meta missing" in n for n in ds.notes)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_batch_pickle_may_not_run_code(tmp_path):
    make_cifar_batches(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    with pytest.raises(
        DatasetError,
        match=r"data_batch_3: not a CIFAR-10 python batch \(refusing to load (posix|nt).system\)",
    ):
        load_dataset("cifar10", tmp_path)


def test_cifar_batch_malformed(tmp_path):
    make_cifar_batches(tmp_path)
    (tmp_path / "data_batch_5").unlink()
    with pytest.raises(
        DatasetError, match=r"missing CIFAR-10 batch file\(s\) data_batch_5; expected cifar-10-batches-py/"
    ):
        load_dataset("cifar10", tmp_path)
    make_cifar_batches(tmp_path / "b")
    bad = {b"labels": [1, 2], b"data": np.zeros((3, 3072), np.uint8)}
    (tmp_path / "b" / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DatasetError, match=r"test_batch: 2 labels for 3 images"):
        load_dataset("cifar10", tmp_path / "b")
    (tmp_path / "b" / "test_batch").write_bytes(
        pickle.dumps({b"labels": [1], b"data": np.zeros((1, 100), np.uint8)})
    )
    with pytest.raises(
        DatasetError, match=r"test_batch: b'data' is uint8 \(1, 100\); expected uint8 \(N, 3072\)"
    ):
        load_dataset("cifar10", tmp_path / "b")
    (tmp_path / "b" / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DatasetError, match=r"test_batch: not a CIFAR-10 python batch"):
        load_dataset("cifar10", tmp_path / "b")


PIL = pytest.importorskip("PIL", reason="image folders need Pillow")
from PIL import Image  # noqa: E402


def make_image_tree(
    root: Path, ext: str, n_train=(3, 12), n_test=1, smooth=False
) -> dict[tuple[str, str, int], np.ndarray]:
    """train/<class>/<k>.<ext> with k = 0..n-1 for 10 classes; returns the written pixel arrays."""
    rng = _rng(3)
    written = {}
    for split, counts in (("train", n_train), ("test", (n_test, n_test))):
        for c, cls in enumerate(cifar10.CIFAR10_CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            n = counts[c % 2]
            for k in range(n):
                if smooth:
                    base = rng.integers(40, 200, 3)
                    grad = np.linspace(0, 30, 32)[None, :, None]
                    pixels = np.clip(base[None, None, :] + grad, 0, 255).astype(np.uint8).repeat(32, axis=0)
                else:
                    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.{ext}", quality=95)
                written[(split, cls, k)] = pixels
    return written


def _expected_tree_order(written):
    xs, ys = [], []
    for split in ("train", "test"):
        for c, cls in enumerate(cifar10.CIFAR10_CLASSES):
            k = 0
            while (split, cls, k) in written:
                xs.append(written[(split, cls, k)].transpose(2, 0, 1))
                ys.append(c)
                k += 1
    return np.stack(xs), np.array(ys)


def test_cifar_png_tree_exact_pixels_in_class_then_natural_order(tmp_path):
    written = make_image_tree(tmp_path / "imgs", "png")
    ds = load_dataset("cifar10", tmp_path / "imgs")
    x_ref, y_ref = _expected_tree_order(written)
    np.testing.assert_array_equal(ds.x, x_ref.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(ds.y, y_ref)
    assert ds.split_counts() == {"train": 75, "test": 10}
    assert "image folders" in ds.source and "JPEG" not in ds.source


def test_cifar_jpeg_tree_in_tar_is_flagged_as_lossy(tmp_path):
    written = make_image_tree(tmp_path / "src", "jpg", n_train=(2, 2), smooth=True)
    archive = tmp_path / "cifar-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(tmp_path / "src" / split, arcname=split)
    ds = load_dataset("cifar10", archive)
    x_ref, y_ref = _expected_tree_order(written)
    np.testing.assert_array_equal(ds.y, y_ref)
    assert np.abs(ds.x * 255 - x_ref).mean() < 3.0
    decoded = np.asarray(Image.open(tmp_path / "src" / "train" / "airplane" / "0.jpg").convert("RGB"))
    np.testing.assert_array_equal(ds.x[0], decoded.transpose(2, 0, 1).astype(np.float32) / np.float32(255))
    assert "JPEG copy" in ds.source
    assert any("lossy" in n for n in ds.notes)


def test_cifar_tree_original_order_restored_from_y_train_all(tmp_path):
    written = make_image_tree(tmp_path, "png", n_train=(2, 2))
    rng = _rng(4)
    y_all = rng.permutation(np.repeat(np.arange(10), 2)).astype(np.uint8)
    np.savez(tmp_path / "meta.npz", y_train_all=y_all)
    ds = load_dataset("cifar10", tmp_path)
    # training image i is the k-th of its class where k counts earlier images of that class
    seen = {c: 0 for c in range(10)}
    expected = []
    for label in y_all.tolist():
        expected.append(written[("train", cifar10.CIFAR10_CLASSES[label], seen[label])].transpose(2, 0, 1))
        seen[label] += 1
    np.testing.assert_array_equal(ds.y[:20], y_all)
    np.testing.assert_array_equal(ds.x[:20] * np.float32(255), np.stack(expected).astype(np.float32))
    assert any("original CIFAR-10 order" in n for n in ds.notes)
    np.savez(tmp_path / "meta.npz", y_train_all=y_all[:-1])
    kept = load_dataset("cifar10", tmp_path)
    np.testing.assert_array_equal(kept.y[:20], np.repeat(np.arange(10), 2))
    assert any("class-folder order (the original CIFAR-10 order is unknown)" in n for n in kept.notes)


def test_cifar_tree_malformed(tmp_path):
    make_image_tree(tmp_path / "a", "png", n_train=(1, 1))
    for f in (tmp_path / "a" / "test" / "dog").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"class folder test/dog/ has no images"):
        load_dataset("cifar10", tmp_path / "a")
    make_image_tree(tmp_path / "b", "png", n_train=(1, 1))
    (tmp_path / "b" / "train" / "airplane" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"train/airplane/0.png: cannot decode image"):
        load_dataset("cifar10", tmp_path / "b")
    make_image_tree(tmp_path / "c", "png", n_train=(1, 1))
    (tmp_path / "c" / "test" / "zebra").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "c" / "test" / "zebra" / "0.png")
    with pytest.raises(DatasetError, match=r"train classes .* differ from test classes"):
        load_dataset("cifar10", tmp_path / "c")
    make_image_tree(tmp_path / "d", "png", n_train=(1, 1))
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(tmp_path / "d" / "test" / "cat" / "0.png")
    with pytest.raises(DatasetError, match=r"test/cat/0.png: image is \(16, 32, 3\), expected \(32, 32, 3\)"):
        load_dataset("cifar10", tmp_path / "d")


def test_cifar_unreadable_tar_and_empty_folder(tmp_path):
    (tmp_path / "cifar.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage-not-gzip")
    with pytest.raises(DatasetError, match=r"cifar.tar.gz: cannot read tar archive"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "cifar.tar.gz").unlink()
    with pytest.raises(DatasetError, match=r": no CIFAR-10 files; expected cifar-10-batches-py/"):
        load_dataset("cifar10", tmp_path)


def test_cifar_npz_subset_and_layout_choice(tmp_path):
    rng = _rng(5)
    x_train = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    classes = np.array(cifar10.CIFAR10_CLASSES)
    np.savez(
        tmp_path / "subset.npz",
        x_train=x_train,
        y_train=np.arange(6),
        x_test=x_test,
        y_test=[1, 2],
        classes=classes,
    )
    batch_x, _ = make_cifar_batches(tmp_path / "cifar-10-batches-py")
    assert load_dataset("cifar10", tmp_path).split_counts() == {"train": 15, "test": 4}
    ds = load_dataset("cifar10", tmp_path, layout="npz")
    np.testing.assert_array_equal(
        ds.x[:6], x_train.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    )
    np.testing.assert_array_equal(ds.y, [0, 1, 2, 3, 4, 5, 1, 2])
    assert ds.origin_split.tolist() == ["train"] * 6 + ["test"] * 2
    assert any("subset: 6 of 50,000 training and 2 of 10,000 test images" in n for n in ds.notes)
    with pytest.raises(DatasetError, match=r"no CIFAR-10 files of layout 'images'"):
        load_dataset("cifar10", tmp_path, layout="images")
    with pytest.raises(DatasetError, match=r"layout must be one of auto, batches, images, npz"):
        load_dataset("cifar10", tmp_path, layout="zip")


# ------------------------------------------------------------------------------------------------ Yale


def pgm_bytes(image: np.ndarray, comment: bool = False) -> bytes:
    h, w = image.shape
    header = f"P5\n{'# made by a test' + chr(10) if comment else ''}{w} {h}\n255\n".encode()
    return header + image.astype(np.uint8).tobytes()


YALE_SUBJECTS = {1: 6, 2: 7, 5: 5}
YALE_HW = (8, 6)


def make_cropped_yale(root: Path) -> dict[str, np.ndarray]:
    """A tiny CroppedYale: subjects 1, 2, 5, PGMs of 8 (H) x 6 (W), plus the files the loader must skip."""
    rng = _rng(6)
    written = {}
    angles = ["+000E+00", "-005E+10", "+010E-20", "+025E+00", "-035E+15", "+050E-40", "+095E+00"]
    for subject, count in YALE_SUBJECTS.items():
        folder = root / "CroppedYale" / f"yaleB{subject:02d}"
        folder.mkdir(parents=True)
        for angle in angles[:count]:
            name = f"yaleB{subject:02d}/yaleB{subject:02d}_P00A{angle}.pgm"
            image = rng.integers(0, 256, YALE_HW, dtype=np.uint8)
            (root / "CroppedYale" / name).write_bytes(pgm_bytes(image, comment=subject == 2))
            written[f"CroppedYale/{name}"] = image
        (folder / f"yaleB{subject:02d}_P00_Ambient.pgm").write_bytes(pgm_bytes(np.zeros((3, 4), np.uint8)))
    (root / "CroppedYale" / "yaleB01" / "yaleB01_P00A+130E+20.pgm.bad").write_bytes(b"corrupt")
    (root / "CroppedYale" / "yaleB02" / "yaleB02_P00.info").write_text("info")
    return written


def authors_yale_split(X: np.ndarray, Y: np.ndarray, train_points_per_label: int, seed: int):
    """`utils.py::YALE_split` from the authors' repository, as published, on arrays instead of a .mat file."""
    train_data, train_label, test_data, test_label = [], [], [], []
    np.random.seed(seed)
    label_count = 0
    for label in set(Y):
        label_idx = np.argwhere(Y == label).flatten()
        tot_num = len(label_idx)
        idx_permute = np.random.permutation(label_idx)
        train_data.append(X[idx_permute[:train_points_per_label]])
        train_label.append(np.repeat(label_count, train_points_per_label))
        test_data.append(X[idx_permute[train_points_per_label:]])
        test_label.append(np.repeat(label_count, tot_num - train_points_per_label))
        label_count += 1
    train_data = np.concatenate(train_data)
    test_data = np.concatenate(test_data)
    train_label = np.concatenate(train_label)
    test_label = np.concatenate(test_label)
    train_idx_permute = np.random.permutation(len(train_label))
    train_data = train_data[train_idx_permute]
    train_label = train_label[train_idx_permute]
    test_idx_permute = np.random.permutation(len(test_label))
    return train_data, train_label, test_data[test_idx_permute], test_label[test_idx_permute]


@pytest.mark.parametrize("seed", [0, 3])
def test_yale_folder_matches_the_authors_split(tmp_path, seed):
    written = make_cropped_yale(tmp_path)
    ds = load_dataset("yale", tmp_path, train_per_class=4, split_seed=seed)
    names = sorted(written)
    X = np.stack([written[n] for n in names]).astype(np.float32) / np.float32(255)
    Y = np.array([int(n.split("/")[1][5:]) for n in names])
    train_x, train_y, test_x, test_y = authors_yale_split(X, Y, 4, seed)
    assert ds.split_counts() == {"train": 12, "test": 6}
    np.testing.assert_array_equal(ds.x[:12, 0], train_x)
    np.testing.assert_array_equal(ds.y[:12], train_y)
    np.testing.assert_array_equal(ds.x[12:, 0], test_x)
    np.testing.assert_array_equal(ds.y[12:], test_y)
    assert ds.classes == ["yaleB01", "yaleB02", "yaleB05"]
    assert np.bincount(ds.y[12:]).tolist() == [2, 3, 1]
    assert any("skipped 3 *_Ambient.pgm" in n for n in ds.notes)


def test_yale_split_function_against_global_seed_stream():
    subjects = np.array([3, 1, 1, 3, 2, 2, 1, 3, 2, 2, 1])
    train_i, train_l, test_i, test_l = yale.yale_split(subjects, seed=7, train_per_class=2)
    X = np.arange(len(subjects))
    ref_train, ref_train_l, ref_test, ref_test_l = authors_yale_split(X, subjects, 2, 7)
    np.testing.assert_array_equal(train_i, ref_train)
    np.testing.assert_array_equal(test_i, ref_test)
    np.testing.assert_array_equal(train_l, ref_train_l)
    np.testing.assert_array_equal(test_l, ref_test_l)
    assert sorted(np.concatenate([train_i, test_i]).tolist()) == list(range(len(subjects)))


@pytest.mark.parametrize("mode,suffix", [("w", ".tar"), ("w:gz", ".tar.gz"), ("w:xz", ".tar.xz")])
def test_yale_tar_archives_read_without_extracting(tmp_path, mode, suffix):
    make_cropped_yale(tmp_path / "src")
    folder_ds = load_dataset("yale", tmp_path / "src", train_per_class=4)
    archive = tmp_path / "data" / f"CroppedYale{suffix}"
    archive.parent.mkdir()
    with tarfile.open(archive, mode) as tar:
        tar.add(tmp_path / "src" / "CroppedYale", arcname="CroppedYale")
    before = sorted(p.name for p in archive.parent.iterdir())
    tar_ds = load_dataset("yale", archive.parent, train_per_class=4)
    assert tar_ds.checksum() == folder_ds.checksum()
    assert load_dataset("yale", archive, train_per_class=4).checksum() == folder_ds.checksum()
    assert sorted(p.name for p in archive.parent.iterdir()) == before
    assert "archive" in tar_ds.source


def test_yale_pointed_at_cropped_folder_itself(tmp_path):
    make_cropped_yale(tmp_path)
    a = load_dataset("yale", tmp_path, train_per_class=4)
    b = load_dataset("yale", tmp_path / "CroppedYale", train_per_class=4)
    assert a.checksum() == b.checksum()
    assert a.x.shape == (18, 1, *YALE_HW)


def test_yale_malformed(tmp_path):
    make_cropped_yale(tmp_path / "a")
    with pytest.raises(
        DatasetError, match=r"CroppedYale: yaleB01 has 6 images, fewer than train_per_class=50"
    ):
        load_dataset("yale", tmp_path / "a")
    bad = tmp_path / "a" / "CroppedYale" / "yaleB02" / "yaleB02_P00A+000E+00.pgm"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(
        DatasetError, match=r"yaleB02_P00A\+000E\+00.pgm: truncated PGM \(43 pixel bytes, header says 48\)"
    ):
        load_dataset("yale", tmp_path / "a", train_per_class=4)
    bad.write_bytes(b"P2\n6 8\n255\n" + b"1 " * 48)
    with pytest.raises(DatasetError, match=r"yaleB02_P00A\+000E\+00.pgm: not a binary PGM \(P5\) file"):
        load_dataset("yale", tmp_path / "a", train_per_class=4)
    bad.write_bytes(pgm_bytes(np.zeros((9, 6), np.uint8)))
    with pytest.raises(DatasetError, match=r"yaleB02_P00A\+000E\+00.pgm: image is 9x6, others are 8x6"):
        load_dataset("yale", tmp_path / "a", train_per_class=4)
    (tmp_path / "b").mkdir()
    with pytest.raises(
        DatasetError, match=r"b: no CroppedYale folder or archive; expected CroppedYale/yaleBNN"
    ):
        load_dataset("yale", tmp_path / "b")
    (tmp_path / "b" / "CroppedYale.tar.xz").write_bytes(b"\xfd7zXZ\x00 truncated")
    with pytest.raises(DatasetError, match=r"CroppedYale.tar.xz: cannot read tar archive"):
        load_dataset("yale", tmp_path / "b")
    with pytest.raises(DatasetError, match=r"train_per_class must be a positive integer"):
        load_dataset("yale", tmp_path / "a", train_per_class=0)


def test_pgm_sixteen_bit_is_scaled():
    image = np.array([[0, 1000], [65535, 32768]], dtype=">u2")
    data = b"P5 2 2 65535\n" + image.tobytes()
    np.testing.assert_array_equal(yale.read_pgm(data, "x"), [[0, 4], [255, 128]])


# ------------------------------------------------------------------------------------------------ npz


def test_npz_generic_layouts(tmp_path):
    rng = _rng(7)
    gray = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", x=gray, y=[0, 1, 2, 1, 0], split=["train", "test", "train", "train", "test"])
    ds = load_dataset("npz", tmp_path / "g.npz")
    np.testing.assert_array_equal(ds.x[:, 0], gray.astype(np.float32) / np.float32(255))
    assert ds.origin_split.tolist() == ["train", "test", "train", "train", "test"]
    assert ds.classes == ["0", "1", "2"]

    nhwc = rng.random((4, 6, 5, 3), dtype=np.float32)
    np.savez(
        tmp_path / "c.npz",
        x=nhwc,
        y=np.array([1, 0, 1, 0]),
        split=np.array([0, 1, 1, 0]),
        classes=np.array(["a", "b"]),
    )
    ds = load_dataset("npz", tmp_path / "c.npz")
    np.testing.assert_array_equal(ds.x, nhwc.transpose(0, 3, 1, 2))
    assert ds.origin_split.tolist() == ["train", "test", "test", "train"]
    assert ds.classes == ["a", "b"]

    nchw = rng.random((2, 3, 7, 7)).astype(np.float64)
    folder = tmp_path / "only"
    folder.mkdir()
    np.savez(folder / "d.npz", x=nchw, y=[0, 0])
    ds = load_dataset("npz", folder)
    np.testing.assert_allclose(ds.x, nchw.astype(np.float32))
    assert ds.split_counts() == {"train": 2}


def test_npz_channel_ambiguity_and_override(tmp_path):
    x = _rng(8).integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=[0, 1])
    with pytest.raises(
        DatasetError, match=r"cannot tell where the channels are in `x` of shape \(2, 3, 4, 3\); pass layout="
    ):
        load_dataset("npz", tmp_path / "a.npz")
    ds = load_dataset("npz", tmp_path / "a.npz", layout="nhwc")
    np.testing.assert_array_equal(ds.x * np.float32(255), x.transpose(0, 3, 1, 2).astype(np.float32))
    assert load_dataset("npz", tmp_path / "a.npz", layout="nchw").x.shape == (2, 3, 4, 3)


def test_npz_malformed(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.full((2, 3, 3), 1.5), y=[0, 1])
    with pytest.raises(DatasetError, match=r"a.npz: `x` float values must be finite and in \[0, 1\]"):
        load_dataset("npz", tmp_path / "a.npz")
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 3, 3), np.int32), y=[0, 1])
    with pytest.raises(DatasetError, match=r"`x` has dtype int32; expected uint8"):
        load_dataset("npz", tmp_path / "a.npz")
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 3, 3), np.uint8), y=[0, 1, 1])
    with pytest.raises(DatasetError, match=r"`y` has shape \(3,\); expected \(2,\) to match the images"):
        load_dataset("npz", tmp_path / "a.npz")
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 3, 3), np.uint8), y=[0, 1], split=["train", "val"])
    with pytest.raises(DatasetError, match=r"`split` values must be 'train' or 'test' \(found 'val'\)"):
        load_dataset("npz", tmp_path / "a.npz")
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"a.npz: keys \['images'\]; expected an .npz file with `x`"):
        load_dataset("npz", tmp_path / "a.npz")
    np.savez(
        tmp_path / "a.npz",
        x=np.zeros((2, 3, 3), np.uint8),
        y=[0, 1],
        classes=np.array([{"a": 1}], dtype=object),
    )
    with pytest.raises(DatasetError, match=r"object arrays are not read"):
        load_dataset("npz", tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 3, 3), np.uint8), y=[0, 1])
    with pytest.raises(DatasetError, match=r": 2 .npz files \(pass file=NAME\)"):
        load_dataset("npz", tmp_path)
    assert load_dataset("npz", tmp_path, file="b.npz").split_counts() == {"train": 2}
    (tmp_path / "b.npz").write_bytes(b"PK\x03\x04broken")
    with pytest.raises(DatasetError, match=r"b.npz: cannot read npz"):
        load_dataset("npz", tmp_path / "b.npz")


# ------------------------------------------------------------------------------------------------ describe + CLI


def _npz_fixture(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    rng = _rng(9)
    x = rng.integers(0, 256, (9, 2, 4, 5), dtype=np.uint8)
    y = np.array([0, 1, 2, 2, 1, 0, 2, 2, 1])
    split = np.array([0, 0, 0, 1, 0, 1, 0, 0, 1])
    path = tmp_path / "toy.npz"
    np.savez(path, x=x, y=y, split=split, classes=np.array(["cat", "dog", "eel"]))
    return path, x, y, split


def test_describe_dataset_against_numpy(tmp_path):
    path, x, y, split = _npz_fixture(tmp_path)
    summary = describe_dataset("npz", path)
    assert summary["splits"] == {
        "train": {"n": 6, "class_counts": np.bincount(y[split == 0], minlength=3).tolist()},
        "test": {"n": 3, "class_counts": np.bincount(y[split == 1], minlength=3).tolist()},
    }
    assert (
        summary["shape"] == [2, 4, 5]
        and summary["n_classes"] == 3
        and summary["classes"] == ["cat", "dog", "eel"]
    )
    scaled = x.astype(np.float32) / np.float32(255)
    assert summary["value_range"] == [float(scaled.min()), float(scaled.max())]
    assert summary["pixel_mean"] == pytest.approx(
        (x.astype(np.float32) / np.float32(255)).mean(dtype=np.float64)
    )
    digest = hashlib.sha256()
    digest.update((x.astype(np.float32) / np.float32(255)).tobytes())
    digest.update(y.astype(np.int64).tobytes())
    digest.update("\n".join("test" if s else "train" for s in split).encode())
    assert summary["checksum"] == digest.hexdigest()
    json.dumps(summary)


def test_describe_refuses_options_the_loader_lacks():
    with pytest.raises(DatasetError, match=r"dataset 'digits': unknown option\(s\) split_seed"):
        describe_dataset("digits", split_seed=1)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    code = (
        "import sys; from robmia_db.cli.base import main; import robmia_db.cli.data_cmd; main(sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if k != "ROBMIA_DATA"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_describe_json_table_and_errors(tmp_path):
    path, _, _, _ = _npz_fixture(tmp_path)
    result = _run_cli("data", "describe", "npz", "--root", str(path), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == describe_dataset("npz", path)
    table = _run_cli("data", "describe", "npz", "--root", str(path))
    assert table.returncode == 0
    assert "examples           9 (train 6 / test 3)" in table.stdout
    assert "shape              2 x 4 x 5 (C x H x W)" in table.stdout
    missing = _run_cli("data", "describe", "yale", "--root", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert missing.stderr.strip().startswith("Error: ") and "nope: does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    listing = _run_cli("data", "list")
    assert listing.returncode == 0
    for name in ("cifar10", "digits", "fashion_mnist", "mnist", "npz", "yale"):
        assert f"{name}: " in listing.stdout


def test_cli_passes_loader_options(tmp_path):
    make_cropped_yale(tmp_path)
    result = _run_cli(
        "data", "describe", "yale", "--root", str(tmp_path), "-o", "train_per_class=4", "--format", "json"
    )
    assert result.returncode == 0, result.stderr
    assert {k: v["n"] for k, v in json.loads(result.stdout)["splits"].items()} == {"train": 12, "test": 6}


def test_dataset_layer_and_cli_module_do_not_import_torch(tmp_path):
    path, _, _, _ = _npz_fixture(tmp_path)
    code = (
        "import sys; import robmia_db.cli.data_cmd; assert 'numpy' not in sys.modules, 'cli imported numpy';"
        "from robmia_db.datasets.describe import describe_dataset;"
        f"describe_dataset('npz', {str(path)!r}); assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_pickle_helper_accepts_protocol_5_arrays():
    array = np.arange(3072 * 2, dtype=np.uint8).reshape(2, 3072)
    blob = pickle.dumps({b"data": array, b"labels": [1, 2]}, protocol=5)
    batch = cifar10._unpickle_batch(blob, "mem")
    np.testing.assert_array_equal(batch[b"data"], array)
    assert io.BytesIO(blob).read(2) == b"\x80\x05"


# ---------------------------------------------------------------------------------------------------------
# Counting without loading (what `check` uses) and $ROBMIA_DATA folder names


def _write_every_format(root: Path) -> dict[str, tuple[Path, dict]]:
    """One small instance of every file format, each with the options needed to read it."""
    make_idx_folder(root / "idx", n_train=9, n_test=5)
    make_cifar_batches(root / "batches" / "cifar-10-batches-py", per_batch=2, n_test=3)
    make_image_tree(root / "tree", "png", n_train=(2, 3), n_test=1)
    with tarfile.open(root / "tree.tar.gz", "w:gz") as archive:
        archive.add(root / "tree", arcname="cifar")
    make_cropped_yale(root / "yale")
    with tarfile.open(root / "yale.tar.xz", "w:xz") as archive:
        archive.add(root / "yale" / "CroppedYale", arcname="CroppedYale")
    rng = _rng(11)
    np.savez(
        root / "split.npz", x=rng.integers(0, 256, (7, 4, 4), dtype=np.uint8), y=np.arange(7) % 3,
        split=np.array([0, 1, 1, 0, 0, 1, 0]),
    )  # fmt: skip
    np.savez(
        root / "keras.npz",
        x_train=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), y_train=np.arange(6) % 10,
        x_test=rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), y_test=np.arange(2),
    )  # fmt: skip
    return {
        "mnist": (root / "idx", {}),
        "cifar10-batches": (root / "batches", {}),
        "cifar10-tree": (root / "tree", {}),
        "cifar10-tree-tar": (root / "tree.tar.gz", {}),
        "cifar10-npz": (root / "keras.npz", {}),
        "yale": (root / "yale", {"train_per_class": 5}),
        "yale-tar": (root / "yale.tar.xz", {"train_per_class": 4}),
        "npz": (root / "split.npz", {}),
    }


def test_counts_equal_the_split_counts_of_loading_for_every_format(tmp_path):
    for label, (path, options) in _write_every_format(tmp_path).items():
        name = label.split("-")[0]
        counted = count_dataset(name, path, **options)
        loaded = load_dataset(name, path, **options).split_counts()
        assert counted == loaded, label
        assert sum(counted.values()) > 0
    assert count_dataset("digits") == {"train": 1797}
    # counting refuses what loading refuses, with the same message
    for name, path, options in [
        ("yale", tmp_path / "yale", {"train_per_class": 6}),
        ("cifar10", tmp_path / "tree", {"layout": "npz"}),
        ("npz", tmp_path / "split.npz", {"layout": "nhcw"}),
        ("mnist", tmp_path / "idx", {"bogus": 1}),
    ]:
        with pytest.raises(DatasetError) as from_load:
            load_dataset(name, path, **options)
        with pytest.raises(DatasetError) as from_count:
            count_dataset(name, path, **options)
        assert str(from_count.value) == str(from_load.value)


def test_idx_counts_read_only_the_headers(tmp_path):
    arrays, paths = make_idx_folder(tmp_path, n_train=9, n_test=5, gz_mask=(True, False, False, True))
    # cut the pixels off: a count needs the header alone (loading would refuse the truncated file)
    plain = paths["t10k-images-idx3-ubyte"]
    assert not plain.name.endswith(".gz")
    plain.write_bytes(plain.read_bytes()[:16])
    assert count_dataset("mnist", tmp_path) == {"train": 9, "test": 5}
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("mnist", tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", arrays["t10k-labels-idx1-ubyte"][:3], gz=True)
    with pytest.raises(
        DatasetError, match=r"t10k-labels-idx1-ubyte.gz: 3 labels but t10k-images-idx3-ubyte has 5"
    ):
        count_dataset("mnist", tmp_path)


@pytest.mark.parametrize(
    ("name", "folder"),
    [("yale", "extended-yale-b-cropped"), ("fashion_mnist", "fashion-mnist"), ("cifar10", "cifar-10")],
)
def test_robmia_data_finds_the_usual_folder_names(tmp_path, monkeypatch, name, folder):
    # the folder names the data is distributed under (../shared/data uses the first two)
    options = {}
    if name == "yale":
        make_cropped_yale(tmp_path / folder)
        options = {"train_per_class": 5}
    elif name == "fashion_mnist":
        make_idx_folder(tmp_path / folder, n_train=9, n_test=5)
        monkeypatch.setitem(idx.DEFAULT_IDX_DIRS, "fashion_mnist", (tmp_path / "nowhere",))
    else:
        make_cifar_batches(tmp_path / folder, per_batch=2, n_test=3)
    monkeypatch.setenv("ROBMIA_DATA", str(tmp_path))
    ds = load_dataset(name, **options)
    assert str(tmp_path / folder) in ds.source
    assert count_dataset(name, **options) == ds.split_counts()
