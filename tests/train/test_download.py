"""--download against a local HTTP server (never the internet)."""

import errno
import os
import socket
import subprocess
import sys
import threading

import pytest

from train import data
from train.data import DataError


def test_download_fetches_verifies_and_skips_good_files(tmp_path, server, data_dir):
    url, _, requests = server
    target = tmp_path / "data"
    folder = data.download("mnist", str(target), url, log=lambda m: None)
    assert folder == target / "mnist"
    for name in data.MD5["mnist"]:
        assert (folder / name).read_bytes() == (data_dir / "mnist" / name).read_bytes()
    assert sorted(requests) == sorted(f"/mnist/{n}" for n in data.MD5["mnist"])
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]

    # A second call finds every file intact and fetches nothing; a damaged
    # file is fetched again.
    requests.clear()
    data.download("mnist", str(target), url, log=lambda m: None)
    assert requests == []
    broken = folder / "t10k-labels-idx1-ubyte.gz"
    broken.write_bytes(broken.read_bytes()[:100])
    data.download("mnist", str(target), url, log=lambda m: None)
    assert requests == ["/mnist/t10k-labels-idx1-ubyte.gz"]
    assert data.load("mnist", str(target)).x_test.shape == (10000, 28, 28, 1)


def test_download_rejects_a_corrupt_mirror_and_leaves_no_file(tmp_path, server):
    url, served, _ = server
    bad = served / "train-labels-idx1-ubyte.gz"
    bad.chmod(0o644)
    bad.write_bytes(bad.read_bytes()[:-10])
    target = tmp_path / "data"
    with pytest.raises(DataError, match="fails its checksum") as info:
        data.download("mnist", str(target), url, log=lambda m: None)
    assert "train-labels-idx1-ubyte.gz" in str(info.value)
    leftovers = sorted(p.name for p in (target / "mnist").iterdir())
    assert "train-labels-idx1-ubyte.gz" not in leftovers
    assert not [n for n in leftovers if n.endswith(".part")]


def test_download_removes_the_partial_files_of_killed_downloads(tmp_path, server):
    # A SIGKILL cannot be caught: every killed download used to leave its
    # randomly named partial file behind, one more per kill.
    url, _, _ = server
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    name, host = "train-labels-idx1-ubyte.gz", socket.gethostname()
    stale = folder / f".{name}.{host}.{dead.pid}.part"
    live = folder / f".{name}.{host}.{os.getppid()}.part"  # a running download's
    other_host = folder / f".{name}.elsewhere.{dead.pid}.part"  # on a shared folder
    for path in (stale, live, other_host):
        path.write_bytes(b"partial")
    data.download("mnist", str(tmp_path / "data"), url, log=lambda m: None)
    assert sorted(p.name for p in folder.glob(".*")) == sorted([live.name, other_host.name])


def test_download_reports_http_errors(tmp_path, server):
    url, _, _ = server
    with pytest.raises(DataError, match="HTTP 404"):
        data.download("mnist", str(tmp_path / "d"), url.replace("/mnist/", "/nothing/"),
                      log=lambda m: None)


def test_download_reports_unreachable_hosts(tmp_path):
    # Port 9 on localhost: nothing listens, the connection is refused at once.
    with pytest.raises(DataError, match="downloading http://127.0.0.1:9/"):
        data.download("mnist", str(tmp_path / "d"), "http://127.0.0.1:9/", timeout=5,
                      log=lambda m: None)


class _FullDisk:
    """A file opened for writing on a full disk: every write fails."""

    def __init__(self, path, mode):
        open(path, mode).close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_download_into_a_folder_it_cannot_write_names_the_folder(tmp_path, monkeypatch):
    # A shared, read-only dataset folder missing a file; nothing is fetched.
    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(data, "open", read_only, raising=False)  # the module's, not builtins
    folder = tmp_path / "d" / "mnist"
    with pytest.raises(DataError) as info:
        data.download("mnist", str(tmp_path / "d"), "http://127.0.0.1:9/", log=lambda m: None)
    assert str(info.value) == (
        f"cannot write into {folder}: Permission denied; point --data-dir (or JAXBN_DATA) "
        f"at a folder you can write, or make room there")


def test_a_full_disk_during_download_is_not_blamed_on_the_network(tmp_path, server,
                                                                  monkeypatch):
    url, _, _ = server
    monkeypatch.setattr(data, "open", _FullDisk, raising=False)
    folder = tmp_path / "d" / "mnist"
    with pytest.raises(DataError) as info:
        data.download("mnist", str(tmp_path / "d"), url, log=lambda m: None)
    assert str(info.value).startswith(f"cannot write into {folder}: No space left on device;")
    assert not list(folder.iterdir())  # the partial file is removed


def test_download_reports_a_connection_closed_before_the_end(tmp_path):
    # A server that announces more bytes than it sends, then hangs up.
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_short_files():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)

    threading.Thread(target=serve_short_files, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
    try:
        with pytest.raises(DataError, match="closed after 10 of 1000 bytes; try again") as info:
            data.download("mnist", str(tmp_path / "d"), url, timeout=5, log=lambda m: None)
    finally:
        listener.close()
    assert "checksum" not in str(info.value)
    assert not list((tmp_path / "d" / "mnist").glob(".*.part"))


def test_download_from_a_file_url(tmp_path, data_dir):
    # file:// responses have no announced length to check against.
    folder = data.download("mnist", str(tmp_path / "d"), (data_dir / "mnist").as_uri() + "/",
                           log=lambda m: None)
    for name in data.MD5["mnist"]:
        assert (folder / name).read_bytes() == (data_dir / "mnist" / name).read_bytes()
