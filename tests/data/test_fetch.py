"""fetch writes person folders from fake downloads; offline it fails with one line. No network."""

import csv
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace
from urllib.error import URLError

import numpy as np
import pytest
import sklearn.datasets
from PIL import Image

import facetag.data.fetch as fetch_mod
from facetag.data.boxes import read_boxes
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
    remote = Remote("lfw-funneled.tgz", ("https://example.invalid/lfw.tgz",),
                    "sha256:" + hashlib.sha256(archive).hexdigest())  # fmt: skip
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
    ) as err:
        fetch("lfw", tmp_path)
    assert str(err.value).endswith(f"(or put lfw-funneled.tgz in {tmp_path / '.cache'})")
    assert _no_tmp_files(tmp_path)
    assert not (tmp_path / ".cache" / "lfw-funneled.tgz").exists()


def test_fetch_lfw_rejects_a_damaged_download(tmp_path, monkeypatch, fake_lfw):
    good = fetch_mod.LFW_FUNNELED
    monkeypatch.setattr(
        fetch_mod, "LFW_FUNNELED", Remote(good.filename, good.urls, "sha256:" + "0" * 64)
    )
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
        fetch_mod.write_file(target, b"new", "olivetti")
    assert target.read_bytes() == b"old complete image"
    assert [p.name for p in target.parent.iterdir()] == ["1.png"]


def test_fetch_rejects_unknown_names(tmp_path):
    with pytest.raises(
        ValueError, match="fetch: expected name 'olivetti', 'lfw', 'wider', 'demo', got 'orl'"
    ):
        fetch("orl", tmp_path)


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


WIDER_RECORDS = {  # as published: trailing blanks, a zero-face photo with its line of zeros
    "0--Parade/0_a.jpg": "2\n10 20 30 40 0 0 0 0 0 0 \n50 60 30 40 0 0 0 1 0 0 \n",
    "0--Parade/0_b.jpg": "0\n0 0 0 0 0 0 0 0 0 0 \n",
    "1--Handshaking/1_c.jpg": "1\n5 6 7 8 1 0 0 0 0 0 \n",
    "1--Handshaking/1_d.jpg": "1\n9 9 9 9 0 0 0 0 0 0 \n",
    "1--Handshaking/1_gone.jpg": "1\n1 1 1 1 0 0 0 0 0 0 \n",  # listed, not in the zip
}
WIDER_GT_TEXT = "".join(f"{n}\n{r}" for n, r in WIDER_RECORDS.items())
WIDER_PHOTOS = {
    "0--Parade/0_a.jpg": _jpeg_bytes(1),
    "0--Parade/0_b.jpg": _jpeg_bytes(2),
    "1--Handshaking/1_c.jpg": _jpeg_bytes(3),
    "1--Handshaking/1_d.jpg": _jpeg_bytes(4),
}


