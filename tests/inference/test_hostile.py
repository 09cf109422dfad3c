"""A hostile photo library (issue 14), made here and never committed, through `facetag enroll`
and `facetag tag` as a user runs them (a process of their own, so its memory is measured):
no traceback, every bad file reported exactly once, every good photo tagged as in a clean run,
originals and foreign files byte-identical, each process under 1.2 GB."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.data.test_scan_formats import write_dng
from tests.detector.conftest import bomb_png
from tests.inference.conftest import pattern, save, write_model

ROOT = Path(__file__).parents[2]
MEMORY_LIMIT = 1.2e9  # bytes, per process (the main one and each decoding worker)
NON_UTF8 = os.fsdecode(b"bad_\xff\xfe_utf8.jpg")  # a name from an old Windows share
LONG = "L" * 248 + ".png"  # 252 bytes: its annotated copy (+ ".jpg") is one too long

# Runs the CLI in this process's own interpreter, then writes its peak memory (its own and
# its decoding workers'). Root reads any folder, so an unreadable one is made by refusing
# os.scandir on it: the same PermissionError a locked folder gives a user.
RUN_SCRIPT = """
import json, os, resource, sys
from pathlib import Path
sys.path.insert(0, {root!r})
real = os.scandir
def scandir(path="."):
    if Path(path).name == "locked":
        raise PermissionError(13, "Permission denied", str(path))
    return real(path)
os.scandir = scandir
from facetag.cli import app
def hwm_kib():
    # This process's own peak. Not RUSAGE_SELF: Linux carries ru_maxrss across execve, so
    # it would report the (larger) pytest process that spawned us.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = 0
try:
    app(sys.argv[1:], prog_name="facetag")
except SystemExit as e:
    code = e.code or 0
