"""Read dlib's serialised face metric network in pure Python and write a facetag model file.

``dlib_face_recognition_resnet_model_v1.dat`` (Davis King, public domain: CC0 1.0 in the
face_recognition_models 0.3.0 package on PyPI) is ``dlib::serialize`` of the network
``anet_type`` (facetag.models.resnet). No dlib is needed to read it; the format, from
dlib/serialize.h, dlib/float_details.h, dlib/cuda/tensor.h and dlib/dnn/core.h:

- integers: a control byte, then that many little-endian magnitude bytes. The control
  byte's low 4 bits count the bytes (1..8), bit 0x80 marks a negative value, bits 0x70
  are always 0. So 1 is ``01 01``, -28 is ``81 1c`` and 0 is ``01 00``.
- floats and doubles: two such integers, a mantissa m (int64) and an exponent e (int16),
  the value being ldexp(m, e) (m first rounded to the target type); e = 32000, 32001,
  32002 mean inf, -inf and NaN. So float 0.04 is ``03 0a d7 a3 81 1c`` (0xa3d70a * 2^-28)
  while a double 1.0 is ``01 10 81 04``: the layers' learning-rate multipliers are
  doubles, with 53-bit mantissas. (A first byte with any of the bits 0x70 set would be
  dlib's older ASCII float format.)
- strings: the length as an integer, then the bytes; bools: the byte '1' or '0'.
- tensors: the integer 2 (version), N, K, NR, NC as integers, then N*K*NR*NC float32s
  little-endian, raw (not as dlib floats). An "alias tensor" (a view into a layer's
  params) is the integer 1, then N, K, NR, NC: shapes only.

A network is written from its loss layer inwards: ``add_loss_layer`` writes its version,
the loss and then its subnetwork; every ``add_layer`` writes its version and then its
subnetwork BEFORE its own layer, and tag and skip layers write a version and their
subnetwork only. So the file holds the loss, then 130 version integers (one per wrapper,
output side first), then the input layer, then each layer's details input side first,
each followed by its add_layer's state (three bools, then its cached x_grad, output and
params gradient: empty tensors in this file). Weights are row-major float32: a conv's
params are its filters (F, C, K, K) then its F biases, an affine's gamma (C) then beta
(C), and the fc layer's a (D, P) matrix that multiplies x from the right.
The wrappers' kinds are not in the file (a tag's version 1 looks like an old add_layer's):
the reader walks the known topology, checks every layer's type name and geometry, and
says where a file departs from it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import Tensor

from facetag.checkpoint import save_checkpoint
from facetag.errors import ModelError
from facetag.models.resnet import (
    ARCHITECTURE,
    CHIP_SIZE,
    DLIB_INPUT_SCALE,
    EMBEDDING_DIM,
    STAGES,
    DlibResNet,
)

SOURCE_NAME = "dlib_face_recognition_resnet_model_v1.dat"
LICENCE = (
    "CC0 1.0 Universal (public domain dedication) by Davis King, the author of dlib and of "
    "these weights; as shipped in face_recognition_models 0.3.0 on PyPI "
    "(https://pypi.org/project/face_recognition_models/0.3.0/, whose LICENSE file is CC0 "
    "1.0; see also https://github.com/davisking/dlib-models)"
)
WHAT = "a dlib face metric network (dlib_face_recognition_resnet_model_v1.dat)"

_IS_INF, _IS_NINF, _IS_NAN = 32000, 32001, 32002


NOT_THIS_FILE = f"pass {SOURCE_NAME} from the face_recognition_models package"
TRUNCATED = "the file is truncated: fetch it again (pip download face_recognition_models)"


class _FormatError(Exception):
    """Where the file departs from the format: ``expected``, ``got``, at byte ``pos``."""

    def __init__(self, expected: str, got: str, pos: int, hint: str = NOT_THIS_FILE) -> None:
        super().__init__(expected, got, pos, hint)
        self.expected, self.got, self.pos, self.hint = expected, got, pos, hint


class _Reader:
    """dlib's deserialisers over the bytes of one file; every failure is a _FormatError."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def fail(self, expected: str, got: str, pos: int | None = None) -> NoReturn:
        raise _FormatError(expected, got, self.pos if pos is None else pos)

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            left = len(self.data) - self.pos
            raise _FormatError(
                what, f"the end of the file ({left} of {n} bytes)", self.pos, TRUNCATED
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int_(self, what: str, signed: bool = True) -> int:
        start = self.pos
        control = self.take(1, what)[0]
        size = control & 0x0F
        negative = bool(control & 0x80)
        if control & 0x70 or not 1 <= size <= 8 or (negative and not signed):
            self.fail(f"{what} (a dlib integer)", f"the control byte 0x{control:02x}", start)
        value = int.from_bytes(self.take(size, what), "little")
        return -value if negative else value

    def float_(self, what: str, double: bool = False) -> float:
        """A dlib float (``double``: a C++ double, which dlib writes the same way)."""
        start = self.pos
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            self.fail(f"{what} (a binary dlib float)", "dlib's old ASCII float format", start)
        mantissa = self.int_(f"{what} (mantissa)")
        exponent = self.int_(f"{what} (exponent)")
        if exponent == _IS_INF:
            return float("inf")
        if exponent == _IS_NINF:
            return float("-inf")
        if exponent == _IS_NAN:
            return float("nan")
        # As dlib's float_details::convert_to_T<T>: ldexp((T)mantissa, exponent).
        if double:
            return math.ldexp(float(mantissa), exponent)
        return float(np.ldexp(np.float32(mantissa), exponent))

    def string(self, what: str) -> str:
        n = self.int_(f"the length of {what}", signed=False)
        raw = self.take(n, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            self.fail(what, f"{n} bytes that are not ASCII text", self.pos - n)

    def bool_(self, what: str) -> bool:
        ch = self.take(1, what)
        if ch not in (b"0", b"1"):
            self.fail(f"{what} (the byte '0' or '1')", repr(ch), self.pos - 1)
        return ch == b"1"

    def version(self, what: str, allowed: tuple[int, ...]) -> int:
        start = self.pos
        v = self.int_(f"the version of {what}")
        if v not in allowed:
            self.fail(f"{what} version {' or '.join(map(str, allowed))}", str(v), start)
        return v

    def shape(self, what: str) -> tuple[int, int, int, int]:
        dims = tuple(self.int_(f"a dimension of {what}") for _ in range(4))
        if min(dims) < 0:
            self.fail(f"{what} with dimensions >= 0", str(dims))
        return dims  # type: ignore[return-value]

    def tensor(self, what: str) -> np.ndarray:
        """A resizable_tensor: (N, K, NR, NC) float32."""
        self.version(what, (2,))
        dims = self.shape(what)
        n = math.prod(dims)  # Python ints: no overflow on a corrupt header
        raw = self.take(4 * n, f"the {n} floats of {what}")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims)

    def alias(self, what: str) -> tuple[int, int, int, int]:
        """An alias_tensor: a shape into a layer's params, no data."""
        self.version(what, (1,))
        return self.shape(what)

    def name(self, what: str, allowed: tuple[str, ...]) -> str:
        start = self.pos
        s = self.string(f"the type name of {what}")
        if s not in allowed:
            self.fail(f"{what} ({' or '.join(allowed)})", repr(s), start)
        return s

    def expect_int(self, what: str, want: int) -> None:
        start = self.pos
        got = self.int_(what)
        if got != want:
            self.fail(f"{what} {want}", str(got), start)


@dataclass(frozen=True)
class _Layer:
    """One wrapper of anet_type: kind in con/affine/relu/max_pool/avg_pool/add_prev/fc/
    tag/skip; ``args`` the geometry to check; ``where`` names it in messages."""

    kind: str
    where: str
    args: tuple[int, ...] = ()


def _plan() -> list[_Layer]:
    """anet_type's wrappers input side first (the order of their details in the file)."""
    plan = [
        _Layer("con", "the first conv", (32, 7, 2, 0)),
        _Layer("affine", "the first affine"),
        _Layer("relu", "the first relu"),
        _Layer("max_pool", "the max-pool", (3, 3, 2, 2, 0, 0)),
    ]
    b = 0
    for F, n, down in STAGES:
        for i in range(n):
            d = down and i == 0
            w = f"block {b} ({F} filters{', down' if d else ''})"
            plan += [
                _Layer("tag", w),
                _Layer("con", f"{w} conv 1", (F, 3, 2, 0) if d else (F, 3, 1, 1)),
                _Layer("affine", f"{w} affine 1"),
                _Layer("relu", f"{w} relu 1"),
                _Layer("con", f"{w} conv 2", (F, 3, 1, 1)),
                _Layer("affine", f"{w} affine 2"),
            ]
            if d:
                plan += [
                    _Layer("tag", w),
                    _Layer("skip", w),
                    _Layer("avg_pool", f"{w} skip pool", (2, 2, 2, 2, 0, 0)),
                ]
            plan += [_Layer("add_prev", f"{w} add_prev"), _Layer("relu", f"{w} relu")]
            b += 1
    plan += [
        _Layer("avg_pool", "the global average pool", (0, 0, 1, 1, 0, 0)),
        _Layer("fc", "the fc layer", (EMBEDDING_DIM,)),
    ]
    return plan


@dataclass
class DlibNet:
    """What the file holds, in facetag's terms."""

    mean_rgb: tuple[float, float, float]
    margin: float
    distance_threshold: float
    convs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (W, b)
    affines: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (gamma, beta)
    fc: np.ndarray | None = None  # (P, D), facetag's Linear layout
    parameters: int = 0  # floats in all layers' params, as dlib counts them


def _params(r: _Reader, where: str, size: int) -> np.ndarray:
    params = r.tensor(f"the params of {where}")
    if params.size != size:
        r.fail(f"{size} params for {where}", str(params.size))
    return params.reshape(-1)


def _read_con(r: _Reader, layer: _Layer, C: int, net: DlibNet) -> int:
    F_, K, S, P = layer.args
    w = layer.where
    version = r.name(w, ("con_4", "con_5", "con_6"))
    start = r.pos
    params = r.tensor(f"the params of {w}")
    r.expect_int(f"the filter count of {w}", F_)
    for what, want in (("rows", K), ("columns", K), ("stride_y", S), ("stride_x", S)):
        r.expect_int(f"the {what} of {w}", want)
    r.expect_int(f"padding_y of {w}", P)
    r.expect_int(f"padding_x of {w}", P)
    filters = r.alias(f"the filters of {w}")
    biases = r.alias(f"the biases of {w}")
    for what in ("learning rate", "weight decay", "bias learning rate", "bias weight decay"):
        r.float_(f"the {what} multiplier of {w}", double=True)
    use_bias = r.bool_(f"use_bias of {w}") if version in ("con_5", "con_6") else True
    if version == "con_6" and r.bool_(f"use_relu of {w}"):
        r.fail(f"{w} without a fused relu", "a con_ with use_relu set")
    if filters != (F_, C, K, K):
        r.fail(f"the filters of {w} shaped {(F_, C, K, K)}", str(filters), start)
    n_w = F_ * C * K * K
    if params.size != n_w + (F_ if use_bias else 0):
        r.fail(f"{n_w + F_} params for {w}", str(params.size), start)
    if use_bias and biases != (1, F_, 1, 1):
        r.fail(f"the biases of {w} shaped (1, {F_}, 1, 1)", str(biases), start)
    flat = params.reshape(-1)
    weight = flat[:n_w].reshape(F_, C, K, K)  # dlib's filters are (F, C, K, K) row-major
    bias = flat[n_w:] if use_bias else np.zeros(F_, np.float32)
    net.convs.append((weight, bias))
    net.parameters += params.size
    return F_


def _read_affine(r: _Reader, layer: _Layer, C: int, net: DlibNet) -> None:
    w = layer.where
    start = r.pos
    version = r.string(f"the type name of {w}")
    if version not in ("affine_", "affine_2"):
        hint = " (a training-time batch norm: save the net with affine layers)"
        r.fail(
            f"{w} (affine_ or affine_2)", repr(version) + (hint if "bn_" in version else ""), start
        )
    params = _params(r, w, 2 * C)
    gamma, beta = r.alias(f"gamma of {w}"), r.alias(f"beta of {w}")
    mode = r.int_(f"the mode of {w}")
    if mode != 0 or gamma != (1, C, 1, 1) or beta != (1, C, 1, 1):
        r.fail(f"{w} per channel (mode 0, gamma (1, {C}, 1, 1))", f"mode {mode}, gamma {gamma}")
    disabled = r.bool_(f"disabled of {w}") if version == "affine_2" else False
    if disabled:  # dlib skips a disabled affine: the identity
        net.affines.append((np.ones(C, np.float32), np.zeros(C, np.float32)))
    else:
        net.affines.append((params[:C].copy(), params[C:].copy()))
    net.parameters += params.size


def _read_pool(r: _Reader, layer: _Layer, kind: str) -> None:
    w = layer.where
    r.name(w, (f"{kind}_2",))
    names = ("rows", "columns", "stride_y", "stride_x", "padding_y", "padding_x")
    for what, want in zip(names, layer.args, strict=True):
        r.expect_int(f"the {what} of {w}", want)


def _read_fc(r: _Reader, layer: _Layer, D: int, net: DlibNet) -> None:
    w = layer.where
    (P,) = layer.args
    version = r.name(w, ("fc_2", "fc_3"))
    start = r.pos
    outputs = r.int_(f"the output count of {w}", signed=False)
    inputs = r.int_(f"the input count of {w}", signed=False)
    if (outputs, inputs) != (P, D):
        r.fail(f"{w} from {D} to {P} features", f"{inputs} to {outputs}", start)
    params = _params(r, w, D * P)
    r.alias(f"the weights of {w}")
    r.alias(f"the biases of {w}")
    bias_mode = r.int_(f"the bias mode of {w}")
    if bias_mode != 1:  # FC_NO_BIAS: anet_type's fc_no_bias
        r.fail(f"{w} without a bias (bias mode 1)", f"bias mode {bias_mode}")
    for what in ("learning rate", "weight decay", "bias learning rate", "bias weight decay"):
        r.float_(f"the {what} multiplier of {w}", double=True)
    if version == "fc_3":
        r.bool_(f"use_bias of {w}")
    # dlib computes y = x @ W with W (D, P) row-major; facetag's Linear holds W^T (P, D).
    net.fc = params.reshape(D, P).T.copy()
    net.parameters += params.size


def _read_tail(r: _Reader, where: str, version: int) -> None:
    """add_layer's state after its details: three bools and cached tensors (ignored)."""
    for what in ("this_layer_setup_called", "gradient_input_is_stale", "output disabled"):
        r.bool_(f"{what} of {where}")
    r.tensor(f"x_grad of {where}")
    r.tensor(f"the cached output of {where}")
    if version >= 2:
        r.tensor(f"the params gradient of {where}")


def read_dlib_net(data: bytes) -> DlibNet:
    """Parse the bytes of a dlib metric network file; _FormatError where they depart."""
    r = _Reader(data)
    r.version("the loss layer", (1,))
    loss = r.name("the loss (dlib's loss_metric)", ("loss_metric_", "loss_metric_2"))
    margin, threshold = 0.1, 0.75  # the values dlib hard-coded before loss_metric_2
    if loss == "loss_metric_2":
        margin = r.float_("the loss margin")
        threshold = r.float_("the loss distance threshold")
    plan = _plan()
    # Version integers, output side first: add_layer 1 or 2, tag and skip 1, and the
    # innermost add_layer (the one holding the input layer) 2 or 3.
    versions: dict[int, int] = {}
    for i in range(len(plan) - 1, 0, -1):
        layer = plan[i]
        allowed = (1,) if layer.kind in ("tag", "skip") else (1, 2)
        versions[i] = r.version(f"the wrapper of {layer.where}", allowed)
    versions[0] = r.version(f"the wrapper of {plan[0].where}", (2, 3))
    r.name("the input layer", ("input_rgb_image_sized",))
    mean = (r.float_("avg_red"), r.float_("avg_green"), r.float_("avg_blue"))
    start = r.pos
    size = (r.int_("the input rows", signed=False), r.int_("the input columns", signed=False))
    if size != (CHIP_SIZE, CHIP_SIZE):
        r.fail(f"{CHIP_SIZE}x{CHIP_SIZE} input chips", f"{size[0]}x{size[1]}", start)
    net = DlibNet(mean_rgb=mean, margin=margin, distance_threshold=threshold)
    C = 3
    for i, layer in enumerate(plan):
        if layer.kind in ("tag", "skip"):
            continue  # nothing after their subnetwork
        if layer.kind == "con":
            C_out = _read_con(r, layer, C, net)
        elif layer.kind == "affine":
            _read_affine(r, layer, C, net)
        elif layer.kind == "relu":
            version = r.name(layer.where, ("relu_", "relu_2"))
            if version == "relu_2" and r.bool_(f"disabled of {layer.where}"):
                r.fail(f"{layer.where} enabled", "a disabled relu")
        elif layer.kind in ("max_pool", "avg_pool"):
            _read_pool(r, layer, layer.kind)
        elif layer.kind == "add_prev":
            r.name(layer.where, ("add_prev_",))
        elif layer.kind == "fc":
            _read_fc(r, layer, C, net)
        else:
            raise AssertionError(layer.kind)
        if layer.kind == "con":
            C = C_out
        if i == 0:
            _read_tail(r, layer.where, 2)  # the input add_layer: x_grad, output, grad_final
            if versions[0] >= 3:
                r.int_("the sample expansion factor")
        else:
            _read_tail(r, layer.where, versions[i])
    if r.pos != len(data):
        r.fail("the end of the file after the fc layer", f"{len(data) - r.pos} more bytes")
    return net


def _state_dict(net: DlibNet) -> dict[str, Tensor]:
    """The DlibResNet state_dict holding the file's weights (float32)."""
    model = DlibResNet()
    state = model.state_dict()
    convs = [name for name, m in model.named_modules() if type(m).__name__ == "ConvAffine"]
    assert len(convs) == len(net.convs) == len(net.affines), (len(convs), len(net.convs))
    out: dict[str, Tensor] = {}
    mean = torch.tensor(net.mean_rgb, dtype=torch.float32)
    out["input_scale"] = torch.full((3,), 1.0 / DLIB_INPUT_SCALE)
    out["input_shift"] = -mean / DLIB_INPUT_SCALE
    for name, (weight, bias), (gamma, beta) in zip(convs, net.convs, net.affines, strict=True):
        out[f"{name}.conv.weight"] = torch.from_numpy(weight.copy())
        out[f"{name}.conv.bias"] = torch.from_numpy(bias.copy())
        out[f"{name}.affine.gamma"] = torch.from_numpy(gamma)
        out[f"{name}.affine.beta"] = torch.from_numpy(beta)
    assert net.fc is not None
    out["fc.weight"] = torch.from_numpy(net.fc)
    for k, v in out.items():
        assert state[k].shape == v.shape, (k, state[k].shape, v.shape)
    assert set(out) == set(state), set(state) ^ set(out)
    return out


def packaged_dlib_model() -> Path:
    """dlib_face_recognition_resnet_model_v1.dat inside the installed face_recognition_models
    package (found without importing it: its __init__ needs pkg_resources); ModelError
    (one line, with the pip command) when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "face_recognition_models: expected the package that ships dlib's weights, got none "
            "installed; pip install face_recognition_models, or pass the .dat file"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models" / SOURCE_NAME


def load_dlib(src: Path | str) -> tuple[DlibNet, dict[str, Tensor], str]:
    """(what the file holds, a DlibResNet state_dict, the file's sha256); ModelError
    naming the file and what was expected when it is not dlib's face metric network."""
    src = Path(src)
    try:
        data = src.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{src}: no such file; expected {WHAT}") from None
    except IsADirectoryError:
        raise ModelError(f"{src}: is a directory; expected {WHAT}") from None
    except OSError as e:
        raise ModelError(f"{src}: cannot read it ({e.strerror}); expected {WHAT}") from None
    try:
        net = read_dlib_net(data)
    except _FormatError as e:
        raise ModelError(
            f"{src}: expected {WHAT}, got {e.got} at byte {e.pos} (expected there: "
            f"{e.expected}); {e.hint}"
        ) from None
    return net, _state_dict(net), hashlib.sha256(data).hexdigest()


def import_dlib(src: Path, out: Path, *, half: bool = False) -> dict[str, Any]:
    """Convert dlib's face metric network file ``src`` to a facetag model file ``out``.

    Returns the state written (see facetag.models.io for the fields load_embedder
    reads). ``half`` stores the weights as float16 (load_embedder runs them in float32);
    the model id is that of the weights as they will run. Provenance (source file name,
    sha256, licence, dlib's loss settings) is recorded under ``provenance``.
    """
    from facetag.models.io import EMBEDDER_FORMAT, weights_id

    net, state, sha256 = load_dlib(src)
    weights = {k: v.half() if half and k not in _EXACT else v for k, v in state.items()}
    as_run = {k: v.float() for k, v in weights.items()}
    model_file = {
        "format": EMBEDDER_FORMAT,
        "architecture": ARCHITECTURE,
        "embedder": weights,
        "in_channels": 3,
        "image_size": [CHIP_SIZE, CHIP_SIZE],
        "embedding_dim": EMBEDDING_DIM,
        "people": [],
        "threshold": None,
        "model_id": weights_id(as_run).replace("embedder-", f"{ARCHITECTURE}-"),
        "weights_dtype": "float16" if half else "float32",
        "provenance": {
            "source": Path(src).name,
            "sha256": sha256,
            "licence": LICENCE,
            "author": "Davis King",
            "package": "face_recognition_models 0.3.0 (PyPI)",
            "dlib_loss": {"margin": net.margin, "distance_threshold": net.distance_threshold},
            "dlib_parameters": net.parameters,
            "input_mean_rgb": list(net.mean_rgb),
            "descriptor": (
                "raw dlib descriptor (not L2-normalised); dlib's distance_threshold is a "
                "Euclidean distance between raw descriptors"
            ),
        },
    }
    save_checkpoint(out, model_file)
    return model_file


# Kept in float32 under half=True: the input normalisation is exact only in float32
# (-mean / 256 has more bits than float16 holds) and is 6 numbers.
_EXACT = frozenset({"input_scale", "input_shift"})
