"""Datasets: scikit-learn digits (offline) and MNIST / Fashion-MNIST from IDX files.

Every loader returns a :class:`Dataset` of standardized float32 NHWC images
and int32 labels held in host memory; batching is plain numpy indexing with a
permutation that depends only on ``(seed, epoch)``, so any position in a run
can be recreated exactly from those two numbers and a batch index.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import re
import socket
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from train.config import DEFAULT_BASE_URL

NUM_CLASSES = 10

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# Checksums published by the dataset authors (MNIST: LeCun et al.;
# Fashion-MNIST: zalandoresearch/fashion-mnist README).
MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

# Expected IDX shapes: labels (N,), images (N, 28, 28).
EXPECTED_COUNT = {"train": 60000, "test": 10000}
IMAGE_SIDE = 28

LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions


class DataError(Exception):
    """Missing, corrupt or unreadable data; the message names the fix."""


class Dataset(NamedTuple):
    name: str
    x_train: np.ndarray  # (N, H, W, 1) float32, standardized
    y_train: np.ndarray  # (N,) int32
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


# --------------------------------------------------------------------------
# digits


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits with a fixed, stratified 1437/360 split."""
    images, target = _digits_arrays()
    x = (images.astype(np.float32) / 16.0)[..., None]
    y = target.astype(np.int32)
    train_idx, test_idx = _stratified_split(y, every=5, seed=0)
    x_tr, x_te = _standardize(x[train_idx], x[test_idx])
    return Dataset("digits", x_tr, y[train_idx], x_te, y[test_idx])


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    # Read the CSV that ships inside scikit-learn directly: importing
    # sklearn.datasets pulls in scipy and costs seconds of start-up time.
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is not None and path.is_file():
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as _load
    bunch = _load()
    return bunch.images, bunch.target


