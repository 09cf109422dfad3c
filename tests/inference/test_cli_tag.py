"""`facetag enroll`, `facetag tag` and `facetag bench tag` through the CLI (--detector none)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from facetag.cli import app
from facetag.inference.xmp import read_regions
from tests.inference.conftest import pattern, save, write_model


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"}, prog_name="facetag")


@pytest.fixture
def setup(tmp_path: Path, people: Path) -> dict[str, str]:
    model = write_model(tmp_path / "model.pt", threshold=1e-3)
    save(tmp_path / "photos" / "a.png", pattern(1))
    save(tmp_path / "photos" / "b.png", pattern(2))
    save(tmp_path / "photos" / "c.png", pattern(3))
    return {
        "people": str(people),
        "model": str(model),
        "gallery": str(tmp_path / "g.json"),
        "photos": str(tmp_path / "photos"),
        "tmp": str(tmp_path),
    }


def test_enroll_then_tag_json(setup: dict[str, str]):
    s = setup
    r = invoke(
        "enroll",
        s["people"],
        "--gallery",
        s["gallery"],
        "--model",
        s["model"],
        "--detector",
        "none",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    assert "2 people, 2 photos (2 embedded" in r.stdout
    r = invoke(
        "tag",
        s["photos"],
        "--gallery",
        s["gallery"],
        "--model",
        s["model"],
        "--detector",
        "none",
        "--json",
        "--csv",
        f"{s['tmp']}/out/t.csv",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [f["name"] for im in doc["images"] for f in im["faces"]] == ["Alice", "Bob", None]
    assert doc["model"]["threshold_source"] == "model file"
    assert doc["model"]["threshold"] == 1e-3
    assert "device: cpu" in r.stderr or "device: cuda" in r.stderr
    again = invoke(
        "tag",
        s["photos"],
        "--gallery",
        s["gallery"],
        "--model",
        s["model"],
        "--detector",
        "none",
        "--csv",
        f"{s['tmp']}/out/t.csv",
    )
    assert again.exit_code == 0, again.output
    assert "a.png: Alice" in again.stdout


def test_tag_with_missing_gallery_is_one_line(setup: dict[str, str]):
    r = invoke(
        "tag",
        setup["photos"],
        "--gallery",
        f"{setup['tmp']}/none.json",
        "--model",
        setup["model"],
        "--detector",
        "none",
    )
    assert r.exit_code == 1
    assert r.stderr.count("error:") == 1
    assert "expected a gallery file, got no such file; create it with facetag enroll" in r.stderr


def test_tag_with_bad_photo_reports_it_and_exits_1(setup: dict[str, str]):
    s = setup
    assert (
        invoke(
            "enroll",
            s["people"],
            "--gallery",
            s["gallery"],
            "--model",
            s["model"],
            "--detector",
            "none",
        ).exit_code
        == 0
    )
    Path(s["photos"], "broken.jpg").write_text("no")
    r = invoke(
        "tag",
        s["photos"],
        "--gallery",
        s["gallery"],
        "--model",
        s["model"],
        "--detector",
        "none",
        "--manifest",
        f"{s['tmp']}/m.jsonl",
    )
    assert r.exit_code == 1
    assert "broken.jpg: expected an image" in r.stderr
    assert "b.png: Bob" in r.stdout


def test_tag_xmp_unknown_and_sidecar_name(setup: dict[str, str]):
    s = setup
    args = ("--gallery", s["gallery"], "--model", s["model"], "--detector", "none")
    assert invoke("enroll", s["people"], *args).exit_code == 0
    photos = Path(s["photos"])
    digikam = photos / "b.png.xmp"  # a person named b.png's face already, in digiKam
    digikam.write_text(
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
        'xmlns:mwg-rs="http://www.metadataworkinggroup.com/schemas/regions/" '
        'xmlns:stArea="http://ns.adobe.com/xmp/sType/Area#"><mwg-rs:Regions '
        'rdf:parseType="Resource"><mwg-rs:RegionList><rdf:Bag><rdf:li '
        'rdf:parseType="Resource"><mwg-rs:Name>Robert</mwg-rs:Name><mwg-rs:Area '
        'stArea:x="0.5" stArea:y="0.5" stArea:w="1" stArea:h="1"/></rdf:li></rdf:Bag>'
        "</mwg-rs:RegionList></mwg-rs:Regions></rdf:Description></rdf:RDF></x:xmpmeta>",
        encoding="utf-8",
    )
    r = invoke("tag", s["photos"], *args, "--xmp-unknown", "--sidecar-name", "photo.xmp")
    assert r.exit_code == 0, r.output
    assert "note: " in r.stderr
    assert "kept 'Robert' from b.png.xmp" in r.stderr
    assert "error:" not in r.stderr
    size = (32, 32)
    assert [x.name for x in read_regions(photos / "a.xmp", size)] == ["Alice"]
    assert [x.name for x in read_regions(photos / "c.xmp", size)] == [None]  # unknown
    assert not (photos / "b.xmp").exists()  # Robert's face: no second region
    assert not (photos / "a.png.xmp").exists()
    bad = invoke("tag", s["photos"], *args, "--xmp", "--sidecar-name", "x.xmp")
    assert bad.exit_code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_gpu_fails_clearly(setup: dict[str, str]):
    r = invoke(
        "tag",
        setup["photos"],
        "--gallery",
        setup["gallery"],
        "--model",
        setup["model"],
        "--detector",
        "none",
        "--device",
        "cuda",
    )
    assert r.exit_code == 1
    assert "--device cuda: expected a CUDA GPU, got none" in r.stderr


def test_threshold_out_of_range_is_a_usage_error(setup: dict[str, str]):
    r = invoke("tag", setup["photos"], "--gallery", setup["gallery"], "--threshold", "3")
    assert r.exit_code == 2


def test_missing_model_file_is_one_line(setup: dict[str, str]):
    r = invoke(
        "enroll",
        setup["people"],
        "--gallery",
        setup["gallery"],
        "--model",
        f"{setup['tmp']}/nope.pt",
        "--detector",
        "none",
    )
    assert r.exit_code == 1
    assert "nope.pt" in r.stderr


def test_bench_tag_reports_photos_per_second(setup: dict[str, str]):
    r = invoke(
        "bench",
        "tag",
        setup["photos"],
        "--model",
        setup["model"],
        "--detector",
        "none",
        "--repeats",
        "1",
        "--json",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["photos"] == 3
    assert out["photos_per_s"] > 0


def test_evaluate_pairs_runs_the_pipeline_on_people_n_to_z(tmp_path: Path):
    model = write_model(tmp_path / "model.pt", threshold=0.5)
    root = tmp_path / "lfw"
    for k, name in enumerate(["Anna_A", "Nina_N", "Oscar_O", "Paul_P"]):
        for shot in range(3):
            save(root / name / f"{shot}.png", pattern(10 * k + (shot > 0)))
    r = invoke(
        "evaluate",
        "--pairs",
        str(root),
        "--model",
        str(model),
        "--detector",
        "none",
        "--device",
        "cpu",
        "--json",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["people"], doc["photos"], doc["no_face"]) == (3, 9, 0)  # Anna is A-M
    assert (doc["same_pairs"], doc["pairs"]) == (9, 18)
    assert 0.0 <= doc["accuracy_10fold"] <= 1.0
    bad = invoke("evaluate", "--pairs", str(root), "--people", "Q-R", "--model", str(model))
    assert bad.exit_code == 1
    assert "expected photos of at least 2 people Q-R, got 0" in bad.stderr
    assert invoke("evaluate").exit_code == 2  # neither --model nor --pairs
    cal = invoke(
        "evaluate",
        "--pairs",
        str(root),
        "--people",
        "A-O",
        "--model",
        str(model),
        "--detector",
        "none",
        "--calibrate",
        "--far",
        "1e-2",
        "--json",
    )
    assert cal.exit_code == 1  # 10 different pairs cannot measure a FAR of 1e-2
    assert "expected enough different-person pairs to measure FAR 1e-2" in cal.stderr


def test_evaluate_pairs_calibrate_stores_the_threshold_in_the_model(tmp_path: Path):
    from facetag.models.io import load_embedder

    model = write_model(tmp_path / "model.pt")
    root = tmp_path / "people"
    for k in range(11):  # 11 people x 5 photos: 110 same pairs, 110 different ones
        for shot in range(5):
            save(root / f"N{k:02d}" / f"{shot}.png", pattern(100 + 7 * k + (shot % 2)))
    r = invoke(
        "evaluate",
        "--pairs",
        str(root),
        "--model",
        str(model),
        "--detector",
        "none",
        "--calibrate",
        "--far",
        "1e-2",
        "--json",
    )
    assert r.exit_code == 0, r.output
    stored = json.loads(r.stdout)["stored"]
    assert load_embedder(model).threshold == pytest.approx(stored["threshold"])
    assert load_embedder(model).state["calibration"]["rule"] == "far1e-2"


def test_embed_json_gives_each_face_an_embedding(setup: dict[str, str]):
    s = setup
    r = invoke("embed", s["photos"], "--model", s["model"], "--detector", "none", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["embedding_dim"] == 8
    assert len(doc["images"]) == 3
    face = doc["images"][0]["faces"][0]
    assert len(face["embedding"]) == 8
    assert sum(v * v for v in face["embedding"]) == pytest.approx(1.0, abs=1e-4)  # unit length
    assert doc["model"]["embedder"].startswith("embedder-")


def _enrolled(s: dict[str, str]) -> list[str]:
    """The enrolment every test below tags with; returns the common tag options."""
    opts = ["--gallery", s["gallery"], "--model", s["model"], "--detector", "none"]
    assert invoke("enroll", s["people"], *opts, "--device", "cpu").exit_code == 0
    return opts


@pytest.mark.parametrize("target", ["photo", "gallery", "foreign"])
def test_csv_never_replaces_a_photo_the_gallery_or_a_foreign_file(
    setup: dict[str, str], target: str
):
    s = setup
    opts = _enrolled(s)
    path = {
        "photo": Path(s["photos"], "a.png"),
        "gallery": Path(s["gallery"]),
        "foreign": Path(s["tmp"], "budget.csv"),
    }[target]
    if target == "foreign":
        path.write_text("month,spent\njan,12\n")
    before = path.read_bytes()
    r = invoke("tag", s["photos"], *opts, "--csv", str(path))
    assert r.exit_code == 1, r.output
    assert r.stderr.count("error:") == 1
    assert "left unchanged: pass another --csv" in r.stderr
    assert path.read_bytes() == before
    ours = Path(s["tmp"], "out", "t.csv")
    assert invoke("tag", s["photos"], *opts, "--csv", str(ours)).exit_code == 0
    again = invoke("tag", s["photos"], *opts, "--csv", str(ours))  # our own CSV: replaced
    assert again.exit_code == 0, again.output


def test_manifest_never_is_the_gallery_or_a_photo(setup: dict[str, str]):
    s = setup
    opts = _enrolled(s)
    for path in (Path(s["gallery"]), Path(s["photos"], "b.png")):
        before = path.read_bytes()
        r = invoke("tag", s["photos"], *opts, "--manifest", str(path))
        assert r.exit_code == 1
        assert r.stderr.count("error:") == 1
        assert path.read_bytes() == before


def test_annotate_inside_the_tree_is_not_scanned_and_never_overwrites(setup: dict[str, str]):
    s = setup
    opts = _enrolled(s)
    lib = Path(s["photos"])
    save(lib / "sub" / "a.png", pattern(5))  # tagged too (--recursive)
    out = lib / "sub"  # the annotated copy of lib/a.png would be lib/sub/a.png.jpg ...
    save(out / "a.png.jpg", pattern(6))  # ... where the user has a photo of that name
    before = (out / "a.png.jpg").read_bytes()
    r = invoke("tag", str(lib), "--recursive", *opts, "--annotate", str(out), "--json")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert sorted(Path(im["path"]).name for im in doc["images"]) == ["a.png", "b.png", "c.png"]
    assert [e["error"] for e in doc["errors"]] == [
        f"{out / 'a.png.jpg'}: expected a new file or an annotated copy of facetag's, got "
        "another file; left unchanged: pass another --annotate folder"
    ]
    assert (out / "a.png.jpg").read_bytes() == before
    assert (out / "b.png.jpg").is_file()
    rerun = invoke("tag", str(lib), "--recursive", *opts, "--annotate", str(out), "--json")
    assert len(json.loads(rerun.stdout)["images"]) == 3  # our copies are not photos to tag


def test_one_bad_path_argument_is_one_line(setup: dict[str, str]):
    import os

    s = setup
    opts = _enrolled(s)
    fifo = Path(s["tmp"], "p.jpg")
    os.mkfifo(fifo)
    folder = Path(s["tmp"], "d.jpg")
    folder.mkdir()
    for path, what in [(fifo, "got a named pipe (FIFO)"), (folder, "expected image files")]:
        r = invoke("tag", str(path), *opts)
        assert r.exit_code == 1
        assert r.stderr.count("\n") == 2, r.stderr  # "device: cpu", then the one line
        assert what in r.stderr


def test_missing_photo_path_fails_before_the_models_load(
    setup: dict[str, str], monkeypatch: pytest.MonkeyPatch
):
    import facetag.inference.models as models

    def never(*args, **kwargs):
        raise AssertionError("the models were loaded")

    monkeypatch.setattr(models, "load_models", never)
    s = setup
    r = invoke("tag", f"{s['tmp']}/nope", "--gallery", s["gallery"], "--model", s["model"])
    assert r.exit_code == 1
    assert "nope: expected an image file or a folder, got no such path" in r.stderr
    r = invoke("enroll", f"{s['tmp']}/nobody", "--gallery", s["gallery"], "--model", s["model"])
    assert r.exit_code == 1
    assert "nobody: expected a folder of person folders" in r.stderr
    r = invoke("embed", f"{s['tmp']}/nope", "--model", s["model"])
    assert r.exit_code == 1


def test_csv_in_a_folder_where_no_file_can_be_made(setup: dict[str, str]):
    s = setup
    opts = _enrolled(s)
    r = invoke("tag", s["photos"], *opts, "--csv", "/proc/out.csv")
    assert r.exit_code == 1
    assert r.stderr.count("error:") == 1
    assert (
        "/proc: expected a writable folder for the CSV, got a folder where no file can be "
        "made (No such file or directory); choose another folder" in r.stderr
    )


def test_workers_beyond_the_cores_are_capped_with_a_line(setup: dict[str, str]):
    from facetag.inference.pipeline import cores

    s = setup
    opts = _enrolled(s)
    r = invoke("tag", s["photos"], *opts, "--workers", "1000", "--json")
    assert r.exit_code == 0, r.output
    n = cores()
    assert f"--workers 1000: expected at most {n} (the cores this process may use), got " in (
        r.stderr
    )
    assert f"using {n}" in r.stderr
    assert len(json.loads(r.stdout)["images"]) == 3


def test_expected_paths_that_match_no_tagged_photo_are_an_error(setup: dict[str, str]):
    s = setup
    opts = _enrolled(s)
    wrong = Path(s["tmp"], "expected.csv")
    wrong.write_text("image,names\nelsewhere/a.png,Alice\n")
    r = invoke("tag", s["photos"], *opts, "--expected", str(wrong))
    assert r.exit_code == 1
    assert "expected paths of the photos being tagged, got 1 of 1 that match none" in r.stderr
    right = Path(s["tmp"], "ok.csv")
    right.write_text("image,names\nphotos/a.png,Alice\nphotos/b.png,Bob\n")
    r = invoke("tag", s["photos"], *opts, "--expected", str(right))
    assert r.exit_code == 0, r.output


def test_nan_options_are_usage_errors(setup: dict[str, str]):
    s = setup
    for args in (
        ["detect", s["photos"], "--min-face", "nan"],
        ["detect", s["photos"], "--threshold", "nan"],
        ["tag", s["photos"], "--gallery", s["gallery"], "--threshold", "nan"],
    ):
        r = invoke(*args)
        assert r.exit_code == 2, (args, r.output)


def test_tif_and_heic_are_tagged(setup: dict[str, str]):
    from PIL import Image

    s = setup
    opts = _enrolled(s)
    Image.fromarray(pattern(1)).save(Path(s["photos"], "scan.tif"))
    Image.fromarray(pattern(2)).save(Path(s["photos"], "phone.HEIC"), quality=95)
    r = invoke("tag", s["photos"], *opts, "--json", "--threshold", "0.005")
    assert r.exit_code == 0, r.output
    names = {Path(im["path"]).name: im["faces"][0]["name"] for im in json.loads(r.stdout)["images"]}
    assert names["scan.tif"] == "Alice"
    assert names["phone.HEIC"] == "Bob"


def test_non_utf8_names_round_trip_through_every_output(setup: dict[str, str]):
    import csv
    import os

    s = setup
    opts = _enrolled(s)
    name = os.fsdecode(b"caf\xe9_\xff.png")  # Latin-1 bytes, as an old share stored them
    save(Path(s["photos"], name), pattern(1))
    out = Path(s["tmp"], "out")
    args = ["tag", s["photos"], *opts, "--csv", str(out / "t.csv"), "--json"]
    for _ in range(2):  # the second run resumes it from the manifest
        r = invoke(*args)
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        assert Path(s["photos"], name) in [Path(im["path"]) for im in doc["images"]]
    plain = invoke("tag", s["photos"], *opts)
    assert "caf\\xe9_\\xff.png: Alice" in plain.stdout  # shown as its bytes, not a crash
    with (out / "t.csv").open(encoding="utf-8", errors="surrogateescape", newline="") as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    assert str(Path(s["photos"], name)) in paths
    assert (out / "facetag-manifest.jsonl").read_bytes().decode("utf-8")  # valid UTF-8


def test_csv_dash_prints_the_csv_and_makes_no_file(
    setup: dict[str, str], monkeypatch: pytest.MonkeyPatch
):
    s = setup
    opts = _enrolled(s)
    monkeypatch.chdir(s["tmp"])
    ours = Path(s["tmp"], "t.csv")
    assert invoke("tag", s["photos"], *opts, "--csv", str(ours)).exit_code == 0
    r = invoke("tag", s["photos"], *opts, "--csv", "-")
    assert r.exit_code == 0, r.output
    assert r.stdout_bytes == ours.read_bytes()  # the same CSV, nothing else on stdout
    assert r.stdout.splitlines()[0].startswith("path,x1,y1,x2,y2")
    assert not Path(s["tmp"], "-").exists()


def test_jsonl_streams_one_result_per_photo_and_again_on_resume(setup: dict[str, str]):
    s = setup
    opts = _enrolled(s)
    Path(s["photos"], "d.png").write_bytes(b"not a photo")
    whole = invoke("tag", s["photos"], *opts, "--json")
    r = invoke("tag", s["photos"], *opts, "--jsonl")
    assert r.exit_code == 1  # d.png failed, as with --json
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [Path(x["path"]).name for x in lines] == ["a.png", "b.png", "c.png", "d.png"]
    assert lines[:3] == json.loads(whole.stdout)["images"]
    assert "error" in lines[3]
    assert "d.png" in r.stderr
    again = invoke("tag", s["photos"], *opts, "--jsonl")  # resumed: the manifest's records
    assert [json.loads(line) for line in again.stdout.splitlines()][:3] == lines[:3]


def test_plain_prints_path_comma_name_like_face_recognition(setup: dict[str, str]):
    s = setup
    opts = _enrolled(s)
    Path(s["photos"], "e,1.png").write_bytes(Path(s["photos"], "a.png").read_bytes())
    r = invoke("tag", s["photos"], *opts, "--plain")
    assert r.exit_code == 0, r.output
    rows = [(Path(p).name, n) for p, n in csv.reader(io.StringIO(r.stdout))]
    assert rows == [
        ("a.png", "Alice"),
        ("b.png", "Bob"),
        ("c.png", "unknown_person"),
        ("e,1.png", "Alice"),  # a comma in the path: quoted as in a CSV
    ]
    assert r.stdout.splitlines()[3].endswith('e,1.png",Alice')


def test_two_outputs_on_stdout_are_a_usage_error(setup: dict[str, str]):
    s = setup
    opts = _enrolled(s)
    r = invoke("tag", s["photos"], *opts, "--json", "--csv", "-")
    assert r.exit_code == 1
    assert "--json and --csv -: expected one output on stdout, got 2" in r.stderr
    assert r.stdout == ""