def _mirror(tmp_path: Path, files: dict[str, bytes], sums: bool = True) -> Path:
    """A FACETAG_FETCH_MIRROR folder holding `files`, with their SHA256SUMS if `sums`."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    lines = []
    for name, data in files.items():
        (mirror / name).write_bytes(data)
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    if sums:
        (mirror / "SHA256SUMS").write_text("".join(lines))
    return mirror


def _wider_files() -> dict[str, bytes]:
    photos = {f"WIDER_train/images/{n}": data for n, data in WIDER_PHOTOS.items()}
    photos["WIDER_train/images/../evil.jpg"] = b"owned"
    return {
        "WIDER_train.zip": _zip(photos),
        "wider_face_split.zip": _zip({fetch_mod.WIDER_GT: WIDER_GT_TEXT.encode()}),
    }


def _no_network(monkeypatch):
    def offline(url, timeout):
        raise AssertionError(f"fetch went online for {url} with a mirror set")

    monkeypatch.setattr(fetch_mod, "urlopen", offline)


def test_fetch_wider_writes_a_seeded_sample_and_exactly_its_boxes(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch_mod.MIRROR_ENV, str(_mirror(tmp_path, _wider_files())))
    _no_network(monkeypatch)
    out = fetch("wider", tmp_path / "a", max_images=3, seed=1)
    assert out == tmp_path / "a" / "wider_train"
    written = sorted(str(p.relative_to(out / "images")) for p in (out / "images").rglob("*.jpg"))
    assert len(written) == 3
    assert set(written) <= set(WIDER_PHOTOS)
    for n in written:
        assert (out / "images" / n).read_bytes() == WIDER_PHOTOS[n]
    boxes = read_boxes(out / "wider_face_train_bbx_gt.txt")
    assert sorted(boxes) == written
    # Each photo's record is copied line for line (trailing blanks dropped), in name order.
    expected = "".join(f"{n}\n{WIDER_RECORDS[n]}".replace(" \n", "\n") for n in written)
    assert (out / "wider_face_train_bbx_gt.txt").read_text() == expected
    if "0--Parade/0_a.jpg" in boxes:
        assert [b.invalid for b in boxes["0--Parade/0_a.jpg"]] == [False, True]
    assert not list(tmp_path.rglob("evil.jpg"))
    assert _no_tmp_files(tmp_path / "a")
    # The same seed picks the same photos; 0 takes every photo the zip has.
    assert sorted(read_boxes(fetch("wider", tmp_path / "b", max_images=3, seed=1)
                             / "wider_face_train_bbx_gt.txt")) == written  # fmt: skip
    every = read_boxes(fetch("wider", tmp_path / "c") / "wider_face_train_bbx_gt.txt")
    assert sorted(every) == sorted(WIDER_PHOTOS)
    assert every["0--Parade/0_b.jpg"] == []


def test_a_mirror_without_the_file_is_one_line(tmp_path, monkeypatch):
    mirror = _mirror(tmp_path, {})
    monkeypatch.setenv(fetch_mod.MIRROR_ENV, str(mirror))
    _no_network(monkeypatch)
    with pytest.raises(DataError) as err:
        fetch("wider", tmp_path / "data")
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(
        f"fetch wider: expected WIDER_train.zip in the mirror {mirror} (FACETAG_FETCH_MIRROR), "
        "got No such file or directory; put it there or unset FACETAG_FETCH_MIRROR"
    )
    assert not (tmp_path / "data" / "wider_train").exists()


def test_a_mirror_file_it_does_not_list_must_match_the_publishers_digest(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch_mod.MIRROR_ENV, str(_mirror(tmp_path, _wider_files(), sums=False)))
    _no_network(monkeypatch)
    damaged = (
        r"^fetch wider: expected md5 3fedf70df600\.\.\. for .*mirror/WIDER_train\.zip, "
        r"got [0-9a-f]{12}\.\.\.; the download was damaged"
    )
    with pytest.raises(DataError, match=damaged):
        fetch("wider", tmp_path / "data")
    assert not list((tmp_path / "data" / ".cache").iterdir())


def _tar(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_fetch_demo_lays_out_training_sets_and_a_tagging_test(tmp_path, monkeypatch):
    from facetag.data import demo_data

    lfw: dict[str, bytes] = {}
    for k, person in enumerate(["Al_A", "Bea_B", "Cy_C", "Mo_M"]):  # A-M: training people
        for i in range(1, 10 if person != "Mo_M" else 5):  # Mo_M: too few photos
            lfw[f"lfw_funneled/{person}/{person}_{i:04d}.jpg"] = _jpeg_bytes(10 * k + i)
    held = ["Nia_N", "Oz_O", "Pia_P", "Roy_R", "Sue_S", "Tom_T", "Zed_Z"]
    for k, person in enumerate(held):
        for i in range(1, 5 if person != "Zed_Z" else 3):  # Zed_Z: too few to be chosen
            lfw[f"lfw_funneled/{person}/{person}_{i:04d}.jpg"] = _jpeg_bytes(100 + 10 * k + i)
    sdist = {demo_data._SDIST_PHOTOS + f: _jpeg_bytes(200 + k)
             for k, f in enumerate(demo_data.SDIST_LAYOUT)}  # fmt: skip
    files = {
        **_wider_files(),
        "lfw-funneled.tgz": _tar(lfw),
        "face_recognition-1.3.0.tar.gz": _tar(sdist),
    }
    monkeypatch.setenv(fetch_mod.MIRROR_ENV, str(_mirror(tmp_path, files)))
    _no_network(monkeypatch)
    to = fetch("demo", tmp_path / "demo")
    assert to == tmp_path / "demo"
    # Training people: A-M with 8 photos or more, their first 8; nobody N-Z.
    assert scan_folder(to / "lfw").people == ("Al_A", "Bea_B", "Cy_C")
    assert [p.name for p in scan_folder(to / "lfw").images[0]] == [
        f"Al_A_{i:04d}.jpg" for i in range(1, 9)
    ]
    knn = to / "knn_examples"
    enrolled = scan_folder(knn / "train")
    known = [p for p in enrolled.people if p not in ("obama", "biden")]
    assert len(known) == 4
    assert set(known) <= set(held[:-1])
    with (knn / "expected.csv").open() as f:
        rows = {r["image"]: r["names"] for r in csv.DictReader(f)}
    for person in known:
        assert [p.name for p in enrolled.images[enrolled.people.index(person)]] == [
            f"{person}_0001.jpg",
            f"{person}_0002.jpg",
        ]
        assert rows[f"test/{person}_0003.jpg"] == rows[f"test/{person}_0004.jpg"] == person
    strangers = [i for i, n in rows.items() if n == "unknown"]
    assert len(strangers) == 2
    assert all(Path(s).stem.rsplit("_", 1)[0] not in known for s in strangers)
    assert rows["test/obama2.jpg"] == rows["test/32bit.png"] == "obama"
    assert (knn / "train" / "biden" / "biden.jpg").read_bytes() == _jpeg_bytes(201)
    assert sorted(p.name for p in (knn / "test").iterdir()) == sorted(Path(i).name for i in rows)
    assert len(read_boxes(to / "wider_train" / "wider_face_train_bbx_gt.txt")) == 4
    assert "face_recognition-1.3.0.tar.gz" in (to / "SOURCES.txt").read_text()
    assert _no_tmp_files(to)


def test_fetch_demo_with_too_few_lfw_people_is_one_line(tmp_path, monkeypatch):
    lfw = {f"lfw_funneled/Al_A/Al_A_{i:04d}.jpg": _jpeg_bytes(i) for i in range(1, 9)}
    sdist = _tar({"face_recognition-1.3.0/tests/test_images/obama.jpg": _jpeg_bytes(1)})
    files = {"lfw-funneled.tgz": _tar(lfw), "face_recognition-1.3.0.tar.gz": sdist}
    monkeypatch.setenv(fetch_mod.MIRROR_ENV, str(_mirror(tmp_path, files)))
    _no_network(monkeypatch)
    with pytest.raises(DataError) as err:
        fetch("demo", tmp_path / "demo")
    assert str(err.value).startswith(
        "fetch demo: expected LFW people A-M with 8 photos and 6 people N-Z with 4 in "
    )
    assert str(err.value).endswith("got 1 and 0; delete it and run fetch again")
    assert not (tmp_path / "demo" / "knn_examples").exists()
