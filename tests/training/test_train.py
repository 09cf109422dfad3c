"""facetag train end to end on generated faces: MLflow record, resume, NaN guard, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from facetag.cli import app
from facetag.errors import TrainingError
from facetag.training.runner import run_training
from tests.helpers import tracking_store, write_faces

SMOKE = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "smoke.toml"
PEOPLE = ["ann", "bob", "cy", "dee"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    with tracking_store(root) as uri:
        yield {"root": root, "uri": uri, "data": write_faces(root / "faces", PEOPLE, 6)}


def _cli(args: list[str]):
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"}, prog_name="facetag")


def test_train_cli_json_records_run_in_mlflow(env):
    result = _cli(["train", "--config", str(SMOKE), "--data", str(env["data"]), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) >= {"run_id", "test_accuracy", "epochs", "seconds", "device"}
    assert out["device"] == "cpu"
    assert out["epochs"] == 2
    assert 0.0 <= out["test_accuracy"] <= 1.0
    assert "epoch   2/2" in result.stderr  # the progress bar went to stderr
    run = MlflowClient(env["uri"]).get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    params, metrics = run.data.params, run.data.metrics
    assert params["train.epochs"] == "2"
    assert params["data.split"] == "0.5"
    assert params["data.people"] == "4"
    assert len(params["data.content_hash"]) == 64
    assert params["device_used"] == "cpu"
    assert "torch_version" in params
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr", "images_per_s"):
        assert key in metrics, key
    assert any(k.startswith("grad_norm/embedder.stages.0.conv") for k in metrics)
    assert any(k.startswith("update_ratio/embedder.fc") for k in metrics)
    history = MlflowClient(env["uri"]).get_metric_history(out["run_id"], "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    # Layer health per optimiser step (2 an epoch), not one mean per epoch; a figure an epoch.
    grads = MlflowClient(env["uri"]).get_metric_history(out["run_id"], "grad_norm/embedder.fc")
    assert sorted(m.step for m in grads) == [0, 1, 2, 3]
    assert all(m.value > 0 for m in grads)
    pictures = MlflowClient(env["uri"]).list_artifacts(out["run_id"], "figures/gradient_health")
    assert [a.path.rsplit("/", 1)[1] for a in pictures] == [
        "model.epoch_001.png",
        "model.epoch_002.png",
    ]
    artifacts = {a.path for a in MlflowClient(env["uri"]).list_artifacts(out["run_id"])}
    assert {"config.toml", "confusion_matrix.png", "curves.png", "per_person.csv"} <= artifacts
    assert out["registered_model"] == "facetag-embedder"


def test_train_split_flag_overrides_the_config(env):
    args = ["train", "--config", str(SMOKE), "--data", str(env["data"]), "--epochs", "1"]
    result = _cli([*args, "--split", "4/2", "--json"])
    assert result.exit_code == 0, result.output
    run = MlflowClient(env["uri"]).get_run(json.loads(result.stdout)["run_id"])
    assert run.data.params["data.split"] == "4/2"  # the config says 0.5
    bad = _cli([*args, "--split", "5/5"])  # 6 photos each
    assert bad.exit_code == 1
    assert "expected at least 10 images for split 5/5, got 6" in bad.output
    assert "Traceback" not in bad.output


def _history(run_id: str, root: Path) -> list[dict]:
    from facetag.checkpoint import load_checkpoint

    return load_checkpoint(root / "runs" / run_id / "checkpoint.pt")["history"]


@pytest.mark.parametrize("where", ["local", "mlflow"])
def test_resume_after_interruption_ends_with_same_metrics(env, where, capsys):
    overrides = {"data": str(env["data"]), "epochs": 3}
    full = run_training(SMOKE, overrides)

    def stop_in_epoch_3(p):
        if p.epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(SMOKE, overrides, progress=stop_in_epoch_3)
    client = MlflowClient(env["uri"])
    killed = client.search_runs(
        [client.get_experiment_by_name("smoke").experiment_id],
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    assert killed.info.status == "KILLED"
    run_id = killed.info.run_id
    assert len(_history(run_id, env["root"])) == 2  # epochs 1-2 were checkpointed
    if where == "mlflow":  # a teammate resumes: only the MLflow store has the checkpoint
        shutil.rmtree(env["root"] / "runs" / run_id)
    resumed = run_training(None, {}, resume=run_id)
    if where == "mlflow":  # downloaded without MLflow's own bar breaking facetag's lines
        assert "Downloading artifacts" not in capsys.readouterr().err
    assert resumed["run_id"] == run_id
    assert resumed["test_accuracy"] == full["test_accuracy"]
    a, b = _history(full["run_id"], env["root"]), _history(run_id, env["root"])
    for x, y in zip(a, b, strict=True):
        assert {k: v for k, v in x.items() if "seconds" not in k and "per_s" not in k} == {
            k: v for k, v in y.items() if "seconds" not in k and "per_s" not in k
        }
    assert client.get_run(run_id).info.status == "FINISHED"


def test_resume_unknown_run_is_one_line_error(env):
    result = _cli(["train", "--resume", "0123456789abcdef"])
    assert result.exit_code == 1
    assert "--resume 0123456789abcdef" in result.stderr
    assert "or in the run's MLflow artifacts, got none" in result.stderr
    assert "Traceback" not in result.output


def test_nan_loss_stops_run_naming_epoch_and_fails_mlflow_run(env, monkeypatch):
    from facetag.training import loop

    real = loop.layers.cross_entropy

    def poisoned(logits, y, **kw):
        return real(logits * float("nan"), y, **kw)

    monkeypatch.setattr(loop.layers, "cross_entropy", poisoned)
    with pytest.raises(TrainingError, match=r"epoch 1: the loss became nan"):
        run_training(SMOKE, {"data": str(env["data"])})
    client = MlflowClient(env["uri"])
    run = client.search_runs(
        [client.get_experiment_by_name("smoke").experiment_id],
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    assert run.info.status == "FAILED"
    assert "loss became nan" in run.data.tags["failure"]


def test_exploding_gradient_names_the_layer(env, monkeypatch):
    from facetag.training import health

    monkeypatch.setattr(
        health.GradientHealth, "first_non_finite", lambda self: "embedder.stages.2.conv"
    )
    with pytest.raises(TrainingError, match=r"gradient of layer 'embedder.stages.2.conv'"):
        run_training(SMOKE, {"data": str(env["data"])}, track=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{missing}"], "no such path"),
        (["--data", "{data}", "--epochs", "0"], "Invalid value"),
        (["--data", "{one}"], "solo"),
        (["--data", "{data}", "--device", "cuda"], "--device cuda"),
    ],
)
def test_train_bad_input_is_one_line(env, tmp_path, args, message):
    if "cuda" in args and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    one = write_faces(tmp_path / "one", ["solo"], 1)
    subs = {"missing": str(tmp_path / "nope"), "data": str(env["data"]), "one": str(one)}
    argv = ["train", "--config", str(SMOKE)] + [a.format(**subs) for a in args]
    result = _cli(argv)
    assert result.exit_code in (1, 2), result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_unknown_config_key_names_it(env, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlr_rate = 0.1\n")
    result = _cli(["train", "--config", str(bad), "--data", str(env["data"])])
    assert result.exit_code == 1
    assert "unknown key 'lr_rate'" in result.stderr
    assert "did you mean 'lr'" in result.stderr


def test_torchrun_two_cpu_processes_log_one_run(env, tmp_path):
    runs = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29533",
        "-m",
        "facetag",
        "train",
        "--config",
        str(SMOKE),
        "--data",
        str(env["data"]),
        "--json",
    ]
    e = {**os.environ, "FACETAG_RUNS_DIR": str(runs), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # one JSON object: rank 0 alone reports
    run = MlflowClient(env["uri"]).get_run(out["run_id"])
    assert run.data.params["world_size"] == "2"
    assert run.info.status == "FINISHED"


def test_sweep_logs_child_runs_under_one_parent(env):
    from facetag.training.runner import run_sweep

    out = run_sweep(SMOKE, {"data": str(env["data"]), "epochs": 1}, [1e-3, 3e-3], [8])
    client = MlflowClient(env["uri"])
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.lr"] == "0.001,0.003"
    children = [client.get_run(r["run_id"]) for r in out["runs"]]
    assert len(children) == 2
    for child, lr in zip(children, ["0.001", "0.003"], strict=True):
        assert child.data.tags["mlflow.parentRunId"] == out["parent_run_id"]
        assert child.data.params["train.lr"] == lr
        assert child.info.status == "FINISHED"
    assert parent.data.tags["best_run_id"] in {r["run_id"] for r in out["runs"]}


def test_data_info_cli_prints_people_and_problems(env, tmp_path):
    data = write_faces(tmp_path / "faces", ["ann", "bob"], 3)
    (data / "bob" / "broken.jpg").write_bytes(b"not a jpeg")
    result = _cli(["data", "info", str(data)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "people         2" in lines
    assert "images         6 (3 to 3 per person, median 3)" in lines
    assert any(line.startswith("bob/broken.jpg  expected an image") for line in lines)


def test_data_info_cli_missing_folder_is_one_line(tmp_path):
    result = _cli(["data", "info", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "no such path" in result.stderr
    assert "Traceback" not in result.output


def test_train_out_then_export_ships_a_smaller_model_that_embeds_the_same(env, tmp_path):
    import torch

    from facetag.checkpoint import load_checkpoint
    from facetag.models.io import load_embedder

    full = tmp_path / "build" / "embedder-full.pt"
    result = _cli(
        ["train", "--config", str(SMOKE), "--data", str(env["data"]), "--out", str(full), "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["out"] == str(full)
    assert full.read_bytes() == Path(out["model_path"]).read_bytes()

    shipped = tmp_path / "embedder.pt"
    result = _cli(["export", str(full), "--out", str(shipped)])
    assert result.exit_code == 0, result.output
    assert "threshold none: run facetag evaluate first" in result.stdout
    state = load_checkpoint(shipped)
    assert "classifier" not in state
    assert state["weights_dtype"] == "float16"
    assert all(
        v.dtype == torch.float16 for v in state["embedder"].values() if v.is_floating_point()
    )
    assert state["exported_from"] == load_checkpoint(full)["model_id"]
    assert state["model_id"] != state["exported_from"]  # other numbers, other version
    a, b = load_embedder(full), load_embedder(shipped)
    assert b.net.fc.weight.dtype == torch.float32  # float16 in the file, float32 to run
    x = torch.randn(3, a.in_channels, *a.image_size)
    with torch.no_grad():
        dist = 1 - (a.net.embed(x) * b.net.embed(x)).sum(1)
    assert dist.abs().max() < 1e-2
    assert shipped.stat().st_size < full.stat().st_size


def test_export_refuses_a_file_that_is_not_an_embedder(tmp_path):
    bad = tmp_path / "detector.pt"
    from facetag.checkpoint import save_checkpoint

    save_checkpoint(bad, {"format": "facetag-detector/1"})
    result = _cli(["export", str(bad), "--out", str(tmp_path / "x.pt")])
    assert result.exit_code == 1
    assert "expected a facetag embedder model" in result.stderr
    assert not (tmp_path / "x.pt").exists()
