"""--download against a local HTTP server (never the internet)."""

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
