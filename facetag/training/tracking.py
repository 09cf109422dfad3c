"""MLflow tracking for training runs. The only facetag module that imports mlflow.

Import it lazily (inside the train/evaluate/ui code paths): mlflow takes seconds to
import and ``import facetag`` must stay fast.

The store is ``sqlite:///experiments/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set;
artifacts of a sqlite store live beside it in ``<db folder>/artifacts/<experiment>/``.
One experiment per dataset name. A training loop uses it like this::

    with Tracker.start(cfg.data.name, run_name="orl-5/5") as tracker:   # FAILED on error
        tracker.log_params({**flatten(cfg), **run_environment(), "data.hash": h})
        for epoch in range(cfg.train.epochs):
            ...
            tracker.log_metrics({"train_loss": l, "val_acc": a, "lr": lr}, step=epoch)
            tracker.log_health_samples(health.samples)   # grad_norm/<layer> at each step
        tracker.log_figure(confusion_matrix_figure(...), "figures/confusion_matrix.png")
        result = tracker.log_model(model, "model", x[:2], "facetag-embedder", "val_acc", a, h,
                                   checkpoint=run_dir / "last.ckpt")

Models are logged with ``mlflow.pytorch`` (pickle serialisation) carrying the facetag
checkpoint in ``extra_files/``; see ``Tracker.log_model`` for why.
"""

from __future__ import annotations

import contextlib
import copy
import getpass
import logging
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from mlflow import MlflowClient as MlflowClient  # re-exported: evaluate.py reaches MLflow only here
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException as MlflowException
from mlflow.models import infer_signature
from torch import Tensor, nn

from facetag import __version__
from facetag.errors import ConfigError, FacetagError, ModelError
from facetag.models.io import ModelRef

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from facetag.training.health import HealthSample

# facetag's CLI draws the only progress bar; MLflow's tqdm bars for artifact downloads
# (resume, champion checks) would break its lines on stderr. Set it to true to see them.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

DEFAULT_URI = "sqlite:///experiments/mlflow.db"
CHAMPION = "champion"  # the alias of the best registered version on the same data
MODEL_CHECKPOINT = "checkpoint.pt"  # the facetag checkpoint inside a logged model
THRESHOLD_TAG = "facetag.threshold"  # run / model-version tag that calibrated_threshold reads
FAILURE_TAG = "failure"  # one-line reason on runs that ended FAILED or KILLED
# Model-version tags that make versions comparable (see Tracker.log_model).
METRIC_TAG, VALUE_TAG, DATA_TAG = "metric", "metric_value", "data_hash"

_MAX_PARAMS_PER_BATCH = 100  # MLflow's limits on one log_batch request
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_LENGTH = 6000
_MAX_TAG_LENGTH = 8000
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")  # error codes: no such thing
_SPEC_FORMS = "a checkpoint path, runs:/<run_id>/<path>, models:/<name>@<alias> or /<version>"

T = TypeVar("T")


