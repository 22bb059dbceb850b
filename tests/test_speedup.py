"""inference.compile / inference.channels_last (densediff/inference/speedup.py) and the benchmarks that measure
them (benchmarks/bench_predictor.py, benchmarks/gpu_suite.py) at toy sizes. No timings are asserted."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from densediff.backbones import load_backbone
from densediff.inference import LatentEstimator
from densediff.inference.predictor import InferenceOptions, predict
from densediff.inference.speedup import inference_modules, speed_up
from densediff.run import ASSETS
from densediff.tasks import build_task
from densediff.tasks.ensemble import median_of_members

MARIGOLD = InferenceOptions(steps=2, ensemble=3, noise="gaussian", batch_size=3)


def tiny_estimator():
    backbone = load_backbone(ASSETS / "tiny")
    return LatentEstimator(backbone.unet.eval(), backbone.vae.eval(), backbone.scheduler,
                               backbone.empty_text_embedding)


def depth(estimator, options=MARIGOLD):
    rgb = torch.rand(1, 3, 30, 37, generator=torch.Generator().manual_seed(0))  # odd size: padded and cropped
    return predict(estimator, build_task("depth"), rgb, options, torch.Generator().manual_seed(1))


def test_channels_last_predicts_what_the_default_layout_predicts():
    eager, fast = tiny_estimator(), tiny_estimator()
    assert speed_up(fast, torch.device("cpu"), channels_last=True) is False  # not compiled
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(depth(fast), depth(eager), atol=1e-5)


def test_compile_wraps_the_modules_in_place_and_keeps_the_parameter_names():
    estimator = tiny_estimator()
    names = list(estimator.state_dict())
    assert speed_up(estimator, torch.device("cpu"), compile=True) is True  # lazy: nothing is compiled yet
    assert all(module._compiled_call_impl is not None for module in inference_modules(estimator))
    assert list(estimator.state_dict()) == names  # checkpoints and export see the same model


def test_compile_without_a_compiler_warns_and_predicts_eagerly(monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler():
        raise RuntimeError("no C++ compiler on PATH")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    estimator = tiny_estimator()
    with pytest.warns(UserWarning, match="cannot run on cpu: no working C\\+\\+ compiler.*install g\\+\\+"):
        assert speed_up(estimator, torch.device("cpu"), compile=True) is False
    assert all(module._compiled_call_impl is None for module in inference_modules(estimator))
    assert torch.equal(depth(estimator), depth(tiny_estimator()))


def test_a_model_without_an_estimator_is_left_alone_with_a_warning():
    with pytest.warns(UserWarning, match="latent models only"):
        assert speed_up(None, torch.device("cpu"), compile=True) is False


@pytest.mark.slow  # Inductor compiles the tiny UNet and VAE: minutes on 2 CPU cores without a warm cache
def test_compiled_prediction_matches_eager():
    compiled = tiny_estimator()
    speed_up(compiled, torch.device("cpu"), compile=True)
    options = InferenceOptions()  # E2E-FT's single step
    assert torch.allclose(depth(compiled, options), depth(tiny_estimator(), options), atol=1e-4)


@pytest.mark.parametrize("members", [1, 2, 4, 5, 10])
def test_median_of_members_is_torch_median_exactly(members):
    values = torch.randn(members, 7, 9, generator=torch.Generator().manual_seed(members))
    values[0, 0, 0] = values[-1, 0, 0]  # ties
    assert torch.equal(median_of_members(values), values.median(dim=0).values)
    values[0, 1, 1] = float("nan")  # torch's NaN rule holds
    assert torch.equal(median_of_members(values).isnan(), values.median(dim=0).values.isnan())


def run_script(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_predictor_benchmark_runs_at_a_toy_size_and_writes_json(tmp_path):
    out = tmp_path / "predictor.json"
    result = run_script(ROOT / "benchmarks" / "bench_predictor.py", "--height", 16, "--width", 16, "--reps", 1,
                        "--modes", "channels_last", "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    rows = report["results"]
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["gpu"] is None  # benchmarks/report.py
    assert {(r["mode"], r["setting"], r["implementation"]) for r in rows} == {
        ("channels_last", setting, who) for who in ("densediff", "diffusers")
        for setting in ("1 step", "4 steps x ensemble 5")}
    assert all(r["latency_s"] > 0 and r["peak_memory_mib"] > 0 and r["first_call_s"] > 0 for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the refusal is for machines without it")
def test_gpu_suite_refuses_without_cuda(tmp_path):
    """Its CPU path (--toy) runs in tests/test_gpu_check.py, through the GPU check that calls it."""
    refused = run_script(ROOT / "benchmarks" / "gpu_suite.py", "--out", tmp_path / "refused.json")
    assert refused.returncode != 0 and "needs a CUDA GPU" in refused.stderr
    assert not (tmp_path / "refused.json").exists()
