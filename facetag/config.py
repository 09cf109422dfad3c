"""Training configuration: frozen dataclasses, TOML presets and a flat view for MLflow.

Precedence: defaults (below) < TOML file (sections [data], [model], [train]) < overrides
(CLI flags). Every value is type-checked and range-checked; an unknown key, a wrong type
or a bad value raises ConfigError naming the key, the file and the fix.

    cfg = load_config(Path("experiments/configs/orl.toml"), {"epochs": 5, "lr": None})
    flatten(cfg)["train.epochs"]        # 5; None means "flag not given"
    config_to_toml(cfg)                 # loads back to the same Config
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from facetag.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

Activation = Literal["prelu", "relu"]
Head = Literal["softmax", "arcface"]
Pool = Literal["gap", "flatten"]
Optimizer = Literal["adamw", "sgd"]
Schedule = Literal["onecycle", "cosine", "constant"]
Device = Literal["auto", "cpu", "cuda"]
Architecture = Literal["embedding-net", "dlib-resnet"]
Trainable = Literal["all", "head"]


@dataclass(frozen=True)
class DataConfig:
    """Where the faces come from and how training images are augmented."""

    path: str = ""  # dataset root, <path>/<person>/<image>; usually given with --data
    name: str = ""  # dataset name = MLflow experiment; "" means the folder name of path
    split: str = "5/5"  # "a/b": a train and b test images per person, or a ratio like "0.8"
    image_size: tuple[int, int] = (64, 64)  # (H, W) the network sees
    channels: int = 1  # 1 grey, 3 colour, 0 = decided from the data
    flip: bool = True  # random horizontal flip: faces are nearly symmetric
    affine_degrees: float = 10.0  # random rotation in [-d, d] degrees
    translate: float = 0.05  # random shift, as a fraction of H and W
    scale: tuple[float, float] = (0.95, 1.05)  # random zoom range (low, high)
    brightness: float = 0.2  # ColorJitter brightness; 0 = off
    contrast: float = 0.2  # ColorJitter contrast; 0 = off
    saturation: float = 0.0  # ColorJitter saturation (colour images); 0 = off
    grey: float = 0.0  # probability of a colour image turned grey; 0 = off
    lowres: float = 0.0  # probability of a 2-4x shrink and enlarge (small faces); 0 = off
    blur: float = 0.0  # largest Gaussian blur sigma, px at the input size; 0 = off


@dataclass(frozen=True)
class ModelConfig:
    """The embedding CNN (facetag.models.embedder) and its training head."""

    # embedding-net: the small CNN below, trained from scratch; dlib-resnet: dlib's face
    # metric ResNet (facetag.models.resnet, 150x150 aligned chips), fine-tuned from
    # [train] init. widths, activation, dropout and pool apply to embedding-net only.
    architecture: Architecture = "embedding-net"
    widths: tuple[int, ...] = (16, 32, 64, 128)  # F per conv stage; each stage halves H and W
    embedding_dim: int = 128  # D, the length of a face embedding
    activation: Activation = "prelu"  # after each BatchNorm
    dropout: float = 0.0  # before the embedding Linear
    pool: Pool = "gap"  # gap: global average pool; flatten: keep where features are
    flip_average: bool = False  # embed = normalise(f(x) + f(mirrored x)) when comparing faces
    head: Head = "softmax"  # classifier used in training only
    arcface_scale: float = 30.0  # s: logits are s * cos(theta (+ m))
    arcface_margin: float = 0.5  # m: additive angular margin in radians


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop."""

    epochs: int = 30  # passes over the training split
    batch_size: int = 32  # N per step
    lr: float = 3e-3  # peak learning rate (the one-cycle maximum)
    weight_decay: float = 0.01  # decoupled (AdamW) or L2 (SGD) weight decay
    optimizer: Optimizer = "adamw"
    momentum: float = 0.9  # SGD momentum; AdamW's beta1 (one-cycle cycles it)
    schedule: Schedule = "onecycle"  # learning-rate schedule over all steps
    warmup_fraction: float = 0.3  # share of the steps spent rising to lr
    label_smoothing: float = 0.1  # cross-entropy target smoothing; 0 = off
    seed: int = 0  # python, torch and split seed: same seed, same run on CPU
    device: Device = "auto"  # auto = cuda when available; the device used is logged
    num_workers: int = 0  # DataLoader workers; 0 = main process (images are in memory)
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    health_every: int = 10  # per-layer gradient health of every N-th step, to MLflow
    init: str = ""  # start from this model file's embedder weights (dlib-resnet: required)
    # Knowledge distillation: + distill_weight * smooth L1 between the embedding and the
    # frozen init network's on the same augmented image, so a fine-tuned metric (and its
    # threshold) stays near the one it started from. 0 = off.
    distill_weight: float = 0.0
    # What trains: "all", or "head": the embedder's last linear layer (the embedding
    # itself) and the classifier, the rest frozen as init left it (few faces per person:
    # the features a big network learnt stay, only how they map to the embedding moves).
    trainable: Trainable = "all"


