"""`facetag enroll`, `facetag tag` and `facetag bench tag` through the CLI (--detector none)."""

from __future__ import annotations

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