class _DropNotice(logging.Filter):
    """Drops one known, expected MLflow log message; everything else passes."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _quiet_mlflow() -> None:
    # MLflow logs INFO lines on stderr for routine events (creating the sqlite tables,
    # "Created version '3' of model ...") which would interleave with our progress bars.
    # Warnings and errors still show.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # We pickle on purpose (see Tracker.log_model); MLflow warns about it on every call.
    logging.getLogger("mlflow.pytorch").addFilter(
        _DropNotice("Saving pytorch model by Pickle or CloudPickle")
    )


_quiet_mlflow()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project store ``sqlite:///experiments/mlflow.db``.

    The default is relative to the working directory, whose ``experiments/`` folder is
    created when missing.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        _check_database_driver(uri)
        return uri
    Path("experiments").mkdir(exist_ok=True)
    return DEFAULT_URI


_DATABASE_SCHEMES = ("postgresql", "postgres", "mysql", "mssql")


def _check_database_driver(uri: str) -> None:
    """A database store whose Python driver is missing is one line, not SQLAlchemy's traceback.

    SQLAlchemy picks the driver from the URI (``postgresql://`` is psycopg 3 since 2.1,
    ``postgresql+psycopg2://`` asks for psycopg2); its dialect says which module it imports.
    """
    scheme = uri.split(":", 1)[0].lower()
    if scheme.split("+", 1)[0] not in _DATABASE_SCHEMES:
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        dialect = make_url(uri).get_dialect()
        dialect.import_dbapi()
    except (ArgumentError, NoSuchModuleError) as e:
        raise ConfigError(f"MLFLOW_TRACKING_URI={scheme}://...: {e}; check the URI") from None
    except ImportError as e:
        module = getattr(e, "name", None) or dialect.driver
        postgres = scheme.startswith("postgres")
        fix = "pip install 'facetag[team]'" if postgres else f"pip install {module}"
        raise ConfigError(
            f"MLFLOW_TRACKING_URI={scheme}://...: its database driver {module} is not "
            f"installed; {fix}"
        ) from None


def _fresh_run_name() -> str:
    """MLflow's adjective-animal-NNN name, drawn from the OS, not the seeded ``random``.

    Training seeds Python's ``random`` before the run starts, and MLflow draws default
    names from it: every run of a seed got the same name. The training's state is kept.
    """
    import random

    from mlflow.utils.name_utils import _generate_random_name

    state = random.getstate()
    random.seed()  # from os.urandom
    try:
        return str(_generate_random_name())  # type: ignore[no-untyped-call]
    finally:
        random.setstate(state)


def safe_name(name: str) -> str:
    """A metric or param name MLflow accepts: letters, digits, ``_-./`` and spaces.

    Other characters become ``_``, and path-like oddities ("//", "./", "..", a leading
    "/") are removed because MLflow stores names as file paths in some stores.
    """
    text = re.sub(r"[^/\w.\- ]", "_", name)
    parts = [p.replace(".", "_") if p in (".", "..") else p for p in text.split("/") if p]
    return "/".join(parts) or "_"


def run_environment() -> dict[str, str]:
    """Versions and the git commit to log as params: what is needed to rerun a result."""
    commit, dirty = _git_state()
    return {
        "facetag_version": __version__,
        "torch_version": torch.__version__,
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
        "git_commit": commit or "unknown",
        "git_dirty": "unknown" if dirty is None else str(dirty).lower(),
    }


@dataclass(frozen=True)
class ModelRegistration:
    """What ``Tracker.log_model`` did: the new version and whether it became champion."""

    name: str  # registered model name, e.g. "facetag-embedder"
    version: int
    model_uri: str  # models:/<name>/<version>
    logged_model_uri: str  # models:/m-<id>, MLflow's id for the logged model
    champion: bool  # the champion alias now points at this version
    reason: str  # one line: why the alias moved or did not


class Tracker:
    """One MLflow run: params, per-epoch metrics, tags, artifacts, the model, the status.

    Create with ``Tracker.start`` (new run), ``Tracker.resume`` (reopen a run by id) or
    ``tracker.child`` (nested run, for sweeps). As a context manager it ends the run
    FINISHED, or FAILED (KILLED on Ctrl-C) with the reason in the ``failure`` tag.
    Every call names the run explicitly: no global "active run" is involved.
    """

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str, uri: str) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.uri = uri
        self.ended = False

    @classmethod
    def start(
        cls,
        experiment: str,
        *,
        run_name: str | None = None,
        tags: Mapping[str, object] | None = None,
        parent_run_id: str | None = None,
        uri: str | None = None,
    ) -> Tracker:
        """Start a run in experiment ``experiment`` (the dataset name), created if needed.

        ``parent_run_id`` nests it under that run (sweeps: one parent, a child per point).
        """
        uri = uri or tracking_uri()
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment_id = _experiment_id(client, experiment, uri)
        all_tags = {
            **_source_tags(),
            **{k: _text(v, _MAX_TAG_LENGTH) for k, v in (tags or {}).items()},
        }
        if parent_run_id is not None:
            _get_run(client, parent_run_id, f"parent run {parent_run_id}", uri)
            all_tags["mlflow.parentRunId"] = parent_run_id
        run_name = run_name or _fresh_run_name()
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        return cls(client, run.info.run_id, experiment_id, uri)

    @classmethod
    def resume(
        cls, run_id: str, *, experiment: str | None = None, uri: str | None = None
    ) -> Tracker:
        """Reopen run ``run_id`` (status back to RUNNING, old failure tag removed).

        ``experiment``, when given, must be the run's experiment: resuming an ORL run
        with the Yale B config is refused.
        """
        uri = uri or tracking_uri()
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        run = _get_run(client, run_id, f"--resume {run_id}", uri)
        name = client.get_experiment(run.info.experiment_id).name
        if experiment is not None and name != experiment:
            raise ConfigError(
                f"--resume {run_id}: expected a run of experiment '{experiment}', got one of "
                f"'{name}'; resume with the config that run was started with"
            )
        client.update_run(run_id, status="RUNNING")
        if FAILURE_TAG in run.data.tags:
            client.delete_tag(run_id, FAILURE_TAG)
        return cls(client, run_id, run.info.experiment_id, uri)

    def child(
        self, run_name: str | None = None, tags: Mapping[str, object] | None = None
    ) -> Tracker:
        """Start a run nested under this one, in the same experiment."""
        return Tracker.start(
            self.experiment_name,
            run_name=run_name,
            tags=tags,
            parent_run_id=self.run_id,
            uri=self.uri,
        )

    @property
    def experiment_name(self) -> str:
        return str(self.client.get_experiment(self.experiment_id).name)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        if self.ended:
            return False
        if exc is None:
            self.end()
        elif isinstance(exc, KeyboardInterrupt):
            self.end("KILLED", f"interrupted; resume with --resume {self.run_id}")
        elif isinstance(exc, FacetagError):
            self.end("FAILED", str(exc))
        else:
            self.end("FAILED", f"{type(exc).__name__}: {exc}")
        return False  # the exception goes on to the caller

    def end(
        self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED", message: str = ""
    ) -> None:
        """End the run with ``status``; ``message`` (first line) goes in the ``failure`` tag."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(
                f"Tracker.end: expected status FINISHED, FAILED or KILLED, got {status!r}"
            )
        if message:
            line = message.strip().splitlines()[0] if message.strip() else message
            self.client.set_tag(self.run_id, FAILURE_TAG, _text(line, _MAX_TAG_LENGTH))
        # MLflow prints "View run ... at: URL" to stdout under a tracking server: stdout
        # carries --json output, so the link goes to stderr with the progress.
        with contextlib.redirect_stdout(sys.stderr):
            self.client.set_terminated(self.run_id, status)
        self.ended = True

    def log_params(self, params: Mapping[str, object]) -> dict[str, tuple[str, str]]:
        """Log params not yet on the run; returns {key: (logged, new)} for changed values.

        MLflow params are immutable, so a resumed run keeps its first values: a changed
        value is not logged but returned, for the caller to report or refuse.
        """
        existing = self.client.get_run(self.run_id).data.params
        new = {safe_name(k): _text(v, _MAX_PARAM_LENGTH) for k, v in params.items()}
        changed = {
            k: (existing[k], v) for k, v in new.items() if k in existing and existing[k] != v
        }
        missing = [Param(k, v) for k, v in new.items() if k not in existing]
        for batch in _chunks(missing, _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch)
        return changed

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log ``metrics`` at ``step`` (the epoch) in one request; names are sanitised."""
        now = int(time.time() * 1000)
        batch = [Metric(safe_name(k), float(v), now, step) for k, v in metrics.items()]
        for chunk in _chunks(batch, _MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_health_samples(self, samples: Sequence[HealthSample]) -> None:
        """Log each sampled step's {layer: (grad_norm, update_ratio)} at its optimiser step,
        in as few requests as MLflow allows."""
        now = int(time.time() * 1000)
        batch = [
            Metric(safe_name(f"{name}/{layer}"), float(value), now, sample.step)
            for sample in samples
            for layer, pair in sample.layers.items()
            for name, value in zip(("grad_norm", "update_ratio"), pair, strict=True)
        ]
        for chunk in _chunks(batch, _MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def set_tags(self, tags: Mapping[str, object]) -> None:
        """Set run tags (values as text), e.g. {"device": "cuda:0"}."""
        batch = [RunTag(k, _text(v, _MAX_TAG_LENGTH)) for k, v in tags.items()]
        for chunk in _chunks(batch, _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=chunk)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Save ``text`` as artifact ``artifact_file`` (e.g. "config.toml", "per_person.csv")."""
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Save ``data`` as a .json or .yaml artifact."""
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def log_file(self, path: Path | str, artifact_dir: str | None = None) -> None:
        """Copy the local file ``path`` into the run's artifacts (under ``artifact_dir``)."""
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        """Save a matplotlib figure as artifact ``artifact_file`` (.png, .svg, .pdf)."""
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_model(
        self,
        model: nn.Module,
        name: str,
        input_example: Tensor | np.ndarray,
        registered_name: str,
        metric_name: str,
        metric_value: float,
        data_hash: str,
        greater_is_better: bool = True,
        *,
        checkpoint: Path | str | None = None,
    ) -> ModelRegistration:
        """Log ``model`` as an MLflow model of this run, register it, maybe crown it.

        input_example (N, C, H, W) is stored with the model, and the signature is inferred
        from it and the model's output on it (e.g. (N, D) embeddings). ``checkpoint`` (a
        file from save_checkpoint) is shipped inside the model as ``extra_files/
        checkpoint.pt``: that is what facetag evaluate/tag load (``resolve_model_uri``).

        The new version of ``registered_name`` is tagged with metric_name, metric_value
        and data_hash. The alias "champion" moves to it only when the current champion
        was scored with the same metric on the same data hash and this value beats it
        (strictly; ``greater_is_better`` picks the direction), or when there is none.

        NOTE: mlflow.pytorch with serialization_format="pickle", not "pt2" (MLflow 3's
        default) nor a custom pyfunc. pt2 traces the model with torch.export, which
        fixes the batch size to the example's when N == 1 and must trace our custom
        autograd Functions; pickle stores the nn.Module as it is (loading it needs the
        facetag package installed, which it is wherever a facetag model is used), and
        mlflow.pytorch still gives a pyfunc flavour for ``mlflow models serve``.
        """
        example = _as_numpy(input_example)
        cpu_model = copy.deepcopy(model).cpu().eval()  # loadable without a GPU
        info = self._log_pytorch(
            cpu_model,
            name,
            example,
            checkpoint,
            data_hash,
            {metric_name: _text(metric_value, _MAX_TAG_LENGTH)},
        )
        # The client, not mlflow.register_model: that one prints to stderr on every call.
        try:
            self.client.create_registered_model(registered_name)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        version = self.client.create_model_version(
            registered_name,
            source=info.model_uri,
            run_id=self.run_id,
            tags={
                METRIC_TAG: metric_name,
                VALUE_TAG: repr(float(metric_value)),
                DATA_TAG: data_hash,
            },
            model_id=info.model_id,
        )
        number = int(version.version)
        champion, reason = self._maybe_crown(
            registered_name, number, metric_name, float(metric_value), data_hash, greater_is_better
        )
        return ModelRegistration(
            name=registered_name,
            version=number,
            model_uri=f"models:/{registered_name}/{number}",
            logged_model_uri=info.model_uri,
            champion=champion,
            reason=reason,
        )

    def _log_pytorch(
        self,
        cpu_model: nn.Module,
        name: str,
        example: np.ndarray,
        checkpoint: Path | str | None,
        data_hash: str,
        tags: dict[str, str],
    ) -> Any:
        """mlflow.pytorch.log_model into this run, with the signature inferred from the
        model's output on ``example``; returns MLflow's ModelInfo."""
        with torch.no_grad():
            output = cpu_model(torch.from_numpy(example))
        if not isinstance(output, Tensor):
            raise ValueError(
                f"log_model: expected the model to return a Tensor, got {type(output).__name__}"
            )
        signature = infer_signature(example, output.numpy())
        run = self.client.get_run(self.run_id)
        logged = self.client.create_logged_model(
            experiment_id=self.experiment_id,
            name=name,
            source_run_id=self.run_id,
            params=dict(run.data.params),
            tags={DATA_TAG: data_hash, **tags},
        )
        # Model.log creates artifacts through the global tracking URI (an MLflow detail);
        # the explicit model_id and run_id keep the model in this run's experiment.
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        with tempfile.TemporaryDirectory(prefix="facetag-model-") as tmp:
            extra_files = None
            if checkpoint is not None:
                shipped = Path(tmp) / MODEL_CHECKPOINT
                shutil.copyfile(checkpoint, shipped)
                extra_files = [str(shipped)]
            return mlflow.pytorch.log_model(
                cpu_model,
                name=name,
                signature=signature,
                input_example=example,
                extra_files=extra_files,
                # Explicit requirements: inferring them re-imports the model in a subprocess.
                # The local part of torch's version ("+cu130") is not on PyPI: drop it.
                pip_requirements=[
                    f"torch=={_public(torch.__version__)}",
                    f"facetag=={__version__}",
                ],
                serialization_format="pickle",
                run_id=self.run_id,
                model_id=logged.model_id,
            )

    def _maybe_crown(
        self,
        registered_name: str,
        version: int,
        metric_name: str,
        value: float,
        data_hash: str,
        greater_is_better: bool,
    ) -> tuple[bool, str]:
        current = self.client.get_registered_model(registered_name).aliases.get(CHAMPION)
        if current is None:
            self.client.set_registered_model_alias(registered_name, CHAMPION, str(version))
            return True, f"no champion yet: version {version} is champion"
        tags = self.client.get_model_version(registered_name, str(current)).tags
        if tags.get(DATA_TAG) != data_hash:
            return False, (
                f"champion stays version {current}: it was scored on other data "
                f"(hash {tags.get(DATA_TAG, 'unknown')[:12]}, this run {data_hash[:12]}); "
                "evaluate both on the same validation data to compare"
            )
        if tags.get(METRIC_TAG) != metric_name:
            return False, (
                f"champion stays version {current}: it was scored with "
                f"{tags.get(METRIC_TAG, 'no metric')!r}, not {metric_name!r}"
            )
        best = float(tags.get(VALUE_TAG, "nan"))
        beats = math.isfinite(value) and (
            math.isnan(best) or (value > best if greater_is_better else value < best)
        )
        if not beats:
            return False, (
                f"champion stays version {current}: {metric_name} {value:.6g} does not beat "
                f"its {best:.6g}"
            )
        self.client.set_registered_model_alias(registered_name, CHAMPION, str(version))
        return True, (
            f"version {version} is champion: {metric_name} {value:.6g} beats "
            f"version {current}'s {best:.6g}"
        )