def _stratified_split(y: np.ndarray, *, every: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ``every``-th example of each class (after a seeded shuffle) is test.

    The seed is fixed on purpose: the split belongs to the benchmark, not to
    the run, so every --seed sees the same test set. Training indices keep
    the shuffled order, so a --limit-train prefix mixes all classes.
    """
    perm = np.random.default_rng(seed).permutation(len(y))
    by_class = perm[np.argsort(y[perm], kind="stable")]
    is_test = np.zeros(len(y), bool)
    is_test[by_class[::every]] = True
    return perm[~is_test[perm]], np.flatnonzero(is_test)


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # One scalar mean/std from the training set only, as is usual for MNIST.
    mean = np.float32(x_train.mean(dtype=np.float64))
    std = np.float32(x_train.std(dtype=np.float64))
    return (x_train - mean) / std, (x_test - mean) / std


# --------------------------------------------------------------------------
# IDX files


def md5_of(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _fix_hint(dataset: str | None) -> str:
    if dataset is None:
        return "re-download it"
    return "re-download it or pass --download"


def parse_idx(raw_gz: bytes, path: str | os.PathLike, *, kind: str,
              count: int | None = None, dataset: str | None = None) -> np.ndarray:
    """Decode one gzip-compressed IDX file, checking everything checkable.

    ``kind`` is ``"labels"`` or ``"images"``; ``count`` the expected number of
    items (None: any). Raises DataError naming ``path`` and the fix.
    """
    fix = _fix_hint(dataset)
    try:
        raw = gzip.decompress(raw_gz)
    except EOFError:
        raise DataError(f"{path} is truncated (the gzip stream ends early); {fix}") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
        raise DataError(f"{path} is not a valid gzip file ({e}); {fix}") from None

    magic = LABELS_MAGIC if kind == "labels" else IMAGES_MAGIC
    ndim = 1 if kind == "labels" else 3
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path} is truncated (expected at least {header} header bytes after "
            f"decompression, got {len(raw)}); {fix}")
    (found_magic,) = struct.unpack(">I", raw[:4])
    if found_magic != magic:
        what = {LABELS_MAGIC: "a labels file", IMAGES_MAGIC: "an images file"}.get(
            found_magic, "not an IDX file of unsigned bytes")
        raise DataError(
            f"{path} has magic number {found_magic} but {kind} need {magic} "
            f"(this is {what}); {fix}")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    if count is not None and dims[0] != count:
        raise DataError(f"{path} holds {dims[0]} {kind} but {count} are expected; {fix}")
    if kind == "images" and tuple(dims[1:]) != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(
            f"{path} holds images of {dims[1]}x{dims[2]} pixels, expected "
            f"{IMAGE_SIDE}x{IMAGE_SIDE}; {fix}")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "too long"
        raise DataError(
            f"{path} is {state} (expected {expected} bytes after decompression, "
            f"got {len(raw)}); {fix}")
    array = np.frombuffer(raw, np.uint8, offset=header).reshape(dims)
    if kind == "labels" and array.size and int(array.max()) >= NUM_CLASSES:
        raise DataError(f"{path} has label {int(array.max())}, expected 0..9; {fix}")
    return array


def read_idx(path: str | os.PathLike, *, kind: str, count: int | None = None,
             md5: str | None = None, dataset: str | None = None) -> np.ndarray:
    """Read, validate and (if ``md5`` is given) checksum one IDX .gz file."""
    path = Path(path)
    try:
        raw_gz = path.read_bytes()
    except FileNotFoundError:
        hint = "pass --download to fetch it" if dataset else "check the path"
        raise DataError(f"{path} is missing; {hint}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    # Structure first: a truncated download gets a precise message; the
    # checksum then catches corruption that keeps the structure intact.
    array = parse_idx(raw_gz, path, kind=kind, count=count, dataset=dataset)
    if md5 is not None:
        got = md5_of(raw_gz)
        if got != md5:
            raise DataError(
                f"{path} fails its checksum (MD5 {got}, published {md5}); the file is "
                f"corrupted or not the original; {_fix_hint(dataset)}")
    return array


def resolve_data_dir(data_dir: str | None, dataset: str, *, download: bool = False) -> Path:
    if not data_dir:
        if download:  # typed already: what is missing is where to put the files
            raise DataError(
                f"--download needs a folder to fetch {dataset}/ into: pass --data-dir DIR "
                f"or set JAXBN_DATA")
        raise DataError(
            f"--dataset {dataset} needs its files: pass --data-dir DIR or set JAXBN_DATA "
            f"to a folder holding {dataset}/ (add --download to fetch them)")
    return Path(data_dir).expanduser()


def check_present(dataset: str, data_dir: str | None, download_missing: bool) -> None:
    """Fail fast (before any heavy import) when the files cannot be there."""
    if dataset not in MD5:
        return
    folder = resolve_data_dir(data_dir, dataset, download=download_missing) / dataset
    if download_missing:
        return
    if not folder.is_dir():
        raise DataError(
            f"{folder} is not a folder; point --data-dir (or JAXBN_DATA) at the folder "
            f"holding {dataset}/, or pass --download")
    for fname in IDX_FILES.values():
        if not (folder / fname).is_file():
            raise DataError(f"{folder / fname} is missing; pass --download to fetch it")


def load_idx_dataset(dataset: str, data_dir: str | None) -> Dataset:
    """MNIST or Fashion-MNIST from ``data_dir/<dataset>/`` (checked, standardized)."""
    folder = resolve_data_dir(data_dir, dataset) / dataset
    if not folder.is_dir():
        raise DataError(
            f"{folder} is not a folder; point --data-dir (or JAXBN_DATA) at the folder "
            f"holding {dataset}/, or pass --download")
    arrays = {}
    for key, fname in IDX_FILES.items():
        split, kind = key.split("_")
        arrays[key] = read_idx(folder / fname, kind=kind, count=EXPECTED_COUNT[split],
                               md5=MD5[dataset][fname], dataset=dataset)
    x_tr = (arrays["train_images"].astype(np.float32) / 255.0)[..., None]
    x_te = (arrays["test_images"].astype(np.float32) / 255.0)[..., None]
    x_tr, x_te = _standardize(x_tr, x_te)
    return Dataset(dataset, x_tr, arrays["train_labels"].astype(np.int32),
                   x_te, arrays["test_labels"].astype(np.int32))


# --------------------------------------------------------------------------
# download


def _file_ok(path: Path, md5: str) -> bool:
    try:
        return md5_of(path.read_bytes()) == md5
    except OSError:
        return False


def download(dataset: str, data_dir: str | None, base_url: str | None = None, *,
             timeout: float = 60.0, log=print) -> Path:
    """Fetch missing or corrupt files of ``dataset`` into ``data_dir/dataset/``.

    Each file is streamed into a temporary file beside its target, checked
    against its published MD5, fsynced, then renamed into place, so the
    folder never holds a partial or unverified file under a real name.
    """
    if dataset not in MD5:
        raise DataError(f"--download works for {', '.join(MD5)}, not {dataset}")
    folder = resolve_data_dir(data_dir, dataset, download=True) / dataset
    base = (base_url or DEFAULT_BASE_URL[dataset]).rstrip("/") + "/"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {folder}: {e.strerror or e}") from None
    for fname, md5 in MD5[dataset].items():
        target = folder / fname
        if _file_ok(target, md5):
            continue
        url = base + fname
        log(f"downloading {url}")
        _fetch_verified(url, target, md5, timeout)
    return folder


def _partial_name(target: Path, pid: int) -> Path:
    # The host too: a data folder shared over the network sees other hosts' pids.
    return target.with_name(f".{target.name}.{socket.gethostname()}.{pid}.part")


def _remove_stale_partials(target: Path) -> None:
    """Delete partial downloads of ``target`` left by killed processes of this host.

    A kill cannot be caught, so its partial file stays; a process of this
    host that still runs (another download into the same folder) keeps its own.
    """
    mine = re.compile(rf"^\.{re.escape(target.name)}\.{re.escape(socket.gethostname())}"
                      rf"\.(\d+)\.part$")
    for path in target.parent.iterdir():
        match = mine.match(path.name)
        if match and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's
    return True


def _fetch_verified(url: str, target: Path, md5: str, timeout: float) -> None:
    tmp = None
    try:
        _remove_stale_partials(target)
        tmp = _partial_name(target, os.getpid())
        with open(tmp, "wb") as out:
            digest = _stream(url, out, timeout)
            out.flush()
            os.fsync(out.fileno())
        if digest != md5:
            raise DataError(
                f"downloaded {url} fails its checksum (MD5 {digest}, published {md5}); the "
                f"mirror serves a different file, try another --base-url")
        os.replace(tmp, target)
        tmp = None
        _fsync_dir(target.parent)
    except OSError as e:  # network errors are DataErrors already: this is the folder
        raise DataError(
            f"cannot write into {target.parent}: {e.strerror or e}; point --data-dir (or "
            f"JAXBN_DATA) at a folder you can write, or make room there") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _stream(url: str, out, timeout: float) -> str:
    """Copy ``url`` into the file ``out``; return the MD5 of what was received.

    Network failures raise DataError; a failed write into ``out`` stays an
    OSError, which the caller reports as the folder's.
    """
    digest = hashlib.md5(usedforsecurity=False)
    try:
        resp = urllib.request.urlopen(url, timeout=timeout)
    except OSError as e:  # URLError and HTTPError too
        raise _network_error(url, e) from None
    received = 0
    with resp:
        while True:
            try:
                chunk = resp.read(1 << 20)
            except OSError as e:
                raise _network_error(url, e) from None
            if not chunk:
                break
            digest.update(chunk)
            out.write(chunk)
            received += len(chunk)
    # http.client ends a body cut short as if it were complete; without this
    # a dropped connection would pass for a mirror serving another file.
    # (file:// responses announce no length.)
    missing = getattr(resp, "length", None)
    if missing:
        raise DataError(f"downloading {url} failed: the connection closed after {received} of "
                        f"{received + missing} bytes; try again")
    return digest.hexdigest()


def _network_error(url: str, e: OSError) -> DataError:
    if isinstance(e, urllib.error.HTTPError):
        return DataError(f"downloading {url} failed: HTTP {e.code} {e.reason}; check --base-url")
    reason = getattr(e, "reason", None) or e
    return DataError(f"downloading {url} failed: {reason}; check --base-url and your network")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# entry point and batching


def load(dataset: str, data_dir: str | None = None, *, download_missing: bool = False,
         base_url: str | None = None, limit_train: int | None = None, log=print) -> Dataset:
    """Load ``dataset`` ('digits', 'mnist', 'fashion-mnist'), optionally a train subset."""
    if dataset == "digits":
        if download_missing:
            log("note: digits ships with scikit-learn; --download has nothing to fetch")
        data = load_digits()
    elif dataset in MD5:
        if download_missing:
            download(dataset, data_dir, base_url, log=log)
        data = load_idx_dataset(dataset, data_dir)
    else:
        raise DataError(f"unknown dataset {dataset!r}; choose digits, mnist or fashion-mnist")
    if limit_train is not None:
        data = data._replace(x_train=data.x_train[:limit_train],
                             y_train=data.y_train[:limit_train])
    return data


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of training examples in ``epoch``: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, batch_size: int) -> int:
    # The last partial batch is dropped: batch statistics of a handful of
    # examples (or one) are noise, and a fixed shape means one compilation.
    return n // batch_size


def train_batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                  start: int = 0, max_shift: int = 0
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled full batches of ``epoch``, starting at batch index ``start``.

    ``max_shift > 0`` translates every image by a random whole number of
    pixels in ``[-max_shift, max_shift]`` along each axis; the random draws
    depend only on ``(seed, epoch, batch index)``, so a resumed run sees the
    same images.
    """
    order = epoch_permutation(seed, epoch, len(x))
    for i in range(start, steps_per_epoch(len(x), batch_size)):
        idx = np.sort(order[i * batch_size:(i + 1) * batch_size])
        xb = x[idx]
        if max_shift:
            xb = random_shifts(xb, max_shift, np.random.default_rng([seed, epoch, i, 1]))
        yield xb, y[idx]


def random_shifts(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """NHWC images translated by per-image offsets; edges extend the border pixels."""
    n, h, w, _ = images.shape
    p = max_shift
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
    dy, dx = rng.integers(-p, p + 1, size=(2, n))
    rows = (p + dy)[:, None] + np.arange(h)
    cols = (p + dx)[:, None] + np.arange(w)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every example once, in order; the last batch is zero-padded with a mask."""
    n = len(x)
    for lo in range(0, n, batch_size):
        xb, yb = x[lo:lo + batch_size], y[lo:lo + batch_size]
        valid = len(xb)
        mask = np.ones(batch_size, bool)
        if valid < batch_size:
            pad = batch_size - valid
            xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
            yb = np.concatenate([yb, np.zeros((pad,), yb.dtype)])
            mask[valid:] = False
        yield xb, yb, mask