@dataclass(frozen=True)
class Config:
    """Everything a training run needs; logged to MLflow and stored in checkpoints."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


SECTIONS: dict[str, type[Any]] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}

# CLI flag names accepted as plain override keys, and the config key each one sets.
FLAG_KEYS = {
    "data": "data.path",
    "epochs": "train.epochs",
    "lr": "train.lr",
    "batch_size": "train.batch_size",
    "seed": "train.seed",
    "device": "train.device",
    "init": "train.init",
}


def _gt0(v: Any) -> bool:
    return bool(v > 0)


def _ge0(v: Any) -> bool:
    return bool(v >= 0)


def _ge1(v: Any) -> bool:
    return bool(v >= 1)


def _unit(v: Any) -> bool:  # [0, 1)
    return bool(0 <= v < 1)


# Range checks after the type checks: key -> (test, what the value must be).
LIMITS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "data.image_size": (lambda v: all(s >= 8 for s in v), "sizes >= 8"),
    "data.channels": (lambda v: v in (0, 1, 3), "0 (from the data), 1 (grey) or 3 (colour)"),
    "data.affine_degrees": (lambda v: 0 <= v <= 180, "degrees in [0, 180]"),
    "data.translate": (_unit, "a fraction in [0, 1)"),
    "data.scale": (lambda v: 0 < v[0] <= v[1], "0 < low <= high"),
    "data.brightness": (_ge0, "a value >= 0"),
    "data.contrast": (_ge0, "a value >= 0"),
    "data.saturation": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "data.grey": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "data.lowres": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "data.blur": (lambda v: 0 <= v <= 10, "a sigma in [0, 10] px"),
    "model.widths": (lambda v: 4 <= len(v) <= 6 and all(w >= 1 for w in v), "4 to 6 widths >= 1"),
    "model.embedding_dim": (lambda v: v >= 2, "an integer >= 2"),
    "model.dropout": (_unit, "a probability in [0, 1)"),
    "model.arcface_scale": (_gt0, "a value > 0"),
    "model.arcface_margin": (lambda v: 0 <= v < math.pi / 2, "radians in [0, pi/2)"),
    "train.epochs": (_ge1, "an integer >= 1"),
    "train.batch_size": (_ge1, "an integer >= 1"),
    "train.lr": (_gt0, "a value > 0"),
    "train.weight_decay": (_ge0, "a value >= 0"),
    "train.momentum": (_unit, "a value in [0, 1)"),
    "train.warmup_fraction": (_unit, "a fraction in [0, 1)"),
    "train.label_smoothing": (_unit, "a value in [0, 1)"),
    "train.seed": (_ge0, "an integer >= 0"),
    "train.num_workers": (_ge0, "an integer >= 0"),
    "train.grad_clip": (_ge0, "a norm >= 0 (0 = off)"),
    "train.health_every": (_ge1, "an integer >= 1"),
    "train.distill_weight": (_ge0, "a weight >= 0 (0 = off)"),
}

_SPLIT_COUNTS = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


C = typing.TypeVar("C")


@dataclass(frozen=True)
class Schema(typing.Generic[C]):
    """One kind of config (the embedder's, the detector's): its sections, the CLI flags
    that set keys, and how the checked sections become a config (``build``). Loading,
    overrides, round trips, the flat view for MLflow and TOML text are the same for all.
    """

    title: str  # names the kind in the resolved TOML's first line
    sections: Mapping[str, type[Any]]
    flag_keys: Mapping[str, str]
    build: typing.Callable[[dict[str, dict[str, Any]], dict[str, str]], C]

    def load(self, path: Path | None, overrides: Mapping[str, object] | None = None) -> C:
        """Resolve defaults < TOML file at ``path`` (None: defaults only) < ``overrides``.

        Override keys are dotted ("train.epochs") or flag names in ``flag_keys`` ("epochs",
        "data" ...); a None value means "flag not given" and is skipped.
        """
        values, origin = self._empty()
        if path is not None:
            _merge_sections(read_toml(path), str(path), values, origin, self.sections)
        apply_overrides(overrides or {}, values, origin, self.sections, self.flag_keys)
        return self.build(values, origin)

    def from_dict(self, d: Mapping[str, Any], source: str = "config") -> C:
        """Rebuild a config from ``to_dict`` output (a checkpoint, a logged JSON);
        ``source`` names where the dict came from in error messages."""
        values, origin = self._empty()
        _merge_sections(d, source, values, origin, self.sections)
        return self.build(values, origin)

    def to_dict(self, config: C) -> dict[str, dict[str, Any]]:
        """Config -> {"data": {...}, "model": {...}, "train": {...}}; tuples become lists."""
        return {
            section: {
                f.name: _plain(getattr(getattr(config, section), f.name))
                for f in dataclasses.fields(cls)
            }
            for section, cls in self.sections.items()
        }

    def flatten(self, config: C) -> dict[str, str | int | float | bool]:
        """Config -> {"data.path": ..., "train.lr": ...} for mlflow.log_params; arrays as TOML."""
        return {
            f"{section}.{key}": _toml_value(value) if isinstance(value, list) else value
            for section, fields in self.to_dict(config).items()
            for key, value in fields.items()
        }

    def to_toml(self, config: C) -> str:
        """The resolved config as TOML text; ``load`` on it gives back an equal config."""
        lines = [f"# facetag resolved {self.title} (defaults < TOML < flags)"]
        for section, fields in self.to_dict(config).items():
            lines += ["", f"[{section}]"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in fields.items()]
        return "\n".join(lines) + "\n"

    def with_flags(self, config: C, overrides: Mapping[str, object], source: str) -> C:
        """``config`` with some flag overrides applied on top (a resumed run's --epochs)."""
        values, origin = self._empty()
        _merge_sections(self.to_dict(config), source, values, origin, self.sections)
        apply_overrides(overrides, values, origin, self.sections, self.flag_keys)
        return self.build(values, origin)

    def _empty(self) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        # origin: dotted key -> where its value came from, for errors
        return {name: {} for name in self.sections}, {}


def apply_overrides(
    overrides: Mapping[str, object],
    values: dict[str, dict[str, Any]],
    origin: dict[str, str],
    sections: Mapping[str, type[Any]],
    flag_keys: Mapping[str, str],
) -> None:
    """Type-check CLI overrides into ``values``: dotted keys ("train.epochs") or flag names
    in ``flag_keys`` ("epochs"); None means "flag not given" and is skipped."""
    for key, value in overrides.items():
        if value is None:
            continue
        dotted = flag_keys.get(key, key)
        where = f"--{key.replace('_', '-')}" if key in flag_keys else f"override {key}"
        section, _, field = dotted.partition(".")
        if section not in sections or field not in _fields(sections[section]):
            known = sorted(flag_keys) + [
                f"{s}.{f}" for s, cls in sections.items() for f in _fields(cls)
            ]
            raise ConfigError(f"unknown override '{key}'{_suggest(key, known)}")
        values[section][field] = _check_type(value, _hints(sections[section])[field], where)
        origin[dotted] = where


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            doc: dict[str, Any] = tomllib.load(f)
            return doc
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such config file; expected a TOML file such as "
            "experiments/configs/orl.toml"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: expected a TOML file, got a directory") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: expected UTF-8 TOML text, got binary data") from None
    except tomllib.TOMLDecodeError as e:
        # tomllib's message ends with "(at line L, column C)"; keep it in one line.
        reason = str(e).splitlines()[0]
        raise ConfigError(f"{path}: expected valid TOML, got {reason}; fix that line") from None


