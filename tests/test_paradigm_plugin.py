"""A paradigm is a plug-in (issue 26): its module and its objective yaml, nothing in the run layer
(docs/architecture.md#adding-a-paradigm). The run layer names no paradigm; a paradigm defined outside densediff is
built, checkpointed and loaded through its `_target_` and its hooks alone; checkpoints in the format written before
the paradigms became plug-ins still load and predict."""

from __future__ import annotations

import ast
import contextlib
import io
import re
import tokenize
from pathlib import Path

import lightning
import torch
import yaml
from conftest import ROOT

from densediff.inference.predictor import InferenceOptions
from densediff.paradigms import PARADIGMS, E2EFineTune, GeoWizardEstimator, paradigm_class
from densediff.run import ASSETS, compose, load_predictor
from densediff.run.checkpoint import read_record
from densediff.run.model import build_model

TINY = str(ASSETS / "tiny")

# Names the run layer may still hold, each with its reason: (module, a pattern of the text); allowed, not required.
ALLOWED = [
    # the ${densediff_tiny_geowizard:} resolver of conf/backbone/tiny_geowizard.yaml (the tiny_geowizard backbone
    # built by backbones/geowizard_build.py, not a paradigm), registered in run/config.py until the commands prepare
    # the process (issue 26, item 6)
    ("config.py", re.compile(r"tiny_geowizard|backbones\.geowizard_build")),
]


def paradigm_names() -> set[str]:
    """Every paradigm's name: the checkpoint names and class names of the registry, and the objective configs'."""
    with contextlib.suppress(KeyError):
        paradigm_class("")  # imports every module of densediff/paradigms/: each registers its paradigm
    names = {name.lower() for name in PARADIGMS} | {c.__name__.lower() for c in PARADIGMS.values()}
    for path in (ROOT / "conf" / "objective").glob("*.yaml"):
        names |= {path.stem.lower(), str(yaml.safe_load(path.read_text())["name"]).lower()}
    return names


