"""The MLflow dashboard as people see it: a run page, the registered model page and the
gradient-health figure, rendered by headless Chromium from ``facetag ui``.

Screenshots go to $FACETAG_UI_OUT (``make ui-check``: out/ui-check/) or the test's folder.
Skipped where Chromium is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from facetag.cli import app
from facetag.training.tracking import ui_command
from tests.helpers import tracking_store, write_faces

SMOKE = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "smoke.toml"
CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    with tracking_store(root) as uri:
        faces = write_faces(root / "faces", ["ann", "bob", "cy", "dee"], 6)
        result = CliRunner().invoke(
            app, ["train", "--config", str(SMOKE), "--data", str(faces), "--json"]
        )
        assert result.exit_code == 0, result.output
        run_id = json.loads(result.stdout)["run_id"]
        argv, url = ui_command(_free_port())  # what `facetag ui` runs
    log = (root / "ui.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"facetag ui did not start:\n{(root / 'ui.log').read_text()}")
                time.sleep(0.5)
        run = MlflowClient(uri).get_run(run_id)
        out = Path(os.environ.get("FACETAG_UI_OUT") or root / "screenshots")
        out.mkdir(parents=True, exist_ok=True)
        yield {"url": url, "run": run, "out": out, "root": root}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _chromium(dashboard, page: str, shot: str) -> str:
    """The page's DOM once its scripts have run, and its screenshot under out/."""
    base = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    base += [f"--user-data-dir={dashboard['root'] / 'chromium'}", "--window-size=1400,1000"]
    base += ["--virtual-time-budget=20000"]
    url = f"{dashboard['url']}/{page}"
    path = dashboard["out"] / shot
    run = {"check": True, "capture_output": True, "timeout": 120}
    subprocess.run([*base, f"--screenshot={path}", url], **run)
    assert path.stat().st_size > 10_000, f"{shot}: an empty screenshot"
    return str(subprocess.run([*base, "--dump-dom", url], text=True, **run).stdout)


def test_run_page_shows_the_run_its_metrics_and_layer_health(dashboard):
    run = dashboard["run"]
    page = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    dom = _chromium(dashboard, page, "run.png")
    assert run.info.run_name in dom
    assert "val_accuracy" in dom
    assert "grad_norm/embedder.fc" in dom


def test_registered_model_page_shows_the_champion(dashboard):
    dom = _chromium(dashboard, "#/models/facetag-embedder", "model.png")
    assert "facetag-embedder" in dom
    assert "champion" in dom
    assert "Version 1" in dom


def test_gradient_health_figure_shows_in_the_artifact_viewer(dashboard):
    run = dashboard["run"]
    path = "figures/gradient_health/model.epoch_002.png"
    page = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts/{path}"
    dom = _chromium(dashboard, page, "gradient_health.png")
    assert f'<img alt="{path}" src="blob:' in dom  # the viewer loaded the PNG, not an error
    url = f"{dashboard['url']}/get-artifact?path={path}&run_uuid={run.info.run_id}"
    with urllib.request.urlopen(url) as r:
        assert r.read(8) == b"\x89PNG\r\n\x1a\n"
