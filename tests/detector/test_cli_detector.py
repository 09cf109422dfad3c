"""The detector commands end to end: detect, evaluate-detector, bench detect, train-detector."""

import json
import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from facetag.checkpoint import load_checkpoint, save_checkpoint
from facetag.cli import app
from facetag.models.detector import load_detector

from .conftest import photo

TINY_TOML = """
[data]
name = "tiny-faces"
boxes = "gt.txt"
images = "images"
val_fraction = 0.25
val_ap_images = 1
nonface = ""
crop_sets = []

[model]
stages = ["pnet", "rnet"]
pnet_widths = [4, 4, 8]
rnet_widths = [4, 8, 8, 16]

[train]
epochs = 1
batch_size = 32
jitter_per_face = 6
negatives_per_image = 10
near_negatives_per_face = 2
hard_negatives_per_image = 10
max_patches = 400
"""


def _cli(args: list[str]):
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"}, prog_name="facetag")


def _faces_dataset(root):
    """8 photos with 1-2 light ellipses ("faces") each, and their WIDER-format box file."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        img = Image.fromarray(rng.integers(0, 90, (96, 128, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        boxes = []
        for k in range(1 + i % 2):
            x, y = 10 + 60 * k + int(rng.integers(0, 10)), int(rng.integers(5, 40))
            draw.ellipse([x, y, x + 30, y + 38], fill=(220, 180, 160))
            boxes.append(f"{x} {y} 30 38 0 0 0 0 0 0")
        img.save(root / "images" / f"p{i}.jpg")
        lines += [f"p{i}.jpg", str(len(boxes)), *boxes]
    (root / "gt.txt").write_text("\n".join(lines) + "\n")
    (root / "tiny.toml").write_text(TINY_TOML)
    return root


def test_detect_json_shape(tiny_model, tmp_path):
    p = photo(tmp_path / "a.jpg")
    r = _cli(
        [
            "detect",
            str(p),
            "--json",
            "--model",
            str(tiny_model),
            "--device",
            "cpu",
            "--threshold",
            "0.0",
            "--min-face",
            "16",
        ]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc) == {"device", "model", "images"}
    assert doc["model"] == {"detector": str(tiny_model)}
    [image] = doc["images"]
    assert (image["path"], image["width"], image["height"]) == (str(p), 96, 64)
    for face in image["faces"]:
        assert len(face["box"]) == 4
        assert 0.0 <= face["score"] <= 1.0


def test_detect_reports_each_bad_input_and_exits_1(tiny_model, photo_zoo):
    good, bad = photo_zoo
    r = _cli(
        ["detect", *map(str, good + bad), "--json", "--model", str(tiny_model), "--device", "cpu"]
    )
    assert r.exit_code == 1
    errors = [line for line in r.stderr.splitlines() if line]
    assert len(errors) == len(bad), r.stderr
    assert all(line.startswith("error: ") for line in errors)
    assert "Traceback" not in r.output
    doc = json.loads(r.stdout)
    assert len(doc["images"]) == len(good)
    assert len(doc["errors"]) == len(bad)  # the empty folder too, as tag lists it


def test_detect_usage_errors(tiny_model, tmp_path):
    p = photo(tmp_path / "a.jpg")
    assert _cli(["detect", str(p), "--threshold", "1.5"]).exit_code == 2
    assert _cli(["detect", str(p), "--min-face", "0"]).exit_code == 2
    r = _cli(["detect", str(tmp_path / "nope.jpg"), "--model", str(tiny_model)])
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1
    assert "no such path" in r.stderr
    r = _cli(["detect", str(p), "--model", str(tmp_path / "missing.pt")])
    assert r.exit_code == 1
    assert "missing.pt: no such file" in r.stderr


def test_evaluate_detector_json(tiny_model, tmp_path):
    root = _faces_dataset(tmp_path / "data")
    csv = root / "boxes.csv"
    csv.write_text("image,x,y,w,h\np0.jpg,10,10,30,38\nmissing.jpg,1,1,5,5\n")
    r = _cli(
        [
            "evaluate-detector",
            "--boxes",
            str(csv),
            "--images",
            str(root / "images"),
            "--model",
            str(tiny_model),
            "--device",
            "cpu",
            "--json",
        ]
    )
    assert r.exit_code == 1  # missing.jpg failed, and said so
    assert "missing.jpg" in r.stderr
    out = json.loads(r.stdout)
    assert {"ap50", "ap50_32", "recall_at_1fp", "faces", "images"} <= set(out)
    assert (out["images"], out["faces"], out["failed_images"]) == (1, 1, 1)


def test_bench_detect_reports_speed_and_memory(tiny_model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        photo(folder / f"{i}.jpg", seed=i)
    r = _cli(
        [
            "bench",
            "detect",
            str(folder),
            "--model",
            str(tiny_model),
            "--device",
            "cpu",
            "--repeats",
            "2",
            "--threads",
            "1",
            "--json",
        ]
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["photos"] == 4
    assert out["photos_per_s"] > 0
    assert out["peak_rss_mb"] >= out["peak_rss_mb_first_pass"] > 0


@pytest.fixture
def tracked(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("FACETAG_RUNS_DIR", str(tmp_path / "runs"))
    return f"sqlite:///{tmp_path}/mlflow.db"


def test_train_detector_records_run_registers_and_resumes(tmp_path, tracked):
    root = _faces_dataset(tmp_path / "data")
    out_file = tmp_path / "shipped.pt"
    r = _cli(
        [
            "train-detector",
            "--config",
            str(root / "tiny.toml"),
            "--data",
            str(root),
            "--device",
            "cpu",
            "--json",
            "--out",
            str(out_file),
        ]
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["epochs"] == 2  # 1 per stage
    assert out["val_images"] == 2
    assert "epoch   2/2" in r.stderr
    client = MlflowClient(tracked)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.stages"] == '["pnet", "rnet"]'
    assert run.data.params["data.val_images"] == "2"
    for key in ("train_loss", "face_loss", "box_loss", "val_loss", "val_ap50", "lr"):
        assert key in run.data.metrics, key
    assert any(k.startswith("grad_norm/rnet.body.0.conv") for k in run.data.metrics)
    assert len(client.get_metric_history(out["run_id"], "val_ap50")) == 2
    champion = client.get_model_version_by_alias("facetag-detector", "champion")
    assert champion.run_id == out["run_id"]
    det = load_detector(out_file)
    assert det.cascade.kinds == ["pnet", "rnet"]
    # a finished run resumes to the same end without training again
    again = _cli(["train-detector", "--resume", out["run_id"], "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["epochs"] == 2
    bad = _cli(["train-detector", "--resume", out["run_id"], "--lr", "0.1"])
    assert bad.exit_code == 1
    assert "cannot change a run that has started" in bad.stderr


def test_bench_detect_against_mtcnn_times_both_or_says_how_to_install(tiny_model, tmp_path):
    import importlib.util

    folder = tmp_path / "photos"
    folder.mkdir()
    photo(folder / "0.jpg", size=(160, 120))
    args = [
        "bench",
        "detect",
        str(folder),
        "--model",
        str(tiny_model),
        "--device",
        "cpu",
        "--repeats",
        "1",
        "--against",
        "mtcnn",
        "--json",
    ]
    r = _cli(args)
    if importlib.util.find_spec("facenet_pytorch") is None:
        assert r.exit_code == 1
        assert "pip install --no-deps facenet-pytorch" in r.stderr
        return
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["mtcnn"]["photos"] == 1
    assert out["mtcnn"]["ratio"] == pytest.approx(
        out["photos_per_s"] / out["mtcnn"]["photos_per_s"], rel=1e-2
    )


def test_landmark_phase_trains_the_onet_after_its_stage_and_resumes(tmp_path, tracked):
    """With teacher landmarks and landmark_epochs, the run ends in that many
    "onet-landmarks" epochs, each with a landmark loss and a validation landmark error; a
    run from a facetag without the phase gets it by resuming with --config."""
    root = _faces_dataset(tmp_path / "data")
    lines = (root / "gt.txt").read_text().split("\n")
    images: dict[str, list[dict]] = {}
    i = 0
    while i < len(lines) - 1:  # every ellipse gets five points inside it
        name, n = lines[i], int(lines[i + 1])
        faces = []
        for k in range(n):
            x, y, w, h = (float(v) for v in lines[i + 2 + k].split()[:4])
            pts = [[x + w * a, y + h * b] for a, b in MARKS]
            faces.append({"box": [x, y, x + w, y + h], "landmarks": pts, "index": k})
        images[f"images/{name}"] = faces
        i += 2 + n
    doc = {"format": "facetag-landmarks/1", "images": images}
    (root / "marks.json").write_text(json.dumps(doc))
    toml = TINY_TOML.replace('stages = ["pnet", "rnet"]', 'stages = ["pnet", "rnet", "onet"]')
    toml = toml.replace("[model]", f'landmarks = "{root / "marks.json"}"\n\n[model]')
    toml = toml.replace("[train]", "onet_widths = [4, 8, 8, 16, 16]\n\n[train]")
    (root / "tiny.toml").write_text(toml)
    args = ["--config", str(root / "tiny.toml"), "--data", str(root), "--device", "cpu"]
    r = _cli(["train-detector", *args, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["epochs"] == 3  # 1 per stage, no phase by default

    # As if an older facetag had written the run: its config lacks the phase's settings.
    ckpt = tmp_path / "runs" / out["run_id"] / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    del state["config"]["train"]["landmark_epochs"]
    save_checkpoint(ckpt, state)
    (root / "more.toml").write_text(toml + "landmark_epochs = 2\n")
    resume = ["train-detector", "--resume", out["run_id"], "--config"]
    more = _cli([*resume, str(root / "more.toml"), "--json"])
    assert more.exit_code == 0, more.output
    out = json.loads(more.stdout)
    assert out["epochs"] == 5
    stages = [h["stage"] for h in out["history"]]
    assert stages == ["pnet", "rnet", "onet", "onet-landmarks", "onet-landmarks"]
    for h in out["history"][2:]:
        assert math.isfinite(h["landmark_loss"] or math.nan)
        assert math.isfinite(h["val_landmark_error"] or math.nan)
    assert "onet-landmarks epoch   5/5" in more.stderr
    again = _cli(["train-detector", "--resume", out["run_id"], "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["epochs"] == 5
    # A TOML that contradicts a setting the run stored is refused.
    (root / "other.toml").write_text(toml.replace("epochs = 1", "epochs = 2"))
    bad = _cli([*resume, str(root / "other.toml")])
    assert bad.exit_code == 1
    assert "sets train.epochs to 2, the run has 1" in bad.stderr


MARKS = ((0.3, 0.4), (0.7, 0.4), (0.5, 0.6), (0.35, 0.78), (0.65, 0.78))
