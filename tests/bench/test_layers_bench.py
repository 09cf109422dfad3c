"""facetag bench train|infer: three networks (ours, eager and compiled twins), the JSON
keys, --load, the resnet twin, and the CUDA code paths with torch.cuda mocked.

These check behaviour only; the speed figures are the CLI's to print (experiments/LOG.md).
"""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from facetag.bench import layers as bench
from facetag.bench.layers import BenchSpec
from facetag.bench.resnet_twin import TwinDlibResNet, twin_zero_pad_add
from facetag.cli import app
from facetag.layers import fused, zero_pad_add
from facetag.models.resnet import DlibResNet

TINY = {"batch_size": 2, "image_size": 16, "widths": (4, 8), "warmup": 1, "steps": 2}


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile's "eager" backend for the compiled twin: the harness, minus the minutes
    inductor takes to build C++ kernels."""
    monkeypatch.setattr(bench, "_compile", lambda m: torch.compile(m, backend="eager"))


def _cli(args):
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"}, prog_name="facetag")


def _ratio_of_rounded(ratio: float, a_ms: float, b_ms: float) -> bool:
    """ratio (of the unrounded times, to 3 places) matches a_ms / b_ms, each rounded to
    0.01 ms: tiny networks take a fraction of a millisecond, so allow that rounding."""
    slack = a_ms / b_ms * (0.005 / a_ms + 0.005 / b_ms) + 0.0005
    return abs(ratio - a_ms / b_ms) <= slack * 1.01


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_run_bench_reports_all_three_networks_and_their_ratios(eager_compile, mode):
    r = bench.run_bench(BenchSpec(mode=mode, **TINY), memory=False)
    for key in ("ours_ms", "torch_ms", "torch_compiled_ms", "torch_compile_s"):
        assert r[key] > 0 if key != "torch_compile_s" else r[key] >= 0
    assert _ratio_of_rounded(r["ratio"], r["ours_ms"], r["torch_ms"])
    assert _ratio_of_rounded(r["ratio_compiled"], r["ours_ms"], r["torch_compiled_ms"])
    assert r["load"] == 0
    assert r["threads"] == torch.get_num_threads()
    assert r["loadavg_start"] >= 0
    assert r["loadavg_end"] >= 0


def test_run_bench_without_compiled_leaves_its_keys_out():
    r = bench.run_bench(BenchSpec(compiled=False, **TINY), memory=True)
    assert "torch_compiled_ms" not in r
    assert "ratio_compiled" not in r
    assert r["ours_peak_mb"] >= 0
    assert r["torch_peak_mb"] >= 0


def test_memory_probe_of_the_compiled_twin(eager_compile):
    assert bench.memory_probe(BenchSpec(**TINY), "compiled") >= 0


def test_run_bench_runs_its_load_beside_the_timed_steps(eager_compile, monkeypatch):
    started: list[int] = []
    real = bench.busy_load

    def spy(n, *args, **kwargs):
        started.append(n)
        return real(n, *args, **kwargs)

    monkeypatch.setattr(bench, "busy_load", spy)
    r = bench.run_bench(BenchSpec(**TINY), memory=False, load=2)
    assert started == [2]
    assert r["load"] == 2


def test_run_bench_threads_apply_to_the_run_only():
    before = torch.get_num_threads()
    r = bench.run_bench(BenchSpec(compiled=False, threads=1, **TINY), memory=False)
    assert r["threads"] == 1
    assert torch.get_num_threads() == before


def test_cli_bench_train_json_has_the_compiled_keys(eager_compile, monkeypatch):
    monkeypatch.setattr(fused, "COMPILE_MIN_NUMEL", 1 << 40)  # our BN + PReLU stays eager too
    r = _cli(["bench", "train", "--device", "cpu", "--steps", "1", "--batch-size", "2",
              "--no-memory", "--load", "1", "--threads", "1", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert {"torch_compiled_ms", "ratio_compiled", "torch_compile_s", "load"} <= set(out)
    assert (out["load"], out["threads"], out["model"]) == (1, 1, "cnn")


def test_cli_bench_infer_table_shows_three_rows(eager_compile):
    r = _cli(["bench", "infer", "--device", "cpu", "--steps", "1", "--batch-size", "2",
              "--no-memory"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "torch.nn compiled:" in r.stdout
    assert "ratio ours/compiled: time" in r.stdout
    assert "compile" in r.stdout
    assert "not counted" in r.stdout


def test_cli_bench_rejects_a_load_beyond_the_bound():
    r = _cli(["bench", "train", "--load", "1000"])
    assert r.exit_code == 2


def test_cli_bench_cuda_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = _cli(["bench", "train", "--device", "cuda", "--steps", "1"])
    assert r.exit_code == 1
    assert "--device cuda: expected a CUDA GPU" in r.stderr


@pytest.mark.parametrize("kw", [{"mode": "eval"}, {"model": "vit"}, {"device": "tpu"},
                                {"steps": 0}, {"threads": -1}])  # fmt: skip
def test_bench_spec_rejects_bad_values(kw):
    with pytest.raises(ValueError, match="bench: expected"):
        BenchSpec(**kw)


def test_bench_spec_accepts_cuda_and_a_resnet():
    spec = BenchSpec(device="cuda:1", model="resnet")
    assert spec.is_cuda
    assert spec.input_size == 150


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_cuda_code_paths_with_torch_cuda_mocked(eager_compile, monkeypatch, mode):
    # No GPU here: the tensors stay on the CPU, while every CUDA branch (synchronising
    # around each timed step, the device's name, the memory counters) runs against mocks.
    calls = {"sync": 0, "reset": 0}
    monkeypatch.setattr(bench, "_place", lambda t, spec: t)
    monkeypatch.setattr(bench, "_to_device", lambda m, spec, which="torch": m)
    monkeypatch.setattr(
        torch.cuda, "synchronize", lambda *a: calls.__setitem__("sync", calls["sync"] + 1)
    )
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Mock GPU")
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 1 << 20)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 5 << 20)
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda *a: calls.__setitem__("reset", 1)
    )
    spec = BenchSpec(mode=mode, device="cuda", **TINY)
    r = bench.run_bench(spec, memory=False)
    assert r["device_name"] == "Mock GPU"
    assert calls["sync"] >= 2 * 3 * TINY["steps"]  # before and after every timed step
    assert bench.memory_probe(spec, "ours") == pytest.approx(4.0)
    assert calls["reset"] == 1


def _resnet_pair(mode):
    ours, twin = bench.build_pair(BenchSpec(model="resnet", mode=mode))
    with torch.no_grad():  # non-trivial affines, so that a swapped gamma/beta shows
        for name, p in ours.named_parameters():
            if name.endswith(("gamma", "beta")):
                p.uniform_(0.5, 1.5)
    twin.load_state_dict(ours.state_dict())
    return ours, twin


def test_resnet_twin_gives_our_descriptors():
    ours, twin = _resnet_pair("infer")
    assert isinstance(ours, DlibResNet)
    assert isinstance(twin, TwinDlibResNet)
    chips = torch.rand(2, 3, 150, 150, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        expected = twin.eval()(chips)
        torch.testing.assert_close(ours.eval()(chips), expected, rtol=1e-4, atol=1e-5)
        folded = bench.inference_copy(ours, BenchSpec(model="resnet", mode="infer"))
        torch.testing.assert_close(folded(chips), expected, rtol=1e-4, atol=1e-5)


def test_resnet_twin_gives_our_gradients():
    ours, twin = _resnet_pair("train")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 150, 150, generator=g) * 2 - 1
    y = torch.tensor([3, 7])
    losses = []
    for net, loss_fn in ((ours, bench.layers.cross_entropy), (twin, nn.functional.cross_entropy)):
        loss = loss_fn(net.train()(x), y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    twin_grads = dict(twin.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, twin_grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("a", "b"),
    [((2, 4, 3, 3), (2, 2, 4, 4)), ((1, 3, 5, 5), (1, 3, 5, 5)), ((1, 2, 2, 3), (1, 4, 3, 1))],
)
def test_twin_zero_pad_add_matches_ours(a, b):
    x, skip = torch.randn(a), torch.randn(b)
    torch.testing.assert_close(twin_zero_pad_add(x, skip), zero_pad_add(x, skip))


def test_compiled_twin_keeps_torchs_cuda_home_warning_off_stderr(monkeypatch):
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    monkeypatch.setattr(log, "level", logging.NOTSET)
    monkeypatch.setattr(torch, "compile", lambda model: model)
    bench._compile(torch.nn.Linear(1, 1))
    # "No CUDA runtime is found, using CUDA_HOME=..." is a WARNING: on a CPU box it is noise.
    assert not log.isEnabledFor(logging.WARNING)
    assert log.isEnabledFor(logging.ERROR)
