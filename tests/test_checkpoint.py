"""Checkpoints: atomic writes, refusing foreign files, and bit-exact resume on CPU."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

from facetag import checkpoint as ckpt_module
from facetag.checkpoint import (
    FORMAT,
    load_checkpoint,
    save_checkpoint,
)
from facetag.config import Config, config_from_dict, config_to_dict
from facetag.errors import ModelError

NOT_OURS = r"not a facetag checkpoint; expected a file written by facetag train$"


def make_state(fill: float = 1.0) -> dict:
    model = nn.Linear(3, 2)
    nn.init.constant_(model.weight, fill)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    return {
        "epoch": 3,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "config": config_to_dict(Config()),
        "history": [{"train_loss": 1.5, "val_acc": 0.25}],
        "run_id": "abc123",
    }


def test_checkpoint_round_trip(tmp_path):
    state = make_state()
    path = save_checkpoint(tmp_path / "runs" / "x" / "last.ckpt", state)  # creates parents
    loaded = load_checkpoint(path)
    assert loaded["facetag"]["format"] == FORMAT
    assert loaded["epoch"] == 3
    assert loaded["run_id"] == "abc123"
    assert loaded["history"] == state["history"]
    assert config_from_dict(loaded["config"]) == Config()
    for key, tensor in state["model"].items():
        torch.testing.assert_close(loaded["model"][key], tensor, rtol=0, atol=0)
    restored = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=0.1)
    restored.load_state_dict(loaded["optimizer"])  # the optimizer state loads back as-is
    assert sorted(os.listdir(path.parent)) == ["last.ckpt"]  # no temp file left behind


def test_checkpoint_overwrite_keeps_one_file(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, {"epoch": 1})
    save_checkpoint(path, {"epoch": 2})
    assert load_checkpoint(path)["epoch"] == 2
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_checkpoint_failed_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    first = make_state(fill=1.0)
    save_checkpoint(path, first)

    def crash_half_way(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_module.torch, "save", crash_half_way)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, make_state(fill=2.0))
    monkeypatch.undo()
    torch.testing.assert_close(load_checkpoint(path)["model"], first["model"], rtol=0, atol=0)
    assert os.listdir(tmp_path) == ["last.ckpt"]


KILL_WRITER = textwrap.dedent(
    """
    import sys, torch
    from facetag.checkpoint import save_checkpoint
    step = 0
    while True:
        step += 1
        # 16 MB each, so a kill usually lands in the middle of a write
        save_checkpoint(sys.argv[1], {"step": step, "big": torch.full((4_000_000,), step)})
    """
)


def test_checkpoint_survives_kill_during_writes(tmp_path):
    path = tmp_path / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_WRITER, str(path)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # let a few more writes start
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = load_checkpoint(path)
    assert state["step"] >= 1
    assert (state["big"] == state["step"]).all()  # a whole checkpoint, not a mix


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage, not a checkpoint", b"PK\x03\x04truncated zip"],
    ids=["empty", "garbage", "truncated"],
)
def test_checkpoint_rejects_garbage(tmp_path, content):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=r"model\.ckpt: " + NOT_OURS):
        load_checkpoint(path)


def test_checkpoint_rejects_truncated_real_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path / "a.ckpt", make_state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=NOT_OURS):
        load_checkpoint(path)


def test_checkpoint_rejects_torch_file_without_marker(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(ModelError, match=r"weights\.pt: " + NOT_OURS):
        load_checkpoint(path)


def test_checkpoint_rejects_pickled_module_without_running_it(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(nn.Linear(3, 2), path)  # needs unpickling code: weights_only refuses it
    with pytest.raises(ModelError, match=NOT_OURS):
        load_checkpoint(path)


def test_checkpoint_rejects_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelError, match=r"nope\.ckpt: no such file; expected a checkpoint"):
        load_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(ModelError, match=NOT_OURS):
        load_checkpoint(tmp_path)


def test_checkpoint_rejects_newer_format(tmp_path):
    path = tmp_path / "future.ckpt"
    torch.save({"facetag": {"format": FORMAT + 1, "version": "9.0"}}, path)
    with pytest.raises(ModelError, match=r"expected checkpoint format <= 1, got 2 .*upgrade"):
        load_checkpoint(path)


def test_checkpoint_refuses_objects_weights_only_cannot_load(tmp_path):
    with pytest.raises(ValueError, match=r"got Config at state\['config'\]; store e\.g\."):
        save_checkpoint(tmp_path / "a.ckpt", {"config": Config()})
    assert not list(tmp_path.iterdir())


def draw_everything(g: torch.Generator) -> tuple:
    return (
        random.random(),
        float(np.random.rand()),
        torch.rand(3).tolist(),
        torch.rand(2, generator=g).tolist(),
    )