def _merge_sections(
    doc: Mapping[str, Any],
    source: str,
    values: dict[str, dict[str, Any]],
    origin: dict[str, str],
    sections: Mapping[str, type[Any]] = SECTIONS,
) -> None:
    """Type-check the [section] tables of ``doc`` into ``values``."""
    names = ", ".join(f"[{n}]" for n in sections)
    for section, table in doc.items():
        if section not in sections:
            if isinstance(table, Mapping):
                close = difflib.get_close_matches(section, list(sections), n=1)
                hint = f"did you mean [{close[0]}]?" if close else f"expected {names}"
                raise ConfigError(f"unknown section [{section}] in {source}; {hint}")
            owners = [s for s, cls in sections.items() if section in _fields(cls)]
            hint = f"; did you mean [{owners[0]}] {section}?" if owners else ""
            raise ConfigError(f"unknown key '{section}' in {source} (top level){hint}")
        if not isinstance(table, Mapping):
            raise ConfigError(
                f"{source} [{section}]: expected a table of keys, got {_describe(table)}; "
                f"write the keys under a [{section}] line"
            )
        hints = _hints(sections[section])
        for key, value in table.items():
            if key not in hints:
                raise ConfigError(
                    f"unknown key '{key}' in {source} [{section}]"
                    + _suggest_key(key, section, sections)
                )
            where = f"{source} [{section}] {key}"
            values[section][key] = _check_type(value, hints[key], where)
            origin[f"{section}.{key}"] = where


