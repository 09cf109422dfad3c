"""MLflow tracking: runs, params, metrics, artifacts, status, registry and champion alias.

All tests share one sqlite store per module (creating one takes seconds) and read what
was logged back with a plain MlflowClient.
"""

import math
import socket
import time

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from facetag.checkpoint import load_checkpoint, save_checkpoint
from facetag.config import Config, flatten
from facetag.errors import ConfigError, ModelError, TrainingError
from facetag.training.health import HealthSample
from facetag.training.tracking import (
    DEFAULT_URI,
    ModelRegistration,
    Tracker,
    model_run_id,
    resolve_model_uri,
    run_environment,
    safe_name,
    tracking_uri,
    ui_command,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="module")
def client(store):
    return MlflowClient(tracking_uri=store, registry_uri=store)


def test_tracking_uri_default_is_project_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == DEFAULT_URI == "sqlite:///experiments/mlflow.db"
    assert (tmp_path / "experiments").is_dir()


def test_tracking_uri_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == "http://mlflow.example:5000"
    assert not (tmp_path / "experiments").exists()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("stages.0.conv", "stages.0.conv"),
        ("grad_norm/head[0]:w", "grad_norm/head_0__w"),
        ("/a//b/../c/./d/", "a/b/__/c/_/d"),
        ("ünï cödé-1", "ünï cödé-1"),
        ("", "_"),
    ],
)
def test_tracking_safe_name(name, expected):
    assert safe_name(name) == expected


def test_tracking_run_environment_has_versions():
    env = run_environment()
    assert env["torch_version"] == torch.__version__
    assert {"facetag_version", "git_commit", "git_dirty", "python_version"} <= env.keys()


def test_tracker_logs_params_metrics_tags_and_artifacts(store, client, tmp_path):
    from matplotlib.figure import Figure

    config = Config()
    with Tracker.start("orl", run_name="first") as tracker:
        changed = tracker.log_params({**flatten(config), "data.hash": "abc", "people": 40})
        for epoch in range(3):
            tracker.log_metrics({"train_loss": 1.0 / (epoch + 1), "val acc%": 0.5}, step=epoch)
            layers = {"stages.0.conv": (0.1 * epoch, 1e-3), "head[0]": (math.nan, 0.0)}
            tracker.log_health_samples([HealthSample(step=epoch, layers=layers)])
        tracker.set_tags({"device": "cpu", "people": 40})
        tracker.log_text("[train]\nepochs = 3\n", "config.toml")
        tracker.log_dict({"a": [1, 2]}, "tables/a.json")
        (tmp_path / "notes.txt").write_text("hello")
        tracker.log_file(tmp_path / "notes.txt", "files")
        figure = Figure()
        figure.add_subplot().plot([0, 1], [1, 0])
        tracker.log_figure(figure, "figures/curve.png")
    assert changed == {}
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "first"
    assert client.get_experiment(run.info.experiment_id).name == "orl"
    assert run.info.artifact_uri.startswith((tmp_path.parent.parent / "").as_uri()) or (
        "/artifacts/orl/" in run.info.artifact_uri
    )
    params = run.data.params
    assert params["train.lr"] == str(config.train.lr)
    assert params["model.widths"] == "[16, 32, 64, 128]"
    assert params["people"] == "40"
    metrics = run.data.metrics
    assert metrics["train_loss"] == pytest.approx(1 / 3)
    assert metrics["val acc_"] == 0.5  # "%" is not allowed in MLflow names
    assert math.isnan(metrics["grad_norm/head_0_"])
    assert metrics["update_ratio/stages.0.conv"] == 1e-3
    history = client.get_metric_history(tracker.run_id, "grad_norm/stages.0.conv")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert run.data.tags["device"] == "cpu"
    assert run.data.tags["mlflow.source.name"] == "facetag"
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.toml", "tables", "files", "figures"} <= artifacts
    assert [a.path for a in client.list_artifacts(tracker.run_id, "figures")] == [
        "figures/curve.png"
    ]
    assert client.download_artifacts(tracker.run_id, "config.toml", str(tmp_path))


def test_tracker_artifacts_live_beside_the_sqlite_store(store, client):
    tracker = Tracker.start("placement")
    tracker.end()
    db_folder = store.removeprefix("sqlite:///").rsplit("/", 1)[0]
    expected = f"file://{db_folder}/artifacts/placement/"
    assert client.get_run(tracker.run_id).info.artifact_uri.startswith(expected)


def test_tracker_failure_marks_run_failed_with_reason(client):
    message = "epoch 3: loss is nan; gradient of stages.2.conv exploded; lower --lr"
    with pytest.raises(TrainingError), Tracker.start("orl") as tracker:
        raise TrainingError(message)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"] == message


def test_tracker_bug_marks_failed_and_keeps_exception(client):
    with pytest.raises(ZeroDivisionError), Tracker.start("orl") as tracker:
        1 / 0  # noqa: B018
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"] == "ZeroDivisionError: division by zero"