def resolve_model_uri(spec: str, dst: Path | None = None) -> Path:
    """A local facetag checkpoint file for ``spec``, downloading it when it is remote.

    ``spec`` is a local checkpoint file, a local MLflow model directory,
    ``runs:/<run_id>/<path>``, ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.
    Downloads go to ``dst`` (default: a new temporary directory, left for the caller).
    For an MLflow model the result is its ``extra_files/checkpoint.pt``. Raises
    ModelError, one line naming ``spec`` and the fix, for anything missing.
    """
    if spec.startswith(("runs:/", "models:/")):
        uri = tracking_uri()
        _check_remote(spec, MlflowClient(tracking_uri=uri, registry_uri=uri), uri)
        target = dst if dst is not None else Path(tempfile.mkdtemp(prefix="facetag-model-"))
        target.mkdir(parents=True, exist_ok=True)
        # NOTE: download_artifacts resolves models:/ through the global registry URI, not
        # its tracking_uri argument: without this, a models:/ spec is looked up in the
        # default store whenever MLFLOW_TRACKING_URI is unset.
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=spec, dst_path=str(target), tracking_uri=uri
                )
            )
        except MlflowException as e:
            if e.error_code not in _MISSING:
                raise
            raise ModelError(f"{spec}: no such artifact; expected {_SPEC_FORMS}") from None
    else:
        local = Path(spec)
        if not local.exists():
            raise ModelError(f"{spec}: no such file or directory; expected {_SPEC_FORMS}")
    if local.is_file():
        return local
    if not (local / "MLmodel").is_file():
        raise ModelError(
            f"{spec}: expected a checkpoint file or an MLflow model directory, got a directory "
            "without an MLmodel file; pass the checkpoint file itself"
        )
    checkpoint = local / "extra_files" / MODEL_CHECKPOINT
    if not checkpoint.is_file():
        raise ModelError(
            f"{spec}: not a facetag model; expected an MLflow model logged by facetag train "
            f"(with extra_files/{MODEL_CHECKPOINT})"
        )
    return checkpoint