def check_limits(
    config: Any,
    origin: dict[str, str],
    limits: Mapping[str, tuple[typing.Callable[[Any], bool], str]],
) -> None:
    """ConfigError naming where a value came from when it fails its range check."""
    for dotted, (test, what) in limits.items():
        section, _, key = dotted.partition(".")
        value = getattr(getattr(config, section), key)
        if not test(value):
            where = origin.get(dotted, dotted)
            raise ConfigError(f"{where}: expected {what}, got {_toml_value(_plain(value))}")


def _check_values(config: Config, origin: dict[str, str]) -> None:
    check_limits(config, origin, LIMITS)
    split = config.data.split
    m = _SPLIT_COUNTS.match(split)
    ok = bool(m and int(m[1]) >= 1 and int(m[2]) >= 1) or split == "all"
    if not m and split != "all":
        try:
            ok = 0 < float(split) < 1
        except ValueError:
            ok = False
    if not ok:
        where = origin.get("data.split", "data.split")
        raise ConfigError(
            f'{where}: expected "a/b" (a train and b test images per person, e.g. "5/5"), '
            f'a train ratio in (0, 1) such as "0.8", or "all", got "{split}"'
        )
    H, W = config.data.image_size
    S = len(config.model.widths)
    if config.model.architecture == "dlib-resnet":
        if (H, W) != (150, 150) or config.data.channels not in (0, 3):
            where = origin.get("data.image_size", origin.get("data.channels", "[data]"))
            raise ConfigError(
                f"{where}: expected image_size = [150, 150] and channels = 3 for the "
                f"dlib-resnet, got ({H}, {W}) and {config.data.channels}; its chips are 150 px RGB"
            )
        if not config.train.init:
            raise ConfigError(
                "[train] init: expected the model file to fine-tune for the dlib-resnet, got "
                "none; pass --init MODEL (facetag import dlib writes one)"
            )
    elif min(H, W) < 2**S:
        where = origin.get("model.widths", origin.get("data.image_size", "model.widths"))
        raise ConfigError(
            f"{where}: expected image_size >= {2**S} for {S} stages (each halves H and W), "
            f"got ({H}, {W}); use fewer widths or a larger image_size"
        )


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` as type ``tp`` (int -> float, list -> tuple) or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        allowed = ", ".join(f'"{c}"' for c in choices)
        raise ConfigError(f"{where}: expected one of {allowed}, got {_describe(value)}")
    if origin is tuple:
        args = typing.get_args(tp)
        item = args[0]
        if not isinstance(value, list | tuple) or (
            args[-1] is not Ellipsis and len(value) != len(args)
        ):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_describe(value)}")
        return tuple(_check_type(v, item, where) for v in value)
    # bool is an int subclass in Python, but `epochs = true` is a mistake, not 1.
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok:
            value = float(value)
            ok = math.isfinite(value)
    elif tp is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - only reached when a field of a new type is added
        raise TypeError(f"config: no checker for type {tp!r} at {where}")
    if not ok:
        hint = ""
        if isinstance(value, str) and tp in (int, float):
            hint = "; write the number without quotes"
        elif isinstance(value, str) and tp is bool:
            hint = "; write true or false without quotes"
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_describe(value)}{hint}")
    return value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        item = _type_name(args[0]).removeprefix("an ").removeprefix("a ")
        if args[-1] is Ellipsis:
            return f"an array of {item}s"
        return f"an array of {len(args)} {item}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def _describe(value: Any) -> str:
    """A value as TOML calls it: 'string "10"', 'boolean true', 'array [1, 2]'."""
    if isinstance(value, bool):
        kind = "boolean"
    elif isinstance(value, int):
        kind = "integer"
    elif isinstance(value, float):
        kind = "float"
    elif isinstance(value, str):
        kind = "string"
    elif isinstance(value, list | tuple):
        kind = "array"
    elif isinstance(value, Mapping):
        return "a table"
    else:
        return type(value).__name__
    text = _toml_value(_plain(value))
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)  # shortest text that reads back to the same float
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"config: cannot write {type(value).__name__} as TOML")


def _toml_string(s: str) -> str:
    """A TOML basic string: escape quote, backslash and the control characters."""
    out = []
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _fields(section: str | type[Any]) -> list[str]:
    """Field names of a section dataclass (or of SECTIONS[name])."""
    cls = SECTIONS[section] if isinstance(section, str) else section
    return [f.name for f in dataclasses.fields(cls)]


def _hints(section: str | type[Any]) -> dict[str, Any]:
    """Field types of a section dataclass (or of SECTIONS[name])."""
    cls: Any = SECTIONS[section] if isinstance(section, str) else section
    return _type_hints(cls)


@functools.cache
def _type_hints(cls: Any) -> dict[str, Any]:  # Any: a dataclass type, hashable
    return typing.get_type_hints(cls)


def _closest(word: str, options: list[str]) -> str | None:
    """The option the user most likely meant: a near spelling, or a prefix ('lr_rate' -> 'lr')."""
    close = difflib.get_close_matches(word, options, n=1)
    if close:
        return close[0]
    parts = set(re.split(r"[_.\-]", word))
    related = [o for o in options if o in parts or word.startswith(o) or o.startswith(word)]
    return max(related, key=len) if related else None


def _suggest(word: str, options: list[str]) -> str:
    close = _closest(word, options)
    if close:
        return f"; did you mean '{close}'?"
    return "; expected one of " + ", ".join(options)


def _suggest_key(key: str, section: str, sections: Mapping[str, type[Any]] = SECTIONS) -> str:
    fields = _fields(sections[section])
    close = _closest(key, fields)
    if close:
        return f"; did you mean '{close}'?"
    owners = [s for s, cls in sections.items() if s != section and key in _fields(cls)]
    if owners:
        return f"; '{key}' belongs in [{owners[0]}]"
    return "; expected one of " + ", ".join(fields)


def _build(values: dict[str, dict[str, Any]], origin: dict[str, str]) -> Config:
    data = values["data"]
    if not data.get("name") and data.get("path"):
        # os.path.abspath normalises "." and "..", so "../data/orl/" and "." both get a name.
        data["name"] = Path(os.path.abspath(str(data["path"]))).name
    config = Config(**{section: SECTIONS[section](**values[section]) for section in SECTIONS})
    _check_values(config, origin)
    return config


EMBEDDER: Schema[Config] = Schema("config", SECTIONS, FLAG_KEYS, _build)
load_config = EMBEDDER.load
config_from_dict = EMBEDDER.from_dict
config_to_dict = EMBEDDER.to_dict
flatten = EMBEDDER.flatten
config_to_toml = EMBEDDER.to_toml
