"""MLflow for a team: facetag against an ``mlflow server``, on SQLite and on PostgreSQL.

The PostgreSQL case runs where the Debian package is installed (``.ci/run`` installs it)
and skips elsewhere; the server itself and the driver check always run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from facetag.cli import app
from tests.helpers import write_faces

SMOKE = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "smoke.toml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: CI and this machine are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _start_postgres() -> tuple[str, list[str], Path]:
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    # pytest's folders are root's alone (0700): the cluster lives where postgres can go.
    data = Path(tempfile.mkdtemp(prefix="facetag-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
    data.chmod(0o700)
    port = _free_port()
    subprocess.run(
        _as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "facetag"]),
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    ctl = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(data / "pg.log")]
    subprocess.run(_as_postgres([*ctl, "-o", opts, "-w", "start"]), check=True, capture_output=True)
    stop = _as_postgres([*ctl, "-m", "fast", "stop"])
    return f"postgresql://facetag@127.0.0.1:{port}/postgres", stop, data


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"team-{request.param}")
    stop_db: list[str] | None = None
    if request.param == "sqlite":
        backend = f"sqlite:///{root}/mlflow.db"
    else:
        backend, stop_db, pg_data = _start_postgres()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("w")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend]
    cmd += ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()}")
            time.sleep(0.5)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", url)
            mp.setenv("FACETAG_RUNS_DIR", str(root / "runs"))
            mp.setattr("facetag.layers.fused.COMPILE_MIN_NUMEL", 1 << 62)
            yield {"url": url, "root": root, "faces": write_faces(root / "faces", list("abcd"), 6)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        if stop_db is not None:
            subprocess.run(stop_db, capture_output=True)
            shutil.rmtree(pg_data, ignore_errors=True)


def _cli(args: list[str]):
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"}, prog_name="facetag")


def test_two_users_train_evaluate_and_move_the_alias_on_one_server(server):
    data = str(server["faces"])
    runs = []
    for _ in range(2):  # the same config and seed, as two teammates would run it
        result = _cli(["train", "--config", str(SMOKE), "--data", data, "--json"])
        assert result.exit_code == 0, result.output
        runs.append(json.loads(result.stdout))  # stdout is one JSON document
        assert "View run" in result.stderr  # MLflow's link, moved off stdout
    client = MlflowClient(tracking_uri=server["url"], registry_uri=server["url"])
    names = [client.get_run(r["run_id"]).info.run_name for r in runs]
    assert names[0] != names[1], names  # seeding `random` no longer fixes the run name
    assert all(client.get_run(r["run_id"]).info.status == "FINISHED" for r in runs)
    # A teammate promotes the second run's version, then calibrates the champion.
    version = str(runs[1]["version"])
    client.set_registered_model_alias("facetag-embedder", "champion", version)
    spec = "models:/facetag-embedder@champion"
    result = _cli(["evaluate", "--model", spec, "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    champion = client.get_model_version_by_alias("facetag-embedder", "champion")
    assert champion.version == version
    assert champion.tags["facetag.threshold"] == repr(out["threshold"])
    # `facetag ui` points at the server's dashboard instead of starting a local one.
    result = _cli(["ui"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"MLflow dashboard: {server['url']} ")


def test_a_missing_database_driver_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql+pg8000://u@127.0.0.1:1/db")
    faces = write_faces(tmp_path / "faces", list("ab"), 4)
    result = _cli(["train", "--config", str(SMOKE), "--data", str(faces), "--json"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: MLFLOW_TRACKING_URI=postgresql+pg8000://...: its database driver pg8000 is "
        "not installed; pip install 'facetag[team]'"
    ]