def model_run_id(spec: str) -> str | None:
    """The id of the run that produced the model ``spec`` (None for a local path).

    evaluate logs its figures to this run.
    """
    uri = tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if spec.startswith("runs:/"):
        return spec.removeprefix("runs:/").split("/", 1)[0]
    if spec.startswith("models:/m-"):
        logged = client.get_logged_model(spec.removeprefix("models:/").split("/", 1)[0])
        return str(logged.source_run_id) if logged.source_run_id else None
    if spec.startswith("models:/"):
        version = _check_remote(spec, client, uri)
        return str(version.run_id) if version is not None and version.run_id else None
    return None


def calibrated_threshold(spec: str) -> float | None:
    """The threshold ``facetag evaluate`` stored for the model ``spec``, or None.

    For ``models:/<name>@<alias>`` or ``/<version>``: the version's ``facetag.threshold``
    tag, else its run's; for ``runs:/<run>/<path>`` and ``models:/m-<id>``: the run's tag;
    for a local file or MLflow model directory: the ``threshold`` in the file. A cosine
    distance: same person when below. Raises ModelError when ``spec`` names nothing.
    """
    from facetag.models.io import load_embedder

    if not spec.startswith(("runs:/", "models:/")):
        return load_embedder(resolve_model_uri(spec)).threshold
    uri = tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = model_run_id(spec)  # ModelError for a missing models:/ name or alias
    version = registered_version(client, spec)
    if version is not None and THRESHOLD_TAG in version.tags:
        return float(version.tags[THRESHOLD_TAG])
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise ModelError(
            f"{spec}: expected the id of a run in {uri}, got no such run; "
            "copy the run id from the MLflow UI (facetag ui)"
        ) from None
    value = run.data.tags.get(THRESHOLD_TAG)
    return float(value) if value is not None else None


