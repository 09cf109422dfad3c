"""fetch writes person folders from fake downloads; offline it fails with one line. No network."""

import hashlib
import io
import tarfile
from pathlib import Path
from types import SimpleNamespace
from urllib.error import URLError

import numpy as np
import pytest
import sklearn.datasets
from PIL import Image

import facetag.data.fetch as fetch_mod
from facetag.data.fetch import Remote, fetch
from facetag.data.folders import scan_folder
from facetag.errors import DataError


def _no_tmp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith((".tmp", ".part"))]


def test_fetch_olivetti_writes_person_folders(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.random((20, 64, 64), dtype=np.float32)  # (N, H, W) in [0, 1] like sklearn
    target = np.repeat(np.arange(2), 10)
    calls = []

    def fake_fetch(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(images=images, target=target)

    monkeypatch.setattr(sklearn.datasets, "fetch_olivetti_faces", fake_fetch)
    progress = []
    out = fetch("olivetti", tmp_path, on_progress=lambda done, total: progress.append(done))
    assert out == tmp_path / "olivetti"
    assert calls[0]["data_home"] == str(tmp_path / ".cache" / "sklearn")
    folder = scan_folder(out)
    assert folder.people == ("s1", "s2")
    assert sorted(p.name for p in folder.images[1]) == sorted(f"{k}.png" for k in range(1, 11))
    second = np.asarray(Image.open(out / "s2" / "3.png"))
    np.testing.assert_array_equal(second, np.rint(images[12] * 255).astype(np.uint8))
    assert progress[-1] == 20
    assert _no_tmp_files(tmp_path)


def test_fetch_olivetti_offline_is_one_line_with_the_fix(tmp_path, monkeypatch):
    def offline(**kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(sklearn.datasets, "fetch_olivetti_faces", offline)
    with pytest.raises(DataError) as err:
        fetch("olivetti", tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        "fetch olivetti: cannot download ([Errno -3] Temporary failure in name resolution; "
        "no network?); point facetag at a local copy instead, e.g. --data ../shared/data/orl "
        "or FACETAG_DATA_DIR=../shared/data"
    )
    assert not (tmp_path / "olivetti").exists()


def _jpeg_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buf, format="JPEG")
    return buf.getvalue()


def _fake_lfw_archive() -> bytes:
    """lfw_funneled/<Name>/<Name>_NNNN.jpg entries plus hostile and irrelevant ones."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("lfw_funneled/Ann_Lee/Ann_Lee_0001.jpg", _jpeg_bytes(10))
        add("lfw_funneled/Ann_Lee/Ann_Lee_0002.jpg", _jpeg_bytes(20))
        add("lfw_funneled/Bo_Solo/Bo_Solo_0001.jpg", _jpeg_bytes(30))
        add("lfw_funneled/../evil.jpg", b"owned")
        add("lfw_funneled/pairs.txt", b"10\t300\n")
        link = tarfile.TarInfo("lfw_funneled/Ann_Lee/Ann_Lee_0003.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    return buf.getvalue()


class _Response(io.BytesIO):
    """What urlopen returns, enough for _download: read(), headers, a context manager."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


@pytest.fixture
def fake_lfw(monkeypatch):
    archive = _fake_lfw_archive()
    remote = Remote("lfw-funneled.tgz", "https://example.invalid/lfw.tgz",
                    hashlib.sha256(archive).hexdigest())  # fmt: skip
    monkeypatch.setattr(fetch_mod, "LFW_FUNNELED", remote)
    opened = []

    def fake_urlopen(url, timeout):
        opened.append(url)
        return _Response(archive)

    monkeypatch.setattr(fetch_mod, "urlopen", fake_urlopen)
    return opened


def test_fetch_lfw_writes_people_with_enough_photos(tmp_path, fake_lfw):
    out = fetch("lfw", tmp_path / "data", min_images=2)
    assert out == tmp_path / "data" / "lfw"
    folder = scan_folder(out)
    assert folder.people == ("Ann_Lee",)
    assert [p.name for p in folder.images[0]] == ["Ann_Lee_0001.jpg", "Ann_Lee_0002.jpg"]
    assert (out / "Ann_Lee" / "Ann_Lee_0001.jpg").read_bytes() == _jpeg_bytes(10)
    assert not (tmp_path / "data" / "evil.jpg").exists()
    assert not list(tmp_path.rglob("evil.jpg"))
    assert _no_tmp_files(tmp_path)
    # The verified archive is cached: a second fetch downloads nothing.
    assert fetch("lfw", tmp_path / "data", min_images=1) == out
    assert fake_lfw == ["https://example.invalid/lfw.tgz"]
    assert scan_folder(out).people == ("Ann_Lee", "Bo_Solo")


def test_fetch_lfw_offline_is_one_line_with_the_fix(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(fetch_mod, "urlopen", offline)
    with pytest.raises(
        DataError,
        match=r"^fetch lfw: cannot download \(.*no network\?\); "
        r"point facetag at a local copy instead, e.g. --data ../shared/data/lfw",
    ):
        fetch("lfw", tmp_path)
    assert _no_tmp_files(tmp_path)
    assert not (tmp_path / ".cache" / "lfw-funneled.tgz").exists()


def test_fetch_lfw_rejects_a_damaged_download(tmp_path, monkeypatch, fake_lfw):
    good = fetch_mod.LFW_FUNNELED
    monkeypatch.setattr(fetch_mod, "LFW_FUNNELED", Remote(good.filename, good.url, "0" * 64))
    with pytest.raises(DataError, match=r"fetch lfw: expected sha256 000000000000\.\.\. for "):
        fetch("lfw", tmp_path)
    assert not list((tmp_path / ".cache").iterdir())


def test_interrupted_write_leaves_no_half_file(tmp_path, monkeypatch):
    target = tmp_path / "s1" / "1.png"
    target.parent.mkdir()
    target.write_bytes(b"old complete image")

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fetch_mod.os, "replace", crash)
    with pytest.raises(DataError, match=r"1\.png, got No space left on device; free some disk"):
        fetch_mod._write_atomic(target, b"new", "olivetti")
    assert target.read_bytes() == b"old complete image"
    assert [p.name for p in target.parent.iterdir()] == ["1.png"]


def test_fetch_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="fetch: expected name 'olivetti' or 'lfw', got 'orl'"):
        fetch("orl", tmp_path)
