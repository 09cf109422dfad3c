"""facetag evaluate: the metrics on cases with known answers, then a tiny trained model.

The model tests share one sqlite store and one smoke training run per module (training
and registering take a few seconds); each test that writes a threshold works on a copy
of the model file or checks only what it added.
"""

import math
import shutil
from pathlib import Path

import pytest
import torch

from facetag.errors import DataError, ModelError
from facetag.metrics.verification import (
    FARS,
    OperatingPoint,
    choose_threshold,
    distance_cuts,
    equal_error_rate,
    impostors_needed,
    pair_scores,
    roc_auc,
    verify,
)
from facetag.training.evaluate import closed_set_accuracy, evaluate, format_result, thin_roc
from facetag.training.tracking import calibrated_threshold
from tests.helpers import write_faces

SMOKE = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "smoke.toml"


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.double(), dim=1)


def scores_of(genuine: list[float], impostor: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.tensor(genuine + impostor, dtype=torch.float64)
    same = torch.tensor([True] * len(genuine) + [False] * len(impostor))
    return scores, same


def rates_at(scores, same, threshold: float) -> tuple[float, float]:
    """(FAR, TAR) when a pair is accepted at cosine distance < threshold."""
    accepted = (1.0 - scores) < threshold
    return float(accepted[~same].double().mean()), float(accepted[same].double().mean())


def test_pair_scores_match_a_loop():
    g = torch.Generator().manual_seed(0)
    emb = unit(torch.randn(5, 3, generator=g))
    labels = torch.tensor([0, 1, 0, 2, 1])
    scores, same = pair_scores(emb, labels)
    expected = [
        (float(emb[i] @ emb[j]), bool(labels[i] == labels[j]))
        for i in range(5)
        for j in range(i + 1, 5)
    ]
    assert scores.shape == same.shape == (10,)
    torch.testing.assert_close(scores, torch.tensor([s for s, _ in expected], dtype=torch.float64))
    assert same.tolist() == [t for _, t in expected]


def test_pair_scores_rejects_mismatched_labels():
    with pytest.raises(ValueError, match=r"pair_scores: expected embeddings \(N, D\)"):
        pair_scores(torch.zeros(4, 3), torch.zeros(3, dtype=torch.int64))


def test_closed_set_accuracy_nearest_person_mean():
    # Person 0 around +x, person 1 around +y, person 2 has no gallery image.
    gallery = unit(torch.tensor([[1.0, 0.2, 0], [1.0, -0.2, 0], [0.1, 1.0, 0]]))
    gallery_labels = torch.tensor([0, 0, 1])
    probes = unit(torch.tensor([[0.9, 0.1, 0], [0.2, 1.0, 0], [0.0, 0.1, 1.0], [1.0, 0.9, 0]]))
    probe_labels = torch.tensor([0, 1, 2, 1])
    accuracy, pred = closed_set_accuracy(gallery, gallery_labels, probes, probe_labels, P=3)
    # The third probe points at nobody enrolled: the empty person 2 is never chosen.
    # The fourth lies nearer person 0's mean (+x) than person 1's (+y, tilted to x).
    assert pred.tolist() == [0, 1, 1, 0]
    assert accuracy == pytest.approx(2 / 4)


def test_verify_identical_genuine_pairs_give_eer_0_and_tar_1():
    # A perfect embedder: both images of a person map to the same point.
    g = torch.Generator().manual_seed(1)
    people = unit(torch.randn(50, 64, generator=g))  # (50, D)
    emb = people.repeat_interleave(2, dim=0)  # (100, D), two images each
    labels = torch.arange(50).repeat_interleave(2)
    v = verify(*pair_scores(emb, labels))
    assert (v.genuine, v.impostor) == (50, 4900)
    assert v.eer == 0.0
    assert v.auc == pytest.approx(1.0)
    assert v.best_accuracy == 1.0
    for name in FARS:
        point = v.at_far[name]
        assert point is not None
        assert point.tar == 1.0
        assert point.far == 0.0
    rule, chosen = choose_threshold(v)
    assert rule == "far1e-3"
    nearest_stranger = float(1.0 - pair_scores(emb, labels)[0][~pair_scores(emb, labels)[1]].max())
    assert 0.0 < chosen.threshold < nearest_stranger


def test_verify_hand_computed_case():
    # Sorted: .9 G, .8 G, .7 I, .3 G, .2 I. ROC (fpr, tpr): (0,0) (0,1/3) (0,2/3) (1/2,2/3)
    # (1/2,1) (1,1). FAR - FRR goes -1, -2/3, -1/3, 1/6: it crosses 0 two thirds of the way
    # from point 2 to point 3, where FAR = FRR = 1/3. AUC = 1/2 * 2/3 + 1/2 * 1 = 5/6.
    # Pair accuracy peaks at 4/5 first at point 2 (accept .9 and .8): cut between
    # distances .2 and .3.
    v = verify(*scores_of([0.9, 0.8, 0.3], [0.7, 0.2]))
    assert v.eer == pytest.approx(1 / 3)
    assert v.auc == pytest.approx(5 / 6)
    assert v.best == OperatingPoint(
        far=0.0, tar=pytest.approx(2 / 3), threshold=pytest.approx(0.25)
    )
    assert v.best_accuracy == pytest.approx(0.8)
    assert v.at_far == {"1e-2": None, "1e-3": None}  # 2 different-person pairs measure neither
    assert choose_threshold(v) == ("best_accuracy", v.best)


def test_equal_error_rate_on_a_diagonal_roc():
    fpr = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    tpr = fpr.clone()  # a chance-level verifier: FAR = FRR at 1/2
    assert equal_error_rate(fpr, tpr) == pytest.approx(0.5)


def test_verify_tar_at_far_is_read_at_the_allowed_false_accepts():
    # 1000 different-person pairs: one is very alike (.6), the rest spread over [0, .4].
    impostor = [0.6, *torch.linspace(0.0, 0.4, 999).tolist()]
    genuine = [0.9, 0.8, 0.7, 0.45, 0.3]
    scores, same = scores_of(genuine, impostor)
    v = verify(scores, same)
    at_3, at_2 = v.at_far["1e-3"], v.at_far["1e-2"]
    assert at_3 is not None
    assert at_2 is not None
    # FAR 1e-3 allows the one false accept (.6), which lets .45 in: TAR 4/5.
    assert (at_3.far, at_3.tar) == (pytest.approx(1e-3), pytest.approx(0.8))
    assert at_3.threshold == pytest.approx(0.575)  # between distances .55 and .6
    # FAR 1e-2 allows 10 false accepts, but the next genuine pair (.3) needs hundreds
    # more: TAR stays 4/5, and the strictest threshold reaching it is the FAR 1e-3 one.
    assert at_2 == at_3
    # Each point's threshold, applied as "distance < threshold", gives that point's rates.
    for point in (at_3, at_2, v.best):
        far, tar = rates_at(scores, same, point.threshold)
        assert (far, tar) == (pytest.approx(point.far), pytest.approx(point.tar))
    assert choose_threshold(v) == ("far1e-3", at_3)
    assert choose_threshold(v, "1e-2") == ("far1e-2", at_2)
    with pytest.raises(ValueError, match=r"expected far in \['1e-2', '1e-3'\], got '1e-4'"):
        choose_threshold(v, "1e-4")


def test_verify_needs_1_over_far_impostor_pairs():
    assert impostors_needed(1e-2) == 100
    assert impostors_needed(1e-3) == 1000
    few = verify(*scores_of([0.9, 0.5], torch.linspace(0.0, 0.6, 999).tolist()))
    assert few.at_far["1e-3"] is None
    assert few.at_far["1e-2"] is not None
    enough = verify(*scores_of([0.9, 0.5], torch.linspace(0.0, 0.6, 1000).tolist()))
    assert enough.at_far["1e-3"] is not None


def test_distance_cuts_lie_between_observed_distances():
    similarity = torch.tensor([math.inf, 1.0, 0.5, -1.0], dtype=torch.float64)
    cuts = distance_cuts(similarity)  # observed distances 0, 0.5, 2
    assert cuts[0] < 0.0  # accepts nothing, not even identical embeddings
    torch.testing.assert_close(cuts[1:3], torch.tensor([0.25, 1.25], dtype=torch.float64))
    assert cuts[3] > 2.0  # accepts everything


def test_thin_roc_keeps_the_shape_of_a_long_curve():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(200_000, generator=g, dtype=torch.float64)
    same = torch.rand(200_000, generator=g) < 0.1
    scores[same] += 1.5  # a fair verifier: AUC ~0.85
    v = verify(scores, same)
    keep = thin_roc(v.fpr, v.tpr)
    assert keep[0] == 0
    assert keep[-1] == v.fpr.numel() - 1
    assert keep.numel() < 3 * 2000 + 40 < v.fpr.numel()
    assert roc_auc(v.fpr[keep], v.tpr[keep]) == pytest.approx(v.auc, abs=1e-3)


def test_verify_rejects_pairs_of_one_kind():
    with pytest.raises(DataError, match="expected same-person and different-person pairs"):
        verify(*scores_of([0.9, 0.8], []))


# ---------------------------------------------------------------------------------------
# A tiny trained model: evaluate, store the threshold, log to its run.


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store and runs folder for the module, in the environment of every test."""
    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.setenv("FACETAG_RUNS_DIR", str(root / "runs"))
        # Eager BatchNorm+activation: torch.compile (tested with the layer) would spend
        # more time compiling than these tiny batches take.
        mp.setattr("facetag.layers.fused.COMPILE_MIN_NUMEL", 1 << 62)
        yield root


@pytest.fixture(scope="module")
def trained(store):
    """A smoke run on 5 generated people, 8 images each (4 test images each: 190 pairs)."""
    from facetag.training.runner import run_training

    data = write_faces(store / "faces", ["ann", "bob", "cy", "dee", "eve"], 8, seed=0)
    out = run_training(SMOKE, {"data": str(data), "epochs": 1})
    assert out["champion"] is True
    return {**out, "data": data}


@pytest.fixture
def client(store):
    from mlflow import MlflowClient

    uri = f"sqlite:///{store}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def copy_model(trained, tmp_path: Path) -> Path:
    return Path(shutil.copyfile(trained["model_path"], tmp_path / "model.pt"))


def test_evaluate_uses_the_models_data_split_and_seed(trained, tmp_path):
    from facetag.data.folders import scan_folder, split

    path = copy_model(trained, tmp_path)
    result = evaluate(str(path), None, split=None, seed=None, log=False, store_threshold=False)
    held_out = split(scan_folder(trained["data"]), "0.5", 0).test  # smoke.toml's split, seed 0
    assert result["data"] == str(trained["data"])
    assert (result["split"], result["seed"]) == ("0.5", 0)
    assert (result["people"], result["test_images"]) == (5, len(held_out)) == (5, 20)
    assert (result["pairs"], result["genuine_pairs"], result["impostor_pairs"]) == (190, 30, 160)
    assert 0.0 <= result["closed_set_accuracy"] <= 1.0
    assert 0.0 <= result["eer"] <= 1.0
    assert 0.0 <= result["auc"] <= 1.0
    # 160 different-person pairs measure FAR 1e-2 but not 1e-3: best accuracy is stored.
    assert result["tar_at_far"]["1e-3"] is None
    assert result["tar_at_far"]["1e-2"] is not None
    assert result["threshold_rule"] == "best_accuracy"
    assert result["threshold"] == result["best_threshold"]
    assert result["stored"] == []
    assert result["tracking"] == "not logged: --no-log"
    assert result["run_id"] == trained["run_id"]
    assert result["device"] == "cpu"
    assert "TAR at FAR 1e-3" in format_result(result)
    from facetag.models.io import load_embedder

    assert load_embedder(path).threshold is None  # store_threshold=False wrote nothing


def test_evaluate_on_other_people_enrols_their_train_split(trained, tmp_path):
    other = write_faces(tmp_path / "other", ["fay", "gus", "hal"], 4, seed=7)
    result = evaluate(
        str(trained["model_path"]),
        other,
        split="2/2",
        seed=3,
        device="cpu",
        log=False,
        store_threshold=False,
    )
    assert (result["people"], result["enrolled_images"], result["test_images"]) == (3, 6, 6)
    assert (result["pairs"], result["genuine_pairs"]) == (15, 3)
    assert result["data"] == str(other)


def test_evaluate_stores_threshold_and_logs_to_the_run(trained, tmp_path, client):
    from facetag.models.io import load_embedder

    path = copy_model(trained, tmp_path)
    run_id = trained["run_id"]
    before = client.get_run(run_id)
    result = evaluate(str(path), None, split=None, seed=None, device="cpu")
    assert result["run_id"] == run_id
    assert result["tracking"] == f"logged to run {run_id}"
    loaded = load_embedder(path)
    assert loaded.threshold == result["threshold"]
    assert loaded.state["calibration"]["threshold_rule"] == "best_accuracy"
    assert calibrated_threshold(str(path)) == result["threshold"]

    run = client.get_run(run_id)
    assert run.info.status == before.info.status == "FINISHED"  # added to, not reopened
    assert run.data.metrics["eval_threshold"] == pytest.approx(result["threshold"])
    assert run.data.metrics["eval_closed_set_accuracy"] == pytest.approx(
        result["closed_set_accuracy"]
    )
    assert {"eval_eer", "eval_auc", "eval_tar_far1e-2"} <= run.data.metrics.keys()
    assert "eval_tar_far1e-3" not in run.data.metrics  # not measurable: not logged
    assert run.data.tags["facetag.threshold"] == repr(result["threshold"])
    # The run registered version 1: it carries the threshold too, for models:/ loads.
    assert "models:/facetag-embedder/1 tags" in result["stored"]
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert artifacts == {"evaluation/roc.png", "evaluation/result.json"}
    logged = client.download_artifacts(run_id, "evaluation/result.json", str(tmp_path))
    import json

    assert json.loads(Path(logged).read_text())["threshold"] == result["threshold"]


def test_evaluate_champion_threshold_reaches_later_loads(trained, tmp_path, client):
    from facetag.models.io import load_embedder
    from facetag.training.tracking import resolve_model_uri

    spec = "models:/facetag-embedder@champion"
    original = resolve_model_uri(spec, tmp_path / "before")
    result = evaluate(spec, None, split=None, seed=None, device="cpu", log=False)
    version = client.get_model_version_by_alias("facetag-embedder", "champion")
    assert version.tags["facetag.threshold"] == repr(result["threshold"])
    assert version.tags["facetag.threshold_rule"] == "best_accuracy"
    assert f"models:/facetag-embedder/{version.version} tags" in result["stored"]
    assert calibrated_threshold(spec) == result["threshold"]
    assert calibrated_threshold(f"runs:/{trained['run_id']}/embedder") == result["threshold"]
    calibrated = resolve_model_uri(f"runs:/{trained['run_id']}/calibration/model.pt", tmp_path)
    assert load_embedder(calibrated).threshold == result["threshold"]
    # The registered model itself is not rewritten: its checkpoint is the one training logged.
    after = resolve_model_uri(spec, tmp_path / "after")
    assert after.read_bytes() == original.read_bytes()


def test_evaluate_local_file_without_run_is_not_logged(trained, tmp_path):
    from facetag.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(trained["model_path"])
    state.pop("run_id")
    path = save_checkpoint(
        tmp_path / "norun.pt", {k: v for k, v in state.items() if k != "facetag"}
    )
    result = evaluate(str(path), None, split=None, seed=None, device="cpu")
    assert result["run_id"] is None
    assert result["tracking"].startswith(f"not logged: {path} records no MLflow run")
    assert result["stored"] == [str(path)]
    assert calibrated_threshold(str(path)) == result["threshold"]


def bad_specs(tmp_path: Path, trained) -> list[tuple[str, str]]:
    from facetag.checkpoint import save_checkpoint

    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    other = save_checkpoint(tmp_path / "other.pt", {"epoch": 3})
    return [
        (str(tmp_path / "missing.pt"), "no such file or directory"),
        (str(text), "not a facetag checkpoint"),
        (str(other), "expected a facetag embedder model"),
        ("models:/no-such-model@champion", "no registered model 'no-such-model'"),
        ("models:/facetag-embedder@nope", "has no alias 'nope'"),
        ("runs:/0123456789abcdef/embedder", "got no such run"),
    ]


def test_evaluate_bad_model_specs_raise_one_line_and_damage_nothing(trained, tmp_path, client):
    model_bytes = Path(trained["model_path"]).read_bytes()
    run_before = client.get_run(trained["run_id"])
    versions_before = [
        (v.version, dict(v.tags)) for v in client.search_model_versions("name='facetag-embedder'")
    ]
    for spec, message in bad_specs(tmp_path, trained):
        with pytest.raises(ModelError) as info:
            evaluate(spec, trained["data"], split=None, seed=None, device="cpu")
        text = str(info.value)
        assert "\n" not in text
        assert text.startswith(spec)
        assert message in text
    assert Path(trained["model_path"]).read_bytes() == model_bytes
    run_after = client.get_run(trained["run_id"])
    assert run_after.info.status == run_before.info.status
    assert run_after.data.metrics == run_before.data.metrics
    versions_after = [
        (v.version, dict(v.tags)) for v in client.search_model_versions("name='facetag-embedder'")
    ]
    assert versions_after == versions_before


def test_evaluate_bad_data_raises_before_writing(trained, tmp_path):
    path = copy_model(trained, tmp_path)
    before = path.read_bytes()
    with pytest.raises(DataError, match=r"expected test images of at least 2 people"):
        evaluate(str(path), None, split="7/1", seed=None, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no person folders"):
        evaluate(str(path), tmp_path / "empty", split=None, seed=None, device="cpu")
    assert path.read_bytes() == before


def test_champion_resolves_with_the_default_tracking_uri(trained, store, tmp_path):
    """No MLFLOW_TRACKING_URI: the project store (experiments/mlflow.db) is used for the
    registry too (a fresh process, so no earlier mlflow.set_* call hides the default)."""
    import os
    import subprocess
    import sys

    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "mlflow.db").symlink_to(store / "mlflow.db")
    # MLflow's own default store (./mlflow.db), as any earlier mlflow call leaves it: the
    # registry must not be looked up there.
    shutil.copyfile(store / "mlflow.db", tmp_path / "mlflow.db")
    from mlflow import MlflowClient

    default = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(default, registry_uri=default).delete_registered_model("facetag-embedder")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    code = (
        "from facetag.training.tracking import resolve_model_uri; "
        "from facetag.models.io import load_embedder; "
        "print(load_embedder(resolve_model_uri('models:/facetag-embedder@champion')).version)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith("embedder-")