def registered_version(client: Any, spec: str) -> Any:
    """The ModelVersion a ``models:/<name>@<alias>`` or ``/<version>`` spec names, else None."""
    if not spec.startswith("models:/") or spec.startswith("models:/m-"):
        return None
    rest = spec.removeprefix("models:/")
    name, at, alias = rest.partition("@")
    if at:
        return client.get_model_version_by_alias(name, alias)
    name, _, number = rest.partition("/")
    return client.get_model_version(name, number)


def resolve_model(spec: str, *, calibrated: bool = False) -> ModelRef:
    """A model spec as a local file for the inference layer (see resolve_model_uri), and
    with ``calibrated`` the threshold facetag evaluate stored in MLflow for a runs:/ or
    models:/ spec (None when it stored none, or for a local file: its own threshold is
    read when it is loaded). Raises ModelError (one line) for what is missing."""
    path = resolve_model_uri(spec)
    threshold = None
    if calibrated and spec.startswith(("runs:/", "models:/")):
        threshold = calibrated_threshold(spec)
    return ModelRef(path, spec, threshold)


def download_checkpoint(run_id: str, artifact: str, dest: Path) -> bool:
    """Fetch artifact ``artifact`` of run ``run_id`` to ``dest`` (atomically); False when the
    store has no such run or artifact."""
    uri = tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.get_run(run_id)
        with tempfile.TemporaryDirectory() as tmp:
            got = Path(client.download_artifacts(run_id, artifact, tmp))
            dest.parent.mkdir(parents=True, exist_ok=True)
            staged = dest.with_name(f".{dest.name}.download")
            shutil.copyfile(got, staged)
            os.replace(staged, dest)
    except (MlflowException, OSError):
        return False
    return True