with open({rusage!r}, "w") as f:
    json.dump({{
        "self": hwm_kib() * 1024,
        "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }}, f)
sys.exit(code)
"""


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    peak: int  # bytes: the largest of the process and its workers
    seconds: float
    main: int = 0  # bytes: the process's own peak
    workers: int = 0  # bytes: its largest child's (decoding workers, compile workers)


def run_cli(tmp: Path, *args: str) -> Run:
    import time

    rusage = tmp / "rusage.json"
    script = RUN_SCRIPT.format(root=str(ROOT), rusage=str(rusage))
    start = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        env={**os.environ, "COLUMNS": "200"},
        cwd=tmp,
        timeout=600,
    )
    seconds = time.monotonic() - start
    usage = json.loads(rusage.read_text())
    out = p.stdout.decode("utf-8", "surrogateescape")
    err = p.stderr.decode("utf-8", "surrogateescape")
    peak = max(usage["self"], usage["children"])
    return Run(p.returncode, out, err, peak, seconds, usage["self"], usage["children"])


def _jpeg_with_corrupt_exif(path: Path, pixels: np.ndarray) -> None:
    # An IFD offset far past the block: Pillow's "Corrupt EXIF data" territory.
    Image.fromarray(pixels).save(path, quality=95, exif=b"Exif\x00\x00II*\x00\xff\xff\x00\x00bad")


def _png_with_late_exif(path: Path, pixels: np.ndarray, orientation: int) -> None:
    """A PNG whose eXIf chunk comes after the image data."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    exif = Image.Exif()
    exif[0x0112] = orientation
    body = exif.tobytes()
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + body))
    data = buf.getvalue()
    end = data.rindex(b"IEND") - 4
    path.write_bytes(data[:end] + chunk + data[end:])


def _huge_16bit_png(path: Path, side: int = 10_000) -> None:
    """side x side 16-bit grey (100 megapixels at 10,000): 200 MB decoded, ~1 MB stored."""
    row = (np.arange(side, dtype=np.uint32) * 6 % 65536).astype(np.uint16)
    Image.fromarray(np.ascontiguousarray(np.broadcast_to(row, (side, side)))).save(
        path, compress_level=1
    )


@dataclass
class Library:
    people: Path
    lib: Path
    good: list[str]  # photos to tag, relative to lib (as str: some are not UTF-8)
    bad: dict[str, str]  # relative name -> a piece of its one report line
    enroll_bad: dict[str, str] = field(default_factory=dict)
    unread: dict[str, int] = field(default_factory=dict)
    hidden: int = 0


def build_library(root: Path) -> Library:
    """Every class of issue 14 (the XMP sidecar ones aside, another engineer's), in a tree."""
    people = root / "people"
    save(people / "Alice" / "1.png", pattern(1))
    save(people / "Alice" / NON_UTF8.replace(".jpg", ".png"), pattern(1)[::-1].copy())
    save(people / "Bob" / "1.png", pattern(2))
    Image.fromarray(pattern(2)).save(
        people / "Bob" / "scan.tif", save_all=True, append_images=[Image.new("RGB", (32, 32))]
    )
    (people / "Carol").mkdir()
    Image.fromarray(pattern(3)).save(people / "Carol" / "phone.HEIC", quality=95)
    (people / "Bob" / "broken.jpg").write_text("not a photo")
    os.mkfifo(people / "Bob" / "pipe.jpg")
    (people / "Alice" / "dangling.jpg").symlink_to(people / "gone.jpg")
    (people / "Alice" / "notes.txt").write_text("who is who")
    (people / "Dave").mkdir()
    save(people / "stray.png", pattern(4))
    enroll_bad = {
        "Bob/broken.jpg": "got a file that is not one",
        "Bob/pipe.jpg": "a named pipe (FIFO)",
        "Alice/dangling.jpg": "a link to nothing",
        "Dave": "expected photos of Dave, got none",
        "stray.png": "expected photos inside person folders",
    }

    lib = root / "lib"
    good: list[str] = []

    def keep(rel: str, pixels: np.ndarray) -> None:
        save(lib / rel, pixels)
        good.append(rel)

    keep("a.png", pattern(1))
    keep("b.png", pattern(2))
    keep("stranger.png", pattern(9))
    keep(NON_UTF8, pattern(1))
    keep("cr\rname.png", pattern(2))
    keep(LONG, pattern(3))
    keep("album.jpg/f.png", pattern(5))  # a folder named like a photo: walked (--recursive)
    keep("sub/d.png", pattern(6))
    keep("x.jpg", pattern(7))
    Image.fromarray(pattern(2)).save(
        lib / "scan.tif", save_all=True, append_images=[Image.new("RGB", (32, 32))]
    )
    Image.fromarray(pattern(1)).save(lib / "phone.HEIC", quality=95)
    _jpeg_with_corrupt_exif(lib / "corrupt_exif.jpg", pattern(2))
    _png_with_late_exif(lib / "late_exif.png", pattern(3), orientation=6)
    write_dng(lib / "cam.dng")
    _huge_16bit_png(lib / "huge.png")
    (lib / "link.png").symlink_to(lib / "a.png")  # tagged under its own path
    good += ["scan.tif", "phone.HEIC", "corrupt_exif.jpg", "late_exif.png", "cam.dng"]
    good += ["huge.png", "link.png"]
    # --annotate lib/a: a folder of the user's own photos inside the tagged tree.
    save(lib / "a" / "x.jpg", pattern(8))
    save(lib / "a" / "mine.png", pattern(8))

    good_bytes = (lib / "a.png").read_bytes()
    (lib / "truncated.png").write_bytes(good_bytes[: len(good_bytes) // 2])
    (lib / "text.jpg").write_text("not an image")
    (lib / "empty.jpg").write_bytes(b"")
    os.mkfifo(lib / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(lib / "sock.jpg"))
    sock.close()
    (lib / "dangling.jpg").symlink_to(lib / "gone.jpg")
    (lib / "loop.jpg").symlink_to(lib / "loop.jpg")
    (lib / "zero.jpg").symlink_to("/dev/zero")
    (lib / "null.jpg").symlink_to("/dev/null")
    (lib / "linkdir").symlink_to(lib / "sub")
    save(lib / "locked" / "e.png", pattern(10))
    bomb_png(lib / "bomb.png")
    (lib / "notes.txt").write_text("holiday 2004")
    (lib / "clip.mov").write_bytes(b"\x00\x00\x00\x18ftypqt  ")
    (lib / ".DS_Store").write_bytes(b"\x00Bud1")
    save(lib / ".thumbnails" / "t.png", pattern(1))
    bad = {
        "truncated.png": "truncated or corrupt",
        "text.jpg": "got a file that is not one",
        "empty.jpg": "empty file",
        "pipe.jpg": "a named pipe (FIFO)",
        "sock.jpg": "a socket",
        "dangling.jpg": "a link to nothing",
        "loop.jpg": "a symlink loop",
        "zero.jpg": "a device",
        "null.jpg": "a device",
        "linkdir": "a link to a folder; not followed",
        "locked": "expected a readable folder, got Permission denied",
        "bomb.png": "decompression bomb",
        # outputs refused, the photo itself tagged:
        "a/x.jpg": "got another file; left unchanged",
        "a/" + LONG + ".jpg": "a name too long for the filesystem",
    }
    return Library(
        people,
        lib,
        sorted(good, key=os.fsencode),
        bad,
        enroll_bad,
        unread={".mov": 1, ".txt": 1},
        hidden=2,
    )


def _files(folder: Path) -> dict[str, str]:
    """sha256 of every regular file below folder (links and specials left out)."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            p = Path(dirpath) / name
            if p.is_symlink() or not p.is_file():
                continue
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _results(doc: dict, lib: Path) -> dict[str, list]:
    return {
        str(Path(im["path"]).relative_to(lib)): [
            (f["box"], f["name"], f["distance"]) for f in im["faces"]
        ]
        for im in doc["images"]
    }


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _once(lines: list[str], root: Path, expected: dict[str, str]) -> None:
    """Each expected problem in exactly one line, that line saying what it is, and no line
    for anything else."""
    for rel, what in expected.items():
        where = str(root / rel)
        mine = [line for line in lines if f"{where}:" in line or f"{where} " in line]
        assert len(mine) == 1, (rel, mine)
        assert what in mine[0], (rel, mine[0])
    assert len(lines) == len(expected), "\n".join(lines)


@pytest.mark.skipif(sys.platform != "linux", reason="FIFOs, sockets and /dev/zero links")
def test_hostile_library_through_enroll_and_tag(tmp_path: Path):
    L = build_library(tmp_path)
    model = write_model(tmp_path / "model.pt", threshold=0.005)
    before = _files(L.lib)
    before_people = _files(L.people)
    common = ["--model", str(model), "--detector", "none", "--device", "cpu", "--workers", "2"]

    e = run_cli(tmp_path, "enroll", str(L.people), "--gallery", str(tmp_path / "g.json"), *common)
    assert "Traceback" not in e.stderr + e.stdout, e.stderr
    assert e.code == 0, e.stderr
    assert "3 people, 5 photos (5 embedded" in e.stdout
    assert "not read: 1 files of kinds facetag does not read (.txt 1)" in e.stdout
    warnings = [line for line in e.stderr.splitlines() if line.startswith("warning: ")]
    _once([w.replace("warning: ", "error: ", 1) for w in warnings], L.people, L.enroll_bad)
    assert "No CUDA runtime" not in e.stderr

    out = tmp_path / "out"
    args = ["tag", str(L.lib), "--recursive", "--gallery", str(tmp_path / "g.json"), *common]
    t = run_cli(
        tmp_path, *args, "--json", "--csv", str(out / "tags.csv"), "--annotate", str(L.lib / "a")
    )
    assert "Traceback" not in t.stderr + t.stdout, t.stderr
    assert t.code == 1, t.stderr  # the bad files are failures
    _once(_errors(t.stderr), L.lib, L.bad)
    noise = [
        line
        for line in t.stderr.splitlines()
        if not line.startswith(("error: ", "device: ", "photos ", "not read: "))
    ]
    assert noise == []  # no Pillow EXIF warning, no torch CUDA line, nothing unnamed
    assert "not read: 2 files of kinds facetag does not read (.mov 1, .txt 1)" in t.stderr
    doc = json.loads(t.stdout)
    assert doc["not_read"] == {"unread": L.unread, "hidden": L.hidden}
    got = _results(doc, L.lib)
    assert list(got) == L.good  # each good photo once, in byte order, the link as itself
    assert all(len(faces) == 1 for faces in got.values())

    # Every good photo tagged as in a clean run of only the good photos (no outputs asked).
    clean = tmp_path / "clean"
    for rel in L.good:
        (clean / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(L.lib / rel, clean / rel)
    c = run_cli(
        tmp_path,
        "tag",
        str(clean),
        "--recursive",
        "--gallery",
        str(tmp_path / "g.json"),
        *common,
        "--json",
    )
    assert c.code == 0, c.stderr
    assert _results(json.loads(c.stdout), clean) == got
    names = {rel: faces[0][1] for rel, faces in got.items()}
    assert names["a.png"] == names["link.png"] == names[NON_UTF8] == "Alice"
    assert names["b.png"] == names["scan.tif"] == "Bob"
    assert names["phone.HEIC"] == "Alice"
    assert names["stranger.png"] is None

    # Originals and foreign files byte-identical; our copies only where nothing was.
    after = _files(L.lib)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {
        f"a/{rel}.jpg" if not rel.endswith(".jpg") else f"a/{rel}"
        for rel in L.good
        if rel not in ("x.jpg", LONG)
    }
    assert _files(L.people) == before_people

    with (out / "tags.csv").open(encoding="utf-8", errors="surrogateescape", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(str(L.lib / rel) for rel in L.good)
    assert (L.lib / NON_UTF8).is_file()  # the CSV's path opens the photo

    # Memory: the enrol, the tag run and its workers, each under the limit.
    for r in (e, t, c):
        assert r.peak < MEMORY_LIMIT, r.peak

    # A rerun resumes every photo (the non-UTF-8 name included) and says the same once.
    again = run_cli(
        tmp_path, *args, "--json", "--csv", str(out / "tags.csv"), "--annotate", str(L.lib / "a")
    )
    assert "Traceback" not in again.stderr, again.stderr
    assert _results(json.loads(again.stdout), L.lib) == got
    _once(_errors(again.stderr), L.lib, L.bad)
    manifest = (out / "facetag-manifest.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(manifest) == 1 + len(L.good)

    measured = {
        "files": sum(1 for _ in L.lib.rglob("*")),
        "good": len(L.good),
        "reported": len(_errors(t.stderr)),
        "tagged": len(doc["images"]),
        "enroll_peak_mib": [round(e.main / 2**20), round(e.workers / 2**20)],
        "tag_peak_mib": [round(t.main / 2**20), round(t.workers / 2**20)],
        "clean_tag_peak_mib": [round(c.main / 2**20), round(c.workers / 2**20)],
        "tag_seconds": round(t.seconds, 1),
        "enroll_seconds": round(e.seconds, 1),
    }
    print("hostile library:", json.dumps(measured))


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from facetag.inference.align import WholePhotoDetector
from facetag.inference.enroll import enroll
from facetag.inference.tag import TagOptions, tag_photos
from tests.inference.conftest import make_models

class Slow(WholePhotoDetector):
    def detect(self, image):
        time.sleep(0.1)  # 12 photos to enrol take >= 1.2 s, 24 to tag >= 2.4 s
        return super().detect(image)

models = make_models(Path({model!r}), Slow(), threshold=0.005)
Path({ready!r}).write_text("ready")
if {job!r} == "enroll":
    enroll(Path({people!r}), Path({gallery!r}), models, batch_size=2)
else:
    tag_photos([Path({lib!r})], Path({gallery!r}), models, TagOptions(
        recursive=True, batch_size=2, csv=Path({csv!r}), annotate=Path({annotate!r})))
"""


def _kill_at_random(script: str, ready: Path, delay: float, cwd: Path) -> bool:
    """Start the job, kill -9 it ``delay`` s after its models are loaded; True when it was
    still running then (the kill landed mid-job)."""
    import signal
    import time

    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=cwd, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    running = proc.poll() is None
    if running:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return running


@pytest.mark.skipif(sys.platform != "linux", reason="FIFOs, sockets and kill -9")
def test_kill_9_at_random_moments_during_enroll_and_tag_loses_nothing(tmp_path: Path):
    import random

    from facetag.inference.align import WholePhotoDetector
    from facetag.inference.enroll import enroll
    from facetag.inference.gallery import load_gallery
    from facetag.inference.tag import TagOptions, tag_photos
    from tests.inference.conftest import make_models

    rng = random.Random(14)
    people = tmp_path / "people"
    for k in range(12):  # 12 photos of 3 people, a non-UTF-8 name among them
        name = NON_UTF8.replace(".jpg", f"{k}.png") if k == 5 else f"{k}.png"
        save(people / "ABC"[k % 3] / name, pattern(k % 3 + 1))
    (people / "A" / "broken.jpg").write_text("no")
    os.mkfifo(people / "B" / "pipe.jpg")
    lib = tmp_path / "lib"
    for k in range(24):
        name = NON_UTF8.replace(".jpg", f"{k}.png") if k == 7 else f"{k:02d}.png"
        save(lib / ("sub" if k % 5 == 0 else "") / name, pattern(k % 4 + 1))
    (lib / "truncated.png").write_bytes((lib / "01.png").read_bytes()[:40])
    os.mkfifo(lib / "pipe.jpg")
    model = write_model(tmp_path / "model.pt")
    originals = _files(lib)
    fmt = {
        "root": str(ROOT),
        "model": str(model),
        "ready": str(tmp_path / "ready"),
        "people": str(people),
        "lib": str(lib),
        "gallery": str(tmp_path / "g.json"),
        "csv": str(tmp_path / "out" / "tags.csv"),
        "annotate": str(tmp_path / "annotated"),
    }
    models = make_models(model, WholePhotoDetector(), threshold=0.005)

    # enroll: a kill at any moment leaves no gallery or a whole one; a rerun finishes it.
    script = KILL_SCRIPT.format(job="enroll", **fmt)
    landed = 0
    for _ in range(3):
        landed += _kill_at_random(script, tmp_path / "ready", rng.uniform(0.0, 0.9), tmp_path)
        if (tmp_path / "g.json").exists():
            load_gallery(tmp_path / "g.json")  # parses: never half written
    enroll(people, tmp_path / "g.json", models)
    clean = enroll(people, tmp_path / "clean.json", models)
    assert landed == 3  # each before the end: 0.9 s < 1.2 s of work
    a = load_gallery(tmp_path / "g.json").to_json()
    b = load_gallery(tmp_path / "clean.json").to_json()
    assert a["people"] == b["people"]
    assert a["skipped"] == b["skipped"]
    assert clean.photos == 12

    # tag: three kills at random moments, then a run to the end.
    script = KILL_SCRIPT.format(job="tag", **fmt)
    landed = 0
    for _ in range(3):
        landed += _kill_at_random(script, tmp_path / "ready", rng.uniform(0.0, 0.7), tmp_path)
    assert landed == 3  # 3 x 0.7 s < 2.4 s of work, even counting what each kept
    opts = TagOptions(
        recursive=True, csv=tmp_path / "out" / "tags.csv", annotate=tmp_path / "annotated"
    )
    final = tag_photos([lib], tmp_path / "g.json", models, opts)
    assert final.resumed > 0  # the killed runs' work was kept
    plain = tag_photos([lib], tmp_path / "g.json", models, TagOptions(recursive=True, resume=False))
    assert final.doc["images"] == plain.doc["images"]
    assert len(final.doc["images"]) == 24
    assert final.failed == plain.failed == 2  # the truncated file and the FIFO, once each
    with (tmp_path / "out" / "tags.csv").open(errors="surrogateescape", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(im["path"] for im in plain.doc["images"])
    lines = (tmp_path / "out" / "facetag-manifest.jsonl").read_text().splitlines()
    paths = [json.loads(line)["path"] for line in lines[1:]]
    assert len(paths) == len(set(paths)) == 24
    for im in final.doc["images"]:  # every annotated copy whole
        rel = Path(im["path"]).relative_to(lib)
        with Image.open(tmp_path / "annotated" / (str(rel) + ".jpg")) as copy:
            copy.load()
    assert _files(lib) == originals