def test_tracker_ctrl_c_marks_killed(client):
    with pytest.raises(KeyboardInterrupt), Tracker.start("orl") as tracker:
        raise KeyboardInterrupt
    run = client.get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    assert f"--resume {tracker.run_id}" in run.data.tags["failure"]


def test_tracker_resume_reopens_the_same_run(client):
    first = Tracker.start("resume-test")
    first.log_params({"train.epochs": 4, "train.lr": 0.1})
    first.log_metrics({"val_acc": 0.5}, step=0)
    first.end("FAILED", "killed at epoch 1")

    resumed = Tracker.resume(first.run_id, experiment="resume-test")
    assert resumed.run_id == first.run_id
    run = client.get_run(first.run_id)
    assert run.info.status == "RUNNING"
    assert "failure" not in run.data.tags
    assert resumed.log_params({"train.epochs": 4, "train.lr": 0.1, "device": "cpu"}) == {}
    assert resumed.log_params({"train.epochs": 8}) == {"train.epochs": ("4", "8")}
    resumed.log_metrics({"val_acc": 0.75}, step=1)
    resumed.end()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.epochs": "4", "train.lr": "0.1", "device": "cpu"}
    history = client.get_metric_history(first.run_id, "val_acc")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.75)]
    experiment_id = run.info.experiment_id
    assert len(client.search_runs([experiment_id])) == 1  # no second run was created


def test_tracker_resume_unknown_run(store):
    with pytest.raises(
        ConfigError,
        match=r"^--resume 0123abc: expected the id of a run in .*"
        r"got no such run; copy the run id",
    ):
        Tracker.resume("0123abc")


def test_tracker_resume_refuses_other_experiment():
    tracker = Tracker.start("orl")
    tracker.end()
    with pytest.raises(
        ConfigError, match=r"expected a run of experiment 'yaleb', got one of 'orl'"
    ):
        Tracker.resume(tracker.run_id, experiment="yaleb")


def test_tracker_child_runs_nest_under_parent(client):
    with Tracker.start("sweep", run_name="grid") as parent:
        children = []
        for lr in (0.1, 0.01):
            with parent.child(run_name=f"lr={lr}", tags={"lr": lr}) as child:
                child.log_metrics({"val_acc": lr}, step=0)
            children.append(child.run_id)
    for run_id in children:
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.run_id
        assert run.info.experiment_id == parent.experiment_id
        assert run.info.status == "FINISHED"


def test_tracker_rejects_empty_experiment_name():
    with pytest.raises(ConfigError, match=r"data\.name: expected a dataset name"):
        Tracker.start("")


def test_tracker_refuses_deleted_experiment(client):
    Tracker.start("to-delete").end()
    client.delete_experiment(client.get_experiment_by_name("to-delete").experiment_id)
    with pytest.raises(ConfigError, match=r"got a deleted one; restore it"):
        Tracker.start("to-delete")