def ui_command(port: int = 5000, host: str = "127.0.0.1") -> tuple[list[str], str]:
    """argv that starts the MLflow dashboard on the project's store, and its URL.

    Under a tracking server (``MLFLOW_TRACKING_URI=http(s)://...``) the dashboard is the
    server's own: argv is empty and the URL is the server's.
    Raises ConfigError when ``port`` is already taken (checked now; a race is unlikely).
    """
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return [], uri.rstrip("/")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        in_use = s.connect_ex((host, port)) == 0
    if in_use:
        raise ConfigError(
            f"--port {port}: expected a free port, got one in use (a dashboard may already "
            f"run at http://{host}:{port}); pick another with --port {port + 1}"
        )
    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    argv += ["--host", host, "--port", str(port)]
    return argv, f"http://{host}:{port}"


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    if not name:
        raise ConfigError(
            "data.name: expected a dataset name for the MLflow experiment, got an empty one; "
            "set [data] name or give the data path"
        )
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        root = _artifact_root(uri)
        location = (root / safe_name(name).replace("/", "_")).as_uri() if root else None
        try:
            return str(client.create_experiment(name, artifact_location=location))
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)  # created meanwhile by another run
            assert experiment is not None
    if experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"experiment '{name}': expected an active MLflow experiment, got a deleted one; "
            "restore it in the MLflow UI, or purge it with `mlflow gc`"
        )
    return str(experiment.experiment_id)


