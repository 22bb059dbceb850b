"""The model card (README.md) densediff.export writes into an exported diffusers folder."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import read_metrics, run_cli
from PIL import Image


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    """An evaluate.py run of the shared quickstart checkpoint (its test split)."""
    run = tmp_path_factory.mktemp("evaluated") / "eval"
    run_cli("evaluate.py", f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}", "dataset.test.num_scenes=2",
            "dataset.val_batch_size=2", "logger=none", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}")
    return run


def test_exported_folder_has_a_model_card_whose_example_runs(trained_run, evaluated, tmp_path, monkeypatch):
    import torch
    from huggingface_hub import ModelCard

    from densediff.export import export

    folder = tmp_path / "exported"
    with torch.no_grad():
        export(trained_run / "checkpoints" / "last.ckpt", folder, metrics=evaluated)
    card = ModelCard.load(folder / "README.md")  # the front matter parses as the Hub reads it
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "depth-estimation"
    assert {"densediff", "e2e-ft", "depth-estimation"} <= set(card.data.tags)
    assert card.data.base_model is None  # the tiny backbone comes from no Hub repo; a local path is not a base_model
    text = card.text
    assert "MarigoldDepthPipeline" in text and "| experiment | quickstart |" in text and "| task | depth |" in text
    assert "split `test`" in text
    for name, value in read_metrics(evaluated).items():  # evaluate.py's results, not the training validation's
        assert f"| {name} | {value:.4f} |" in text

    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) == 3
    monkeypatch.chdir(tmp_path)  # the example reads image.png from where it runs
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save("image.png")
    namespace = {}
    exec(code.replace(repr(str(folder)), repr(str(folder.resolve()))), namespace)
    prediction = namespace["prediction"]
    assert prediction.shape == (1, 40, 56, 1) and np.isfinite(prediction).all()


def test_card_defaults_to_the_training_validation_and_never_replaces_a_file(trained_run, tmp_path):
    import torch

    from densediff.export import export

    folder = tmp_path / "exported"
    with torch.no_grad():
        export(trained_run / "checkpoints" / "last.ckpt", folder)
    text = (folder / "README.md").read_text()
    assert "split `val`" in text and "validation at the end of training" in text
    assert f"| abs_rel | {read_metrics(trained_run)['abs_rel']:.4f} |" in text

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes\n")
    with pytest.raises(FileExistsError):
        export(trained_run / "checkpoints" / "last.ckpt", mine)
    assert (mine / "README.md").read_text() == "my notes\n"
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        export(trained_run / "checkpoints" / "last.ckpt", tmp_path / "other", metrics=tmp_path / "mine")
    assert not (tmp_path / "other").exists()