class Tiny(nn.Module):
    """Stands in for the embedder: (N, 4) -> (N, 3)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        nn.init.constant_(self.linear.weight, scale)

    def forward(self, x):
        return self.linear(x)


def log_tiny(tracker, tmp_path, value, data_hash="hash-a", name="fe-test", scale=1.0, **kw):
    model = Tiny(scale)
    ckpt = save_checkpoint(tmp_path / f"{value}.ckpt", {"model": model.state_dict()})
    return tracker.log_model(
        model,
        "model",
        torch.ones(2, 4),
        name,
        "val_acc",
        value,
        data_hash,
        checkpoint=ckpt,
        **kw,
    )


def test_tracker_log_model_registers_and_moves_champion_only_when_better(client, tmp_path):
    tracker = Tracker.start("orl")
    start = time.perf_counter()
    first = log_tiny(tracker, tmp_path, 0.90)
    seconds = time.perf_counter() - start
    assert isinstance(first, ModelRegistration)
    assert (first.version, first.champion) == (1, True)
    assert first.model_uri == "models:/fe-test/1"

    better = log_tiny(tracker, tmp_path, 0.95, scale=2.0)
    assert (better.version, better.champion) == (2, True)
    assert "beats version 1's 0.9" in better.reason

    worse = log_tiny(tracker, tmp_path, 0.93)
    assert (worse.version, worse.champion) == (3, False)
    assert "does not beat its 0.95" in worse.reason

    tie = log_tiny(tracker, tmp_path, 0.95)
    assert tie.champion is False  # only strictly better moves it

    other_data = log_tiny(tracker, tmp_path, 0.99, data_hash="hash-b")
    assert other_data.champion is False
    assert "scored on other data" in other_data.reason
    tracker.end()

    registered = client.get_registered_model("fe-test")
    assert registered.aliases == {"champion": 2}
    tags = client.get_model_version("fe-test", "5").tags
    assert tags == {"metric": "val_acc", "metric_value": "0.99", "data_hash": "hash-b"}
    version = client.get_model_version("fe-test", "2")
    assert version.run_id == tracker.run_id
    assert client.get_run(tracker.run_id).info.status == "FINISHED"  # logging did not end it
    print(f"log_model + register: {seconds:.2f} s (first call)")


def test_tracker_log_model_lower_is_better(tmp_path):
    tracker = Tracker.start("orl")
    assert log_tiny(tracker, tmp_path, 0.5, name="fe-loss", greater_is_better=False).champion
    assert log_tiny(tracker, tmp_path, 0.4, name="fe-loss", greater_is_better=False).champion
    assert not log_tiny(tracker, tmp_path, 0.6, name="fe-loss", greater_is_better=False).champion
    tracker.end()


def test_tracker_logged_model_has_signature_example_and_loads(client, tmp_path):
    import mlflow.pytorch
    from mlflow.models import Model

    tracker = Tracker.start("orl")
    result = log_tiny(tracker, tmp_path, 0.5, name="fe-load", scale=3.0)
    tracker.end()
    local = resolve_model_uri(result.model_uri, tmp_path / "dl")
    assert local.name == "checkpoint.pt"
    mlmodel = Model.load(str(local.parent.parent / "MLmodel"))
    assert mlmodel.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 4)
    assert mlmodel.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3)
    assert mlmodel.saved_input_example_info is not None
    loaded = mlflow.pytorch.load_model(result.model_uri)
    reference = Tiny(0.0)
    reference.load_state_dict(load_checkpoint(local)["model"])
    assert (reference.linear.weight == 3.0).all()
    x = torch.randn(5, 4)  # another batch size than the example's
    torch.testing.assert_close(loaded(x), reference(x))


def test_resolve_model_uri_forms(client, tmp_path):
    tracker = Tracker.start("orl")
    result = log_tiny(tracker, tmp_path, 0.5, name="fe-resolve", scale=5.0)
    tracker.end()
    for spec in (
        "models:/fe-resolve@champion",
        "models:/fe-resolve/1",
        f"runs:/{tracker.run_id}/model",
        result.logged_model_uri,
    ):
        path = resolve_model_uri(spec, tmp_path / safe_name(spec).replace("/", "_"))
        assert (load_checkpoint(path)["model"]["linear.weight"] == 5.0).all(), spec
        assert model_run_id(spec) == tracker.run_id, spec
    local = tmp_path / "local.ckpt"
    save_checkpoint(local, {"epoch": 1})
    assert resolve_model_uri(str(local)) == local
    assert model_run_id(str(local)) is None
    mlflow_dir = resolve_model_uri("models:/fe-resolve/1", tmp_path / "again").parent.parent
    assert resolve_model_uri(str(mlflow_dir)) == mlflow_dir / "extra_files" / "checkpoint.pt"


def test_resolve_model_uri_errors(client, tmp_path):
    tracker = Tracker.start("orl")
    log_tiny(tracker, tmp_path, 0.5, name="fe-errors")
    bare = tracker.log_model(
        Tiny(1.0), "bare", np.ones((1, 4)), "fe-bare", "val_acc", 0.5, "h"
    )  # no checkpoint inside: not a facetag model
    tracker.end()
    cases = {
        str(tmp_path / "nope.ckpt"): r"nope\.ckpt: no such file or directory; expected a "
        r"checkpoint path, runs:/",
        "models:/nope@champion": r"^models:/nope@champion: no registered model 'nope' in .*"
        r"\(registered: .*fe-errors.*\); train one",
        "models:/fe-errors@best": r"has no alias 'best' \(aliases: champion\)",
        "models:/fe-errors/7": r"model 'fe-errors' has no version '7'",
        "models:/fe-errors": r"expected models:/<name>@<alias> or models:/<name>/<version>",
        "runs:/0123abc/model": r"^runs:/0123abc/model: expected the id of a run .*no such run",
        f"runs:/{tracker.run_id}": r"expected runs:/<run_id>/<path>",
        f"runs:/{tracker.run_id}/nothing": r"/nothing: no such artifact; expected",
        bare.model_uri: r"not a facetag model; expected an MLflow model logged by facetag",
        str(tmp_path): r"got a directory without an MLmodel file",
    }
    for spec, message in cases.items():
        with pytest.raises(ModelError, match=message) as info:
            resolve_model_uri(spec, tmp_path / "dl")
        assert "\n" not in str(info.value)


def test_log_model_failure_leaves_registry_untouched(client, tmp_path):
    class TupleOut(nn.Module):
        def forward(self, x):
            return x, x

    tracker = Tracker.start("orl")
    before = len(client.search_model_versions("name='fe-test'"))
    with pytest.raises(ValueError, match=r"log_model: expected the model to return a Tensor"):
        tracker.log_model(TupleOut(), "model", torch.ones(1, 4), "fe-test", "val_acc", 1.0, "h")
    tracker.end()
    assert len(client.search_model_versions("name='fe-test'")) == before


def test_ui_command_points_at_the_store(store):
    argv, url = ui_command(port=5987)
    assert argv[-6:] == ["--backend-store-uri", store, "--host", "127.0.0.1", "--port", "5987"]
    assert argv[1:4] == ["-m", "mlflow", "ui"]
    assert url == "http://127.0.0.1:5987"


def test_ui_command_refuses_busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"--port {port}: expected a free port, got one"):
            ui_command(port=port)