def _artifact_root(uri: str) -> Path | None:
    """``<db folder>/artifacts`` for a sqlite store; None lets a server or file store decide."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    return db.absolute().parent / "artifacts"


def _get_run(client: MlflowClient, run_id: str, where: str, uri: str) -> Any:
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code not in _MISSING:
            raise
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        raise ConfigError(
            f"{where}: expected the id of a run in {uri}, got no such run; "
            "copy the run id from the MLflow UI (facetag ui)"
        )
    return run


def _check_remote(spec: str, client: MlflowClient, uri: str) -> Any:
    """Look up the run or registered version ``spec`` names; ModelError when it is missing.

    Returns the ModelVersion for models:/<name>@<alias> and models:/<name>/<version>.
    """
    if spec.startswith("runs:/"):
        run_id, _, path = spec.removeprefix("runs:/").partition("/")
        try:
            _get_run(client, run_id, spec, uri)
        except ConfigError as e:
            raise ModelError(str(e)) from None
        if not path:
            raise ModelError(f"{spec}: expected runs:/<run_id>/<path>, e.g. runs:/{run_id}/model")
        return None
    rest = spec.removeprefix("models:/")
    if rest.startswith("m-"):  # a logged-model id: MLflow resolves it
        return None
    name, at, alias = rest.partition("@")
    version = ""
    if not at:
        name, _, version = rest.partition("/")
    if not name or not (alias or version):
        raise ModelError(f"{spec}: expected models:/<name>@<alias> or models:/<name>/<version>")
    try:
        registered = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code not in _MISSING:
            raise
        known = ", ".join(m.name for m in client.search_registered_models()) or "none"
        raise ModelError(
            f"{spec}: no registered model '{name}' in {uri} (registered: {known}); "
            "train one with facetag train"
        ) from None
    if alias:
        if alias not in registered.aliases:
            aliases = ", ".join(sorted(registered.aliases)) or "none"
            raise ModelError(
                f"{spec}: model '{name}' has no alias '{alias}' (aliases: {aliases}); "
                f"use models:/{name}/<version>"
            )
        version = str(registered.aliases[alias])
    try:
        return client.get_model_version(name, version)
    except MlflowException as e:
        if e.error_code not in _MISSING:
            raise
        raise ModelError(
            f"{spec}: model '{name}' has no version {version!r}; "
            f"use models:/{name}@{CHAMPION} or a listed version"
        ) from None


def _source_tags() -> dict[str, str]:
    """The tags MLflow's fluent API would set, which MlflowClient.create_run does not."""
    tags = {"mlflow.source.name": "facetag", "mlflow.source.type": "LOCAL"}
    with contextlib.suppress(KeyError, OSError):  # no user name in some containers
        tags["mlflow.user"] = getpass.getuser()
    commit, _ = _git_state()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_state() -> tuple[str | None, bool | None]:
    """(commit, has uncommitted changes) of the checkout facetag runs from, if it is one."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (a wheel)
        return None, None
    return commit or None, bool(status.strip())


def _as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def _text(value: object, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])
