import gzip
import struct

import numpy as np
import pytest

from train import data
from train.data import DataError


# ---------------------------------------------------------------- digits

def test_digits_split_is_fixed_stratified_and_standardized():
    a, b = data.load_digits(), data.load_digits()
    assert a.x_train.shape == (1437, 8, 8, 1) and a.x_test.shape == (360, 8, 8, 1)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert abs(float(a.x_train.mean())) < 1e-4 and abs(float(a.x_train.std()) - 1) < 1e-4
    counts = np.bincount(a.y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37  # stratified: a fifth of each class
    train_idx, test_idx = data._stratified_split(np.repeat(np.arange(10), 180), every=5, seed=0)
    assert len(set(train_idx) | set(test_idx)) == 1800 and not set(train_idx) & set(test_idx)
    first = a.y_train[:64]
    assert len(set(first.tolist())) == 10  # a --limit-train prefix mixes the classes


def test_digits_match_scikit_learn():
    from sklearn.datasets import load_digits
    images, target = data._digits_arrays()
    bunch = load_digits()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(target, bunch.target)


# ---------------------------------------------------------------- batching

def test_epoch_order_depends_only_on_seed_and_epoch():
    p = data.epoch_permutation(3, 1, 100)
    np.testing.assert_array_equal(p, data.epoch_permutation(3, 1, 100))
    assert sorted(p) == list(range(100))
    assert not np.array_equal(p, data.epoch_permutation(3, 2, 100))
    assert not np.array_equal(p, data.epoch_permutation(4, 1, 100))


def test_train_batches_drop_the_partial_batch_and_resume_mid_epoch():
    x = np.arange(103, dtype=np.float32)[:, None]
    y = np.arange(103, dtype=np.int32)
    full = list(data.train_batches(x, y, 10, seed=0, epoch=0))
    assert len(full) == 10 and all(len(xb) == 10 for xb, _ in full)
    seen = np.concatenate([yb for _, yb in full])
    assert len(set(seen.tolist())) == 100  # no repeats, 3 examples left out
    tail = list(data.train_batches(x, y, 10, seed=0, epoch=0, start=4))
    for (xa, ya), (xb, yb) in zip(full[4:], tail):
        np.testing.assert_array_equal(ya, yb)
    assert len(tail) == 6


def test_eval_batches_cover_every_example_once_with_a_mask():
    x = np.arange(25, dtype=np.float32)[:, None]
    y = np.arange(25, dtype=np.int32)
    batches = list(data.eval_batches(x, y, 10))
    assert [len(b[0]) for b in batches] == [10, 10, 10]
    valid = np.concatenate([yb[m] for _, yb, m in batches])
    np.testing.assert_array_equal(valid, y)
    assert batches[-1][2].sum() == 5


def test_limit_train_keeps_the_test_set_whole():
    d = data.load("digits", limit_train=100)
    assert len(d.x_train) == 100 and len(d.x_test) == 360


# ---------------------------------------------------------------- IDX files

def _idx_bytes(magic, dims, payload: bytes) -> bytes:
    return struct.pack(">I", magic) + struct.pack(">" + "I" * len(dims), *dims) + payload


def test_real_mnist_files_parse_and_match_the_published_facts(data_dir):
    d = data.load_idx_dataset("mnist", str(data_dir))
    assert d.x_train.shape == (60000, 28, 28, 1) and d.x_test.shape == (10000, 28, 28, 1)
    assert d.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert np.bincount(d.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(float(d.x_train.mean())) < 1e-3 and abs(float(d.x_train.std()) - 1) < 1e-3


def test_real_fashion_labels_parse(data_dir):
    labels = data.read_idx(data_dir / "fashion-mnist" / "train-labels-idx1-ubyte.gz",
                           kind="labels", count=60000,
                           md5=data.MD5["fashion-mnist"]["train-labels-idx1-ubyte.gz"])
    assert labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert np.bincount(labels).tolist() == [6000] * 10


def test_parse_idx_accepts_a_small_valid_file(tmp_path):
    imgs = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    raw = gzip.compress(_idx_bytes(2051, (2, 28, 28), imgs.tobytes()))
    out = data.parse_idx(raw, "x.gz", kind="images", count=2)
    np.testing.assert_array_equal(out, imgs)


def test_parse_idx_refuses_a_label_outside_0_to_9(tmp_path):
    # Structure intact (and no checksum for this file): the label itself is wrong.
    labels = np.array([3, 9, 10, 0], np.uint8)
    raw = gzip.compress(_idx_bytes(2049, (4,), labels.tobytes()))
    with pytest.raises(DataError, match="has label 10, expected 0..9; re-download it"):
        data.parse_idx(raw, "y.gz", kind="labels", count=4)
    ok = gzip.compress(_idx_bytes(2049, (4,), labels.clip(0, 9).tobytes()))
    np.testing.assert_array_equal(data.parse_idx(ok, "y.gz", kind="labels", count=4),
                                  [3, 9, 9, 0])


def _rewrite(path, transform):
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(transform(raw), compresslevel=1))


def test_truncated_content_names_the_file_sizes_and_fix(mnist_copy):
    f = mnist_copy / "t10k-labels-idx1-ubyte.gz"
    _rewrite(f, lambda raw: raw[:-7])
    with pytest.raises(DataError) as info:
        data.load_idx_dataset("mnist", str(mnist_copy.parent))
    msg = str(info.value)
    assert str(f) in msg and "truncated" in msg
    assert "expected 10008 bytes after decompression, got 10001" in msg
    assert "--download" in msg


def test_truncated_gzip_stream(mnist_copy):
    f = mnist_copy / "train-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(DataError, match="truncated") as info:
        data.load_idx_dataset("mnist", str(mnist_copy.parent))
    assert str(f) in str(info.value)


def test_not_gzip_at_all(mnist_copy):
    f = mnist_copy / "t10k-labels-idx1-ubyte.gz"
    f.write_bytes(b"<html>not found</html>" * 10)
    with pytest.raises(DataError, match="not a valid gzip file"):
        data.load_idx_dataset("mnist", str(mnist_copy.parent))


def test_wrong_magic_says_what_the_file_is(mnist_copy):
    labels = mnist_copy / "t10k-labels-idx1-ubyte.gz"
    images = mnist_copy / "t10k-images-idx3-ubyte.gz"
    labels.write_bytes(images.read_bytes())  # an images file under a labels name
    with pytest.raises(DataError) as info:
        data.load_idx_dataset("mnist", str(mnist_copy.parent))
    msg = str(info.value)
    assert str(labels) in msg and "magic number 2051" in msg and "need 2049" in msg


def test_wrong_item_count(mnist_copy):
    f = mnist_copy / "t10k-labels-idx1-ubyte.gz"
    _rewrite(f, lambda raw: raw[:4] + struct.pack(">I", 9999) + raw[8:-1])
    with pytest.raises(DataError, match="holds 9999 labels but 10000 are expected"):
        data.load_idx_dataset("mnist", str(mnist_copy.parent))


def test_wrong_checksum_with_intact_structure(mnist_copy):
    f = mnist_copy / "t10k-labels-idx1-ubyte.gz"
    # Change one label to another valid one: every structural check passes,
    # only the MD5 can tell.
    _rewrite(f, lambda raw: raw[:-1] + bytes([(raw[-1] + 1) % 10]))
    with pytest.raises(DataError) as info:
        data.load_idx_dataset("mnist", str(mnist_copy.parent))
    msg = str(info.value)
    assert str(f) in msg and "fails its checksum" in msg
    assert data.MD5["mnist"]["t10k-labels-idx1-ubyte.gz"] in msg


def test_missing_file_and_missing_folder(tmp_path, mnist_copy):
    (mnist_copy / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz is missing; pass --download"):
        data.load_idx_dataset("mnist", str(mnist_copy.parent))
    with pytest.raises(DataError, match="fashion-mnist is not a folder"):
        data.load_idx_dataset("fashion-mnist", str(mnist_copy.parent))
    with pytest.raises(DataError, match="pass --data-dir DIR or set JAXBN_DATA"):
        data.load("mnist", None)


def test_download_without_a_folder_does_not_advise_download():
    # The user already passed --download: the missing piece is the folder.
    for call in (lambda: data.check_present("mnist", None, True),
                 lambda: data.load("mnist", None, download_missing=True)):
        with pytest.raises(DataError, match="pass --data-dir DIR or set JAXBN_DATA") as info:
            call()
        assert "add --download" not in str(info.value)


def test_loading_never_writes_into_the_data_folder(mnist_copy):
    before = {p.name: p.stat().st_mtime_ns for p in mnist_copy.iterdir()}
    data.load("mnist", str(mnist_copy.parent), limit_train=10)
    assert {p.name: p.stat().st_mtime_ns for p in mnist_copy.iterdir()} == before


def _shift_reference(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """One image moved by (dy, dx), pixel by pixel, borders extended."""
    h, w = image.shape[:2]
    out = np.empty_like(image)
    for r in range(h):
        for c in range(w):
            out[r, c] = image[min(max(r + dy, 0), h - 1), min(max(c + dx, 0), w - 1)]
    return out


def test_random_shifts_match_a_pixel_loop():
    rng = np.random.default_rng(3)
    images = rng.standard_normal((6, 7, 5, 2)).astype(np.float32)
    shifted = data.random_shifts(images, 2, np.random.default_rng(9))
    dy, dx = np.random.default_rng(9).integers(-2, 3, size=(2, 6))
    for i in range(6):
        np.testing.assert_array_equal(shifted[i], _shift_reference(images[i], dy[i], dx[i]))
    assert {int(v) for v in np.concatenate([dy, dx])} - {-2, -1, 0, 1, 2} == set()


def test_augmented_batches_are_reproducible_and_resume_mid_epoch():
    x = np.random.default_rng(0).standard_normal((40, 6, 6, 1)).astype(np.float32)
    y = np.arange(40, dtype=np.int32)
    full = list(data.train_batches(x, y, 8, seed=1, epoch=2, max_shift=1))
    again = list(data.train_batches(x, y, 8, seed=1, epoch=2, max_shift=1))
    tail = list(data.train_batches(x, y, 8, seed=1, epoch=2, start=3, max_shift=1))
    for (a, _), (b, _) in zip(full, again):
        np.testing.assert_array_equal(a, b)
    for (a, la), (b, lb) in zip(full[3:], tail):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    plain = list(data.train_batches(x, y, 8, seed=1, epoch=2))
    assert any(not np.array_equal(a, p) for (a, _), (p, _) in zip(full, plain))


def test_augmentation_draws_new_shifts_for_every_batch_epoch_and_seed():
    # Forty copies of one image: batches differ only through their shifts.
    image = np.arange(36, dtype=np.float32).reshape(1, 6, 6, 1)
    x = np.repeat(image, 40, axis=0)
    y = np.zeros(40, np.int32)

    def shifted(seed, epoch):
        return [xb for xb, _ in data.train_batches(x, y, 8, seed=seed, epoch=epoch, max_shift=1)]

    batches = shifted(1, 2)
    assert len(batches) == 5
    for i in range(len(batches)):
        for j in range(i + 1, len(batches)):
            assert not np.array_equal(batches[i], batches[j]), (i, j)
    assert not np.array_equal(batches[0], shifted(1, 3)[0])
    assert not np.array_equal(batches[0], shifted(2, 2)[0])
