"""Corrupt MNIST files: refused with one line naming the file, the folder left as it was.

tests/train/test_data.py checks each DataError message in-process and
test_cli.py one truncated file through a subprocess; these go through the
command line's main() (the text a user sees) and hash the data folder before
and after, also when --download cannot reach its mirror.
"""

import gzip
import hashlib
import shutil
import socket

import pytest


from train.__main__ import main

LABELS = "t10k-labels-idx1-ubyte.gz"  # read last, so every other file is read first


def truncate(folder):
    f = folder / LABELS
    f.write_bytes(f.read_bytes()[:1000])


def wrong_magic(folder):
    # An images file under a labels name (a mix-up when copying files by hand).
    shutil.copyfile(folder / "t10k-images-idx3-ubyte.gz", folder / LABELS)


def wrong_checksum(folder):
    # One label changed to another valid label: only the MD5 can tell.
    f = folder / LABELS
    raw = bytearray(gzip.decompress(f.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10
    f.write_bytes(gzip.compress(bytes(raw)))


def folder_hash(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def refused(capsys, *argv) -> str:
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


CORRUPTIONS = [
    (truncate, "is truncated (the gzip stream ends early); re-download it or pass --download"),
    (wrong_magic, "has magic number 2051 but labels need 2049 (this is an images file)"),
    (wrong_checksum, "fails its checksum (MD5 "),
]


@pytest.mark.parametrize("corrupt, fragment", CORRUPTIONS,
                         ids=[f.__name__ for f, _ in CORRUPTIONS])
def test_corrupt_file_is_refused_by_name_and_nothing_is_written(
        tmp_path, capsys, mnist_copy, corrupt, fragment):
    corrupt(mnist_copy)
    before = folder_hash(mnist_copy)
    line = refused(capsys, "--dataset", "mnist", "--data-dir", mnist_copy.parent,
                   "--out", tmp_path / "out")
    assert line.startswith(f"python -m train: error: {mnist_copy / LABELS} ")
    assert fragment in line
    assert folder_hash(mnist_copy) == before
    assert not (tmp_path / "out").exists()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_failed_download_leaves_the_corrupt_file_and_no_partial_file(
        tmp_path, capsys, mnist_copy):
    wrong_checksum(mnist_copy)
    before = folder_hash(mnist_copy)
    url = f"http://127.0.0.1:{closed_port()}/mnist/"
    line = refused(capsys, "--dataset", "mnist", "--data-dir", mnist_copy.parent, "--download",
                   "--base-url", url, "--out", tmp_path / "out")
    assert line.startswith(f"python -m train: error: downloading {url}{LABELS} failed: ")
    assert "check --base-url and your network" in line
    assert folder_hash(mnist_copy) == before  # no .part file, the old file untouched