def named_paradigms(source: str, names: set[str]) -> list[tuple[int, str, str]]:
    """(line, name, the text) for every identifier, string literal and comment of `source` that holds one of `names`
    as a word (underscores, dots, dashes and case changes do not hide it: self_improving_steps, "objective=lotus",
    PARADIGMS["geowizard"], E2E-FT and GeoWizardEstimator all count)."""
    pattern = re.compile(r"(?<![a-z0-9])(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True))
                         + r")(?![a-z0-9])")
    texts = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            texts.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            texts.append((node.lineno, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            texts.append((node.lineno, node.name))
        elif isinstance(node, ast.arg):
            texts.append((node.lineno, node.arg))
        elif isinstance(node, ast.keyword) and node.arg:
            texts.append((node.lineno, node.arg))
        elif isinstance(node, ast.alias):
            texts += [(node.lineno, node.name), (node.lineno, node.asname or "")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            texts.append((node.lineno, node.module))
    texts += [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type == tokenize.COMMENT]
    return [(line, match.group(1), text) for line, text in texts for match in pattern.finditer(text.lower())]


def test_the_scan_finds_a_paradigm_however_it_is_named():
    names = paradigm_names()
    assert {"e2e", "diffusion", "geowizard", "multitask", "self_improving", "lotus", "lotusx0",
            "geowizardestimator"} <= names
    caught = {
        'if cfg.objective.name == "lotus":\n    pass\n': "lotus",
        'model = PARADIGMS["geowizard"]\n': "geowizard",
        'self_improving_steps(cfg)\n': "self_improving",
        'from densediff.paradigms.multitask import build_encoder\n': "multitask",
        'from densediff.paradigms import LotusX0\n': "lotusx0",
        'x = f"objective={name}, not E2E-FT"\n': "e2e",
        'x = 1  # the diffusion estimator\'s special case\n': "diffusion",
        'def f(geowizard_domain=None):\n    pass\n': "geowizard",
    }
    for source, name in caught.items():
        assert name in {found for _, found, _ in named_paradigms(source, names)}, source
    assert not named_paradigms('import densediff.diffusers_io\nx = "densediff, diffusers, encoder"\n', names)


def test_the_run_layer_names_no_paradigm():
    names, found = paradigm_names(), []
    modules = sorted((ROOT / "densediff" / "run").glob("*.py"))
    assert len(modules) >= 8
    for module in modules:
        found += [f"{module.name}:{line}: {name} in {text!r}" for line, name, text in
                  named_paradigms(module.read_text(), names)
                  if not any(module.name == m and allowed.search(text) for m, allowed in ALLOWED)]
    assert not found, "the run layer names paradigms (make it a hook of the class):\n" + "\n".join(found)


def test_export_names_no_lotus():
    """export.py writes every paradigm's folder through its class (export_pipeline, card_tag): the newest paradigm
    is not named there (the older ones' reference names in its prose, E2E-FT and Marigold, describe the layout)."""
    source = (ROOT / "densediff" / "export.py").read_text()
    assert not named_paradigms(source, {"lotus", "lotusx0", "geowizard", "multitask", "self_improving"})


TOY_MODULE = '''
from densediff.paradigms.base import Paradigm, PredictionFiles
from densediff.paradigms.e2e import E2EFineTune


class ToyFineTune(E2EFineTune, Paradigm):
    """E2E-FT with a different timestep default and its own hooks: a paradigm that lives outside densediff."""
    paradigm = "toy_plugin"

    @classmethod
    def prediction_files(cls, hparams, task, ensemble):
        return PredictionFiles(uncertainty=True, uncertainty_full_scale=1.0)
'''


def test_a_paradigm_outside_densediff_is_built_saved_and_loaded_by_its_target_alone(tmp_path, monkeypatch):
    (tmp_path / "toy_plugin_module.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    configs = tmp_path / "configs"
    (configs / "objective").mkdir(parents=True)
    (configs / "objective" / "toy_plugin.yaml").write_text(
        "name: toy_plugin\n_target_: toy_plugin_module.ToyFineTune\ntimestep: 500\nlr: 1.0e-4\n")
    cfg = compose("train", [f"hydra.searchpath=[file://{configs}]", "objective=toy_plugin", "backbone=tiny"])
    try:
        _build_save_and_load(cfg, tmp_path)
    finally:
        PARADIGMS.pop("toy_plugin", None)


def _build_save_and_load(cfg, tmp_path):
    model = build_model(cfg)
    assert type(model).__name__ == "ToyFineTune" and model.hparams.timestep == 500 and model.hparams.lr == 1e-4
    assert PARADIGMS["toy_plugin"] is type(model)
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}  # no Lightning keys
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "toy.ckpt")
    record = read_record(tmp_path / "toy.ckpt")
    assert record.paradigm == "toy_plugin" and record.model_class is type(model)
    assert record.model_class.prediction_files(record.hparams, "depth", 1).uncertainty
    loaded = record.load()
    assert loaded.hparams.timestep == 500
    assert torch.equal(loaded.estimator.unet.conv_in.weight, model.estimator.unet.conv_in.weight)


# Checkpoints in the format written before the paradigms became plug-ins (main at issue 26): Lightning's keys, the
# trainable weights, the constructor arguments as model_arguments/geowizard_arguments built them (flat backbone and
# adapter keys), densediff_paradigm (absent in the oldest: E2E-FT) and densediff_inference. Written out here, so
# that a change of the constructors' arguments cannot follow unnoticed.
E2E_HPARAMS = dict(backbone_path=TINY, task="depth", task_options={"min_depth": 0.1, "max_depth": 20.0},
                   adapter="full", adapter_rank=8, adapter_alpha=None, unet_in_channels=8, halve_conv_in_bias=False,
                   attention="sdpa", gradient_checkpointing=False, normals_frame="canonical",
                   normals_decode="normalize_clip", timestep=999, lr=3e-5, weight_decay=0.01, betas=(0.9, 0.999),
                   warmup_steps=100, decay_steps=20000, final_lr_ratio=0.01, gallery_size=4)


def current_arguments(flat: dict) -> dict:
    """The constructor arguments of today's classes for main's flat ones: the backbone keys as `backbone`, the
    adapter keys as `adapter` (written out here, not with the code under test)."""
    rest = dict(flat)
    backbone = {"path": rest.pop("backbone_path")}
    for key in ("unet_in_channels", "halve_conv_in_bias", "attention", "gradient_checkpointing", "normals_frame",
                "normals_decode"):
        backbone[key] = rest.pop(key)
    adapter = {"kind": rest.pop("adapter"), "rank": rest.pop("adapter_rank"), "alpha": rest.pop("adapter_alpha")}
    return {**rest, "backbone": backbone, "adapter": adapter}


def old_checkpoint(model, hparams: dict, paradigm: str | None, path: Path) -> Path:
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    checkpoint = {"epoch": 0, "global_step": 2, "pytorch-lightning_version": lightning.__version__,
                  "state_dict": {k: v for k, v in model.state_dict().items() if k in trainable}, "loops": {},
                  "callbacks": {}, "optimizer_states": [], "lr_schedulers": [], "hparams_name": "kwargs",
                  "hyper_parameters": hparams,
                  "densediff_inference": {"steps": 1, "ensemble": 1, "noise": "zeros", "seed": 0}}
    if paradigm is not None:
        checkpoint["densediff_paradigm"] = paradigm
    torch.save(checkpoint, path)
    return path


@torch.no_grad()
def test_an_old_e2e_checkpoint_without_its_paradigms_name_loads_and_predicts(tmp_path):
    torch.manual_seed(0)
    model = E2EFineTune(**current_arguments(E2E_HPARAMS))
    model.estimator.unet.conv_in.weight.add_(0.05 * torch.randn_like(model.estimator.unet.conv_in.weight))
    path = old_checkpoint(model, E2E_HPARAMS, None, tmp_path / "old_e2e.ckpt")
    loaded, _, _ = load_predictor(["device=cpu"], path)
    assert type(loaded) is E2EFineTune and loaded.task.name == "depth"
    rgb = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    model.eval().inference = loaded.inference
    torch.testing.assert_close(loaded.predict(rgb), model.predict(rgb), atol=1e-5, rtol=0)
    fresh = E2EFineTune(**current_arguments(E2E_HPARAMS)).eval()
    fresh.inference = loaded.inference
    assert (fresh.predict(rgb) - model.predict(rgb)).abs().max() > 1e-3  # the checkpoint's weights were loaded


@torch.no_grad()
def test_an_old_checkpoints_flat_backbone_and_adapter_keys_load_as_the_dicts(tmp_path):
    """Main's flat keys with values other than the defaults (a LoRA adapter, the x-left frame, clip-then-normalize):
    the record and the loaded model hold them as the `backbone` and `adapter` dicts, the task decodes with them and
    the adapter's weights load."""
    flat = {**E2E_HPARAMS, "task": "normals", "task_options": {}, "adapter": "lora", "adapter_rank": 4,
            "adapter_alpha": 4.0, "normals_frame": "x_left", "normals_decode": "clip_normalize"}
    torch.manual_seed(0)
    model = E2EFineTune(**current_arguments(flat))
    lora = [p for name, p in model.estimator.unet.named_parameters() if "lora_B" in name]
    assert lora and all(p.requires_grad for p in lora)
    for weight in lora:  # LoRA's B starts at zero: give the adapter an effect
        weight.add_(0.05 * torch.randn_like(weight))
    path = old_checkpoint(model, flat, None, tmp_path / "old_lora.ckpt")
    record = read_record(path)
    assert record.hparams["backbone"] == {"path": TINY, "unet_in_channels": 8, "halve_conv_in_bias": False,
                                          "attention": "sdpa", "gradient_checkpointing": False,
                                          "normals_frame": "x_left", "normals_decode": "clip_normalize"}
    assert record.hparams["adapter"] == {"kind": "lora", "rank": 4, "alpha": 4.0}
    assert not {"backbone_path", "adapter_rank", "adapter_alpha", "normals_frame"} & set(record.hparams)
    loaded, _, _ = load_predictor(["device=cpu", "task=normals"], path)
    assert loaded.hparams.adapter == record.hparams["adapter"]
    assert loaded.task.model_frame == "x_left" and loaded.task.decode_order == "clip_normalize"
    rgb = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    model.eval().inference = loaded.inference
    torch.testing.assert_close(loaded.predict(rgb), model.predict(rgb), atol=1e-5, rtol=0)


@torch.no_grad()
def test_an_old_geowizard_checkpoint_loads_as_objective_geowizard_and_predicts_either_geometry(tmp_path_factory):
    from densediff.backbones.geowizard_build import tiny_geowizard_folder

    folder = tiny_geowizard_folder(tmp_path_factory.mktemp("cache"))
    hparams = dict(backbone_path=str(folder), task="depth", task_options={"min_depth": 0.1, "max_depth": 20.0},
                   other_task_options={}, domain="indoor", joint_attention=True, adapter="full", adapter_rank=8,
                   adapter_alpha=None, unet_in_channels=8, halve_conv_in_bias=False, attention="sdpa",
                   gradient_checkpointing=False, normals_frame="opencv", normals_decode="normalize_clip",
                   conditioning="concat", prediction_type=None, noise="pyramid", noise_annealing=True,
                   pyramid_discount=0.9, training_noise="independent", masked_loss=False, class_embedding_lr_mult=10.0,
                   latent="mean", prompts="empty", zero_snr=False, lr=3e-5, weight_decay=0.01, betas=(0.9, 0.999),
                   lr_schedule="constant", warmup_steps=0, decay_steps=25000, final_lr_ratio=0.01, gallery_size=4)
    torch.manual_seed(0)
    model = GeoWizardEstimator(**current_arguments(hparams))
    model.estimator.unet.conv_in.weight.add_(0.05 * torch.randn_like(model.estimator.unet.conv_in.weight))
    path = old_checkpoint(model, hparams, "geowizard", tmp_path_factory.mktemp("old") / "old_geowizard.ckpt")
    loaded, _, _ = load_predictor(["device=cpu", "task=normals"], path)
    assert type(loaded) is GeoWizardEstimator and loaded.task.name == "normals"  # task= picks the geometry
    options = InferenceOptions(steps=1, noise="gaussian", timestep_spacing="leading", final_step="prev_sample", seed=0)
    rgb = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    model.eval().inference = loaded.inference = options
    torch.testing.assert_close(loaded.predict(rgb), model.predict_geometries(rgb)["normals"], atol=1e-5, rtol=0)
