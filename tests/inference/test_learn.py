"""facetag learn / cluster / name on generated photos: corrections flow back, nothing else moves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from facetag.inference.align import WholePhotoDetector
from facetag.inference.cluster import (
    SHARED_K,
    SHARED_WEIGHT,
    cluster_photos,
    group,
    name_cluster,
    shared_neighbour_distances,
)
from facetag.inference.enroll import enroll
from facetag.inference.gallery import ClusterFace, load_gallery
from facetag.inference.learn import learn
from facetag.inference.tag import TagOptions, tag_photos
from facetag.inference.xmp import sidecar_path
from tests.inference.conftest import FakeDetector, make_models, pattern, save, side_by_side

HALVES = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]


def names_of(run) -> dict[str, list[str | None]]:
    return {Path(im["path"]).name: [f["name"] for f in im["faces"]] for im in run.doc["images"]}


@pytest.fixture
def library(tmp_path: Path, model_file: Path, people: Path):
    # The tiny embedder only matches identical crops: each face below is a different
    # enrolled photo, so a correction to one cannot spill onto another.
    save(people / "Bob" / "2.png", pattern(4))
    gallery = tmp_path / "g.json"
    enroll(people, gallery, make_models(model_file, WholePhotoDetector()))
    lib = tmp_path / "lib"
    save(lib / "a.png", side_by_side(pattern(1), pattern(4)))  # Alice, Bob (his 2nd photo)
    save(lib / "b.png", side_by_side(pattern(2), pattern(5)))  # Bob, a stranger
    models = make_models(model_file, FakeDetector(HALVES), threshold=1e-3)
    opts = TagOptions(margin=0.0, xmp=True, csv=tmp_path / "tags.csv")
    first = tag_photos([lib], gallery, models, opts)
    assert names_of(first) == {"a.png": ["Alice", "Bob"], "b.png": ["Bob", None]}
    return {"gallery": gallery, "lib": lib, "models": models, "opts": opts, "tmp": tmp_path}


def test_rename_in_a_sidecar_moves_the_face_and_tagging_follows(library):
    lib, gallery, models, opts = (
        library["lib"],
        library["gallery"],
        library["models"],
        library["opts"],
    )
    sidecar = sidecar_path(lib / "b.png")
    sidecar.write_text(sidecar.read_text().replace(">Bob<", ">Carol<"))  # the user renames
    report = learn([lib], gallery, models, from_xmp=True, margin=0.0)
    assert report.new_people == ["Carol"]
    assert report.rejected == 1  # the face facetag called Bob is not Bob
    g = load_gallery(gallery)
    assert [e.source for e in g.people["Carol"]] == ["learn"]
    assert g.people["Carol"][0].confirmed is not None
    assert g.rejections[0].person == "Bob"
    assert [h["action"] for h in g.history] == ["confirm", "confirm", "confirm", "reject"]
    again = tag_photos([lib], gallery, models, opts)
    assert names_of(again) == {"a.png": ["Alice", "Bob"], "b.png": ["Carol", None]}


def test_csv_corrections_add_a_name_and_remove_a_wrong_one(library):
    lib, gallery, models = library["lib"], library["gallery"], library["models"]
    csv = library["tmp"] / "tags.csv"
    rows = csv.read_text().splitlines()
    edited = [rows[0]]
    for row in rows[1:]:
        cells = row.split(",")
        if cells[0].endswith("b.png") and cells[6] == "":
            cells[6] = "Dave"  # the stranger gets a name
        elif cells[0].endswith("a.png") and cells[6] == "Bob":
            cells[6] = ""  # "that is not Bob"
        edited.append(",".join(cells))
    csv.write_text("\n".join(edited) + "\n")
    report = learn([lib], gallery, models, from_csv=csv, margin=0.0)
    assert "Dave" in report.new_people
    assert report.rejected == 1
    tagged = names_of(tag_photos([lib], gallery, models, library["opts"]))
    assert tagged["b.png"] == ["Bob", "Dave"]
    assert tagged["a.png"] == ["Alice", None]  # not Bob again


def test_bad_corrections_are_one_line_each_and_the_rest_applies(library):
    lib, gallery, models = library["lib"], library["gallery"], library["models"]
    sidecar = sidecar_path(lib / "b.png")
    sidecar.write_text(sidecar.read_text().replace(">Bob<", ">../etc<"))
    lines: list[str] = []
    before = (library["gallery"]).read_bytes()
    report = learn([lib], gallery, models, from_xmp=True, margin=0.0, on_message=lines.append)
    assert any("unsafe in a file name" in line for line in lines)
    assert all("\n" not in line for line in lines)
    assert report.problems == len(lines)
    assert load_gallery(gallery).photos() >= 2  # the gallery is whole and still has everyone
    assert before != gallery.read_bytes()  # a.png's confirmations were applied


def test_clusters_keep_their_ids_as_the_library_grows_and_name_enrols_them(
    tmp_path: Path, model_file: Path
):
    lib = tmp_path / "lib"
    for k in range(3):
        save(lib / f"x{k}.png", side_by_side(pattern(7), pattern(8)))
    models = make_models(model_file, FakeDetector(HALVES), threshold=1e-3)
    gallery = tmp_path / "new.json"  # no gallery yet: everyone is unknown
    first = cluster_photos([lib], gallery, models, distance=1e-3, margin=0.0)
    ids = {f["cluster"] for im in first.doc["images"] for f in im["faces"]}
    assert len(ids) == 2  # pattern 7's faces, pattern 8's faces
    save(lib / "y.png", side_by_side(pattern(8), pattern(9)))
    second = cluster_photos([lib], gallery, models, distance=1e-3, margin=0.0)
    again = {
        Path(im["path"]).name: [f["cluster"] for f in im["faces"]] for im in second.doc["images"]
    }
    assert {again["x0.png"][0], again["x0.png"][1]} == ids  # old ids kept
    assert again["y.png"][0] == again["x0.png"][1]  # pattern 8 joins its cluster
    assert again["y.png"][1] not in ids  # pattern 9 is new
    r = name_cluster(gallery, again["x0.png"][0], "Erin")
    assert r["faces"] == 3
    tagged = tag_photos([lib], gallery, models, TagOptions(margin=0.0, resume=False))
    assert all(
        im["faces"][0]["name"] == "Erin"
        for im in tagged.doc["images"]
        if Path(im["path"]).name.startswith("x")
    )


def _unit(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([np.cos(a), np.sin(a)], np.float32)


def test_a_new_face_joins_the_cluster_nearest_on_average_not_by_one_member():
    # Cluster c1: faces at 0 and 40 degrees; c2: faces at 58 and 60. A new face at 45
    # degrees lies 5 degrees from c1's member at 40 (cosine distance 0.004) but 22.5 from
    # c1's middle; c2's members are 13 and 15 degrees away: c2 is nearer on average.
    def face(deg: float) -> ClusterFace:
        return ClusterFace("/p.png", "00", [0.0, 0.0, 1.0, 1.0], torch.from_numpy(_unit(deg)))

    clusters = {"c1": [face(0), face(40)], "c2": [face(58), face(60)]}
    new = np.stack([_unit(45), _unit(20), _unit(180), _unit(179)])
    d = 1 - np.cos(np.radians(25))  # cosine distance of 25 degrees
    out = group(new, clusters, d)
    assert out[0] == "c2"  # average linkage; the nearest single member would say c1
    assert out[1] == "c1"  # 20 degrees from both of c1's members
    assert out[2] == out[3] == "c3"  # far from both: a new cluster of the two of them


def test_faces_that_share_their_neighbours_come_closer_and_no_others():
    # Two crowds of SHARED_K faces: 0..4 degrees and 30..34 degrees. Within a crowd every
    # face has the same SHARED_K nearest neighbours (the crowd): Jaccard 1, the distance
    # shrinks by SHARED_WEIGHT. Across crowds no neighbour is shared: unchanged.
    degrees = [0, 1, 2, 3, 4, 30, 31, 32, 33, 34]
    assert SHARED_K == 5
    from scipy.spatial.distance import squareform

    X = np.stack([_unit(a) for a in degrees])
    d = np.clip(1 - X @ X.T, 0, None)
    np.fill_diagonal(d, 0.0)
    condensed = shared_neighbour_distances(X)
    assert condensed.shape == (10 * 9 // 2,)
    got = squareform(condensed)
    same = np.equal.outer(np.arange(10) // 5, np.arange(10) // 5)
    np.testing.assert_allclose(got[same], (d * (1 - SHARED_WEIGHT))[same], atol=1e-7)
    np.testing.assert_allclose(got[~same], d[~same], rtol=1e-6)
    assert np.all(np.diag(got) == 0)
    assert np.array_equal(got, got.T)


def test_new_faces_between_two_clusters_join_the_nearer_and_the_clusters_stay_apart():
    def face(deg: float) -> ClusterFace:
        return ClusterFace("/p.png", "00", [0.0, 0.0, 1.0, 1.0], torch.from_numpy(_unit(deg)))

    clusters = {"c1": [face(0), face(2)], "c7": [face(10), face(12)]}
    new = np.stack([_unit(5), _unit(7), _unit(90), _unit(91)])
    far = 1 - np.cos(np.radians(30))  # everything within 12 degrees groups together
    assert group(new, clusters, far) == ["c1", "c7", "c8", "c8"]
    # Nothing new near: the old clusters are left out of the grouping, new ids follow on.
    assert group(np.stack([_unit(90), _unit(170)]), clusters, 1e-3) == ["c8", "c9"]


def test_a_new_face_beside_one_member_of_a_spread_out_cluster_joins_it():
    # c1 spans 0..40 degrees (grouped at a larger distance once). A new face 1 degree from
    # its member at 40 but 21 from its middle: the member is within reach, the two group
    # together, and the face joins c1 rather than starting a cluster of its own.
    def face(deg: float) -> ClusterFace:
        return ClusterFace("/p.png", "00", [0.0, 0.0, 1.0, 1.0], torch.from_numpy(_unit(deg)))

    clusters = {"c1": [face(0), face(40)]}
    assert group(np.stack([_unit(41)]), clusters, 1 - np.cos(np.radians(10))) == ["c1"]


def test_grouping_survives_a_zero_embedding():
    out = group(np.stack([_unit(0), _unit(1), np.zeros(2, np.float32)]), {}, 0.01)
    assert out[0] == out[1] != out[2]


def _tiny_start(tmp_path: Path) -> Path:
    import dataclasses

    import torch

    from facetag.checkpoint import save_checkpoint
    from facetag.config import Config, DataConfig, ModelConfig
    from facetag.models.embedder import EmbeddingNet, FaceClassifier
    from facetag.training.loop import model_file_state

    torch.manual_seed(0)  # a tiny embedder whose config passes train's checks
    config = Config(
        data=dataclasses.replace(DataConfig(), image_size=(16, 16), channels=3),
        model=dataclasses.replace(ModelConfig(), widths=(4, 4, 8, 8), embedding_dim=8),
    )
    net = FaceClassifier(EmbeddingNet(3, (4, 4, 8, 8), 8, "prelu"), 2)
    return save_checkpoint(
        tmp_path / "start.pt",
        model_file_state(net, config, ("a", "b"), 3, extra={"threshold": 1e-3}),
    )


def test_tune_with_nothing_to_check_on_keeps_the_old_model(
    tmp_path: Path, people: Path, monkeypatch
):
    from facetag.models.io import load_embedder
    from facetag.tune import TuneSettings, tune

    monkeypatch.setenv("FACETAG_RUNS_DIR", str(tmp_path / "runs"))
    gallery = tmp_path / "g.json"
    models = make_models(_tiny_start(tmp_path), WholePhotoDetector())
    enroll(people, gallery, models)  # one photo each: none can be held out
    before = load_gallery(gallery)
    r = tune(gallery, models, TuneSettings(epochs=1, batch_size=2), track=False)
    after = load_gallery(gallery)
    assert (r["adopted"], r["check"], r["held_out"]) == (False, None, 0)
    assert after.model == before.model != r["model"]
    assert after.history[-1]["action"] == "tune kept the old model"
    assert after.history[-1]["check"].startswith("no person with two faces")
    assert [e.embedding.tolist() for e in after.people["Alice"]] == [
        e.embedding.tolist() for e in before.people["Alice"]
    ]
    tuned = load_embedder(Path(r["model_file"]))  # written all the same, for the record
    calibration = tuned.state["calibration"]
    assert calibration["threshold_rule"] == "scaled"
    assert calibration["from_threshold"] == pytest.approx(1e-3)
    assert calibration["scale"] > 0
    # The starting model's threshold moved with the distances, not the default one.
    assert tuned.threshold == pytest.approx(1e-3 * calibration["scale"])


def test_distance_scale_is_how_tuning_moved_the_distances_between_people():
    from facetag.tune import distance_scale

    def face(who: str, x: float, y: float) -> tuple:
        return (who, Path("p.png"), [0.0, 0.0, 1.0, 1.0], None, torch.tensor([x, y]))

    train = [face("A", 1, 0), face("A", 1, 0), face("B", 0, 1), face("C", 0, 1)]
    half = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.75**0.5], [0.5, 0.75**0.5]])
    # A-B and A-C pairs: cosine distance 1 -> 0.5; B-C (two people, distance 0 either way)
    # and A-A (one person) change nothing: the median over different people halves.
    assert distance_scale(train, half) == pytest.approx(0.5)
    assert distance_scale(train, torch.stack([f[4] for f in train])) == pytest.approx(1.0)
    lost = half.clone()
    lost[2] = float("nan")  # a face the tuned model no longer finds: its pairs left out
    assert distance_scale(train, lost) == pytest.approx(0.5)
    assert distance_scale(train[:2], half[:2]) == 1.0  # one person: no pair to scale by


def test_distance_scale_samples_faces_on_a_big_gallery(monkeypatch):
    import facetag.tune
    from facetag.tune import distance_scale

    monkeypatch.setattr(facetag.tune, "SCALE_FACES", 6)
    g = torch.Generator().manual_seed(0)
    old = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    train = [(f"p{k % 10}", Path("p.png"), [0.0, 0.0, 1.0, 1.0], None, v) for k, v in
             enumerate(old)]  # fmt: skip
    assert distance_scale(train, old) == pytest.approx(1.0)  # 6 faces' pairs, all unmoved
    # Every pair pulled together (a shared extra coordinate): any sample sees it shrink.
    squeezed = torch.nn.functional.normalize(torch.cat([old * 0.7**0.5, torch.full((40, 1),
                                             1.0)], dim=1), dim=1)  # fmt: skip
    assert 0.0 < distance_scale(train, squeezed) < 1.0


def test_tune_adopts_a_better_model_and_tagging_uses_it(tmp_path: Path, people: Path, monkeypatch):
    import facetag.tune
    from facetag.tune import TuneSettings, tune

    monkeypatch.setenv("FACETAG_RUNS_DIR", str(tmp_path / "runs"))
    for k in (3, 6):  # a second photo each, so one can be held out
        save(people / ("Alice" if k == 3 else "Bob") / "2.png", pattern(k))
    gallery = tmp_path / "g.json"
    models = make_models(_tiny_start(tmp_path), WholePhotoDetector())
    enroll(people, gallery, models)
    before = load_gallery(gallery)
    seen = {}

    def better(train, held, gallery_, old, new, new_train):
        seen["split"] = (len(train), len(held))
        return {"held_out": len(held), "strangers": 0, "f1_before": 0.5, "f1_after": 0.75}

    monkeypatch.setattr(facetag.tune, "_check", better)
    r = tune(gallery, models, TuneSettings(epochs=1, batch_size=2), track=False)
    after = load_gallery(gallery)
    assert seen["split"] == (2, 2)
    assert r["held_out"] == 2
    assert r["adopted"]
    assert after.model == r["model"] != before.model
    assert after.history[-1]["action"] == "tune"
    assert (
        after.history[-1]["check"]
        == "open-set F1 0.500 -> 0.750 on 2 held-out faces and 0 strangers"
    )
    assert after.photos() == before.photos()
    tuned = make_models(Path(after.model_file), WholePhotoDetector())
    run = tag_photos([people], gallery, tuned, TagOptions(recursive=True, resume=False))
    named = {(Path(im["path"]).parent.name, im["faces"][0]["name"]) for im in run.doc["images"]}
    assert named == {("Alice", "Alice"), ("Bob", "Bob")}  # its own photos, at distance 0


def test_tune_check_names_held_out_faces_against_the_rest(tmp_path: Path, people: Path):
    from facetag.inference.pipeline import embed_stored_faces
    from facetag.tune import _check

    models = make_models(_tiny_start(tmp_path), WholePhotoDetector())
    alice, bob = people / "Alice" / "1.png", people / "Bob" / "1.png"
    save(people / "Alice" / "copy.png", pattern(1))  # the same face again: distance 0
    save(people / "Bob" / "other.png", pattern(9))  # not like anyone enrolled
    box = [0.0, 0.0, 64.0, 64.0]
    photos = [("Alice", alice), ("Bob", bob)]
    photos += [("Alice", people / "Alice" / "copy.png"), ("Bob", people / "Bob" / "other.png")]
    stored = embed_stored_faces([(photo, box, None) for _, photo in photos], models)
    faces = [(who, photo, box, None, v) for (who, photo), v in zip(photos, stored, strict=True)]
    train, held = faces[:2], faces[2:]
    gallery = type("G", (), {"clusters": {}})()
    again = embed_stored_faces([(photo, box, None) for _, photo in photos[:2]], models)
    r = _check(train, held, gallery, models, models, again)  # stored vs cut again
    assert r is not None
    assert (r["held_out"], r["strangers"]) == (2, 0)
    assert r["f1_before"] == r["f1_after"]  # the same network: no better, so not adopted
    assert (r["precision_before"], r["recall_before"]) == (1.0, 0.5)  # Alice named, Bob missed


def test_learning_curve_tunes_on_n_to_r_and_measures_s_to_z(tmp_path: Path, monkeypatch):
    """The protocol end to end on generated people: each shot count tunes once on N-R's
    enrolled photos only (every shot trains), probes are N-R's other photos and all of
    S-Z, and S-Z pairs give the verification accuracy before and after."""
    from facetag.tune import TuneSettings, learning_curve, log_curve
    from tests.helpers import tracking_store

    root = tmp_path / "lfw"
    for k, name in enumerate(["Anna_A", "Nora_N", "Paul_P", "Rita_R", "Sam_S", "Zoe_Z"]):
        for shot in range(3):
            save(root / name / f"{name}_{shot}.png", pattern(10 * k + (shot > 0)))
    models = make_models(_tiny_start(tmp_path), WholePhotoDetector(), threshold=0.05)
    seen: list[tuple[str, ...]] = []

    import facetag.tune

    real_tune = facetag.tune.tune

    def spy(gallery, models_, settings=None, **kw):
        people = sorted(p.name for p in (gallery.parent / "people").iterdir())
        seen.append(tuple(people))
        assert settings is not None
        assert not settings.hold_out  # every shot trains
        return real_tune(gallery, models_, settings, **kw)

    monkeypatch.setattr(facetag.tune, "tune", spy)
    with tracking_store(tmp_path):
        r = learning_curve(
            root, models, shots=(1, 2), settings=TuneSettings(epochs=1, batch_size=2)
        )
        run_id = log_curve(r)
    assert seen == [("Nora_N", "Paul_P", "Rita_R")] * 2  # only N-R trains, never A-M or S-Z
    assert [row["shots"] for row in r["curve"]] == [1, 2]
    first, second = r["curve"]
    assert (first["people"], first["probes"]) == (3, 3 * 2 + 2 * 3)  # N-R's others + S-Z
    assert (second["people"], second["probes"]) == (3, 3 * 1 + 2 * 3)
    for row in r["curve"]:
        assert 0.0 <= row["f1_before"] <= 1.0
        assert 0.0 <= row["f1_after"] <= 1.0
        assert 0.0 <= row["strangers_pairs_accuracy_after"] <= 1.0
    assert 0.0 <= r["strangers_pairs_accuracy_before"] <= 1.0
    assert len(run_id) == 32
