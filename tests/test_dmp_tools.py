"""DMP's data pipeline commands (densediff.tools.dmp_data) on tiny models built here with the libraries' own classes.

Every command runs once through the real CLI (`python -m densediff.tools.dmp_data`); variants and error cases call
`main(argv)` in-process (the same code path minus the interpreter start) to keep the file fast."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from densediff.tools import dmp_data, dmp_generate
from tests.conftest import run_cli

MODULE = "densediff.tools.dmp_data"
WORDS = ("provide a caption for photo of the should contain many adjectives describe colors styles lighting and "
         "materials in be english no longer than characters caption: . , bedroom kitchen warm red soft wooden").split()


def tool(*args: str, expect_ok: bool = True):
    return run_cli("-m", MODULE, *args, expect_ok=expect_ok, timeout=300)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 1-layer GPT-2 with a word-level tokenizer (tokenizers + PreTrainedTokenizerFast, saved with
    save_pretrained); digits and a newline token are in the vocabulary so sampling produces them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_lm")
    vocab = {"[UNK]": 0, "</s>": 1}
    for w in [*WORDS, "1", "2", "150", "\n"]:
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>",
                            pad_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=128, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=1, eos_token_id=1)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A StableDiffusionPipeline folder: the tiny backbone's components with a 4-channel UNet."""
    from diffusers import StableDiffusionPipeline

    from densediff.backbones.tiny import get_dummy_components, tiny_unet

    folder = tmp_path_factory.mktemp("tiny_sd")
    components = get_dummy_components()
    components["unet"] = tiny_unet(in_channels=4)
    StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, image_encoder=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def test_gencap_writes_n_clean_captions_per_word(tiny_lm, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("bedroom\nkitchen\n")
    out = tmp_path / "captions"
    result = tool("gencap", str(words), "--model", str(tiny_lm), "-n", "20", "-o", str(out), "--seed", "3",
                  "--device", "cpu")
    assert "wrote 20 captions" in result.stdout
    first = {}
    for word in ("bedroom", "kitchen"):
        lines = (out / f"{word}.txt").read_text().split("\n")
        assert lines[-1] == "" and len(lines[:-1]) == 20  # one caption a line, nothing else
        assert all(line and line == line.strip() and not any(c.isdigit() for c in line) for line in lines[:-1])
        first[word] = lines
    # refuses to overwrite; with --overwrite the same seed gives the same captions
    assert dmp_data.main(["gencap", str(words), "--model", str(tiny_lm), "-n", "20", "-o", str(out)]) == 1
    assert dmp_data.main(["gencap", "bedroom", "--model", str(tiny_lm), "-n", "20", "-o", str(out), "--seed", "3",
                          "--overwrite", "--device", "cpu"]) == 0
    assert (out / "bedroom.txt").read_text().split("\n") == first["bedroom"]
    assert dmp_generate.clean_caption(" a 1red\nroom 150\n") == "a redroom"  # DMP deletes digits and newlines


def test_txt2img_sizes_and_saved_noise_reproduces_images(tiny_sd, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bedroom\na warm kitchen\nsoft light\n")
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--model", str(tiny_sd), "--from-file", str(prompts), "--steps", "2", "--height", "32", "--width", "40",
              "--batch-size", "2", "--device", "cpu"]
    # The noise round trip runs both generations in this process: one thread count, one rounding (a CLI child may run
    # at another thread count, and the PNGs then differ by a level here and there). The CLI runs the fresh seed below.
    assert dmp_data.main(["txt2img", *common, "--output", str(first), "--save-xt"]) == 0
    names = [f"{k:05}" for k in range(3)]
    assert sorted(p.name for p in first.iterdir()) == sorted([f"{n}.png" for n in names] + [f"{n}.npz" for n in names])
    for n in names:
        image = Image.open(first / f"{n}.png")
        assert image.size == (40, 32) and image.mode == "RGB"
        assert np.load(first / f"{n}.npz")["x"].shape == (4, 8, 10)  # the tiny VAE downsamples by 4
    # another seed, but the stored noise: the same images (DDIM is deterministic)
    assert dmp_data.main(["txt2img", *common, "--output", str(second), "--read-xt", str(first), "--seed", "1"]) == 0
    for n in names:
        assert np.array_equal(np.asarray(Image.open(first / f"{n}.png")), np.asarray(Image.open(second / f"{n}.png")))
    # a fresh seed gives other images; an existing output is refused
    tool("txt2img", *common, "--output", str(tmp_path / "third"), "--seed", "1")
    assert not np.array_equal(np.asarray(Image.open(first / "00000.png")),
                              np.asarray(Image.open(tmp_path / "third" / "00000.png")))
    assert dmp_data.main(["txt2img", *common, "--output", str(first)]) == 1


def test_txt2img_missing_model_is_one_line_naming_the_path(tmp_path):
    missing = tmp_path / "no_sd"
    result = tool("txt2img", "--model", str(missing), "--prompt", "a room", "--output", str(tmp_path / "o"),
                  expect_ok=False)
    assert result.returncode == 1 and str(missing) in result.stderr and "Traceback" not in result.stderr


def test_makemeta_pairs_sorted_images_with_captions(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("00001.png", "00000.png", "00002.jpg"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(images / name)
    (images / "notes.txt").write_text("x")
    captions = tmp_path / "captions.txt"
    captions.write_text("first\nsecond\nthird\n")
    tool("makemeta", "-i", str(images), "-c", str(captions))
    rows = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
    assert rows == [{"file_name": "00000.png", "text": "first"}, {"file_name": "00001.png", "text": "second"},
                    {"file_name": "00002.jpg", "text": "third"}]
    assert dmp_data.main(["makemeta", "-i", str(images)]) == 1  # exists
    assert str(images / "metadata.jsonl") in capsys.readouterr().err
    captions.write_text("only one\n")
    assert dmp_data.main(["makemeta", "-i", str(images), "-c", str(captions), "--overwrite"]) == 0
    assert "warning" in capsys.readouterr().err
    assert (images / "metadata.jsonl").read_text() == '{"file_name": "00000.png", "text": "only one"}\n'
    assert dmp_data.main(["makemeta", "-i", str(images), "--overwrite"]) == 0
    assert json.loads((images / "metadata.jsonl").read_text().splitlines()[2]) == {"file_name": "00002.jpg"}
    assert dmp_data.main(["makemeta", "-i", str(tmp_path / "nope")]) == 1
    assert str(tmp_path / "nope") in capsys.readouterr().err


def _reset_envs():
    """Close the loader's cached read-only environments (an LMDB about to be rewritten in this process)."""
    from densediff.data import synthetic_bedrooms

    for _, env in synthetic_bedrooms._ENVS.values():
        env.close()
    synthetic_bedrooms._ENVS.clear()


def _lmdb_items(path) -> dict[str, bytes]:
    from densediff.data.synthetic_bedrooms import open_env

    with open_env(path).begin(buffers=False) as txn:
        return {k.decode(): v for k, v in txn.cursor()}


def _bedroom_images(root, names, shape=(24, 32)):
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(images / name)
    (images / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n}) + "\n" for n in names))
    return images


def test_makedb_from_predictions_round_trips_through_synthetic_bedrooms(tmp_path, capsys):
    from densediff.data.multitask import unit
    from densediff.data.synthetic_bedrooms import SyntheticBedrooms
    from densediff.tasks.palettes import BEDROOM_CLASSES, BEDROOM_PALETTE

    names, shape = ["00000.png", "00001.png", "a.b.png"], (24, 32)
    root = tmp_path / "bedrooms"
    _bedroom_images(root, names, shape)
    rng = np.random.default_rng(1)
    preds = {}
    for task in dmp_data.TASKS:
        folder = tmp_path / "preds" / task
        (folder / "sub").mkdir(parents=True)
        for i, name in enumerate(names):
            if task == "depth":
                a = rng.uniform(0.3, 7.0, shape).astype(np.float32)
            elif task == "normals":
                a = unit(rng.normal(size=(*shape, 3)).astype(np.float32))
            elif task == "segmentation":
                a = rng.choice(BEDROOM_CLASSES, shape).astype(np.int64)
            else:
                a = rng.uniform(0, 1, (*shape, 3)).astype(np.float32)
            stem = name.rsplit(".", 1)[0]
            np.save(folder / ("sub" if i == 2 else "") / f"{stem}.npy", a)  # predict.py mirrors subfolders
            preds[task, name] = a
    db = {"depth": "depth", "normals": "normals", "albedo": "intrinsic", "shading": "intrinsic",
          "segmentation": "segmentation"}
    tool("makedb", "--task", "depth", "--predictions", str(tmp_path / "preds" / "depth"), "-o", str(root / "depth"))
    for task in ("normals", "albedo", "shading", "segmentation"):
        extra = ["--append"] if task == "shading" else []
        assert dmp_data.main(["makedb", "--task", task, "--predictions", str(tmp_path / "preds" / task),
                              "-o", str(root / db[task]), *extra]) == 0, capsys.readouterr().err
    data = SyntheticBedrooms(root, tasks=dmp_data.TASKS, split="val")
    assert len(data) == 3
    for i, name in enumerate(names):
        item = data[i]
        assert item["name"] == name
        np.testing.assert_array_equal(item["depth"].numpy(), preds["depth", name].astype(np.float16).astype(np.float32))
        normals = item["normals"].permute(1, 2, 0).numpy()
        assert np.abs(normals - preds["normals", name]).max() < 0.012  # 8-bit, re-normalised
        for task in ("albedo", "shading"):
            assert np.abs(item[task].permute(1, 2, 0).numpy() - preds[task, name]).max() <= 0.5 / 255 + 1e-6
        np.testing.assert_array_equal(item["segmentation"].numpy(), preds["segmentation", name])

    # the file frame is Omnidata's (y down): the PNG holds (n * (1, -1, 1) + 1) / 2, rounded
    normals = _lmdb_items(root / "normals")
    assert sorted(normals) == ["00000", "00001", "a"]
    expected = np.round((preds["normals", "00000.png"] * [1, -1, 1] + 1) / 2 * 255)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(normals["00000"]))), expected)
    assert sorted(_lmdb_items(root / "intrinsic")) == ["00000-r", "00000-s", "00001-r", "00001-s", "a-r", "a-s"]
    # the palette PNG reads as bedroom colours for DMP's loader (PIL .convert('RGB'))
    colours = np.asarray(Image.open(io.BytesIO(_lmdb_items(root / "segmentation")["00001"])).convert("RGB"))
    np.testing.assert_array_equal(colours, np.asarray(BEDROOM_PALETTE, np.uint8)[preds["segmentation", "00001.png"]])

    # the other segmentation formats read back too (rgb needs the palette in the loader)
    for fmt in ("rgb", "index"):
        _reset_envs()
        assert dmp_data.main(["makedb", "--task", "segmentation", "--predictions", str(tmp_path / "preds" /
                              "segmentation"), "-o", str(root / "segmentation"), "--seg-format", fmt,
                              "--overwrite"]) == 0
        other = SyntheticBedrooms(root, tasks=("segmentation",), split="val", segmentation_palette=BEDROOM_PALETTE)
        np.testing.assert_array_equal(other[2]["segmentation"].numpy(), preds["segmentation", "a.b.png"])
    _reset_envs()

    # never over an existing LMDB or key; missing inputs are named
    assert dmp_data.main(["makedb", "--task", "depth", "--predictions", str(tmp_path / "preds" / "depth"),
                          "-o", str(root / "depth")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert dmp_data.main(["makedb", "--task", "shading", "--predictions", str(tmp_path / "preds" / "shading"),
                          "-o", str(root / "intrinsic"), "--append"]) == 1
    assert "already holds key" in capsys.readouterr().err
    assert dmp_data.main(["makedb", "--task", "depth", "--predictions", str(tmp_path / "none"),
                          "-o", str(tmp_path / "db")]) == 1
    assert str(tmp_path / "none") in capsys.readouterr().err


def test_makedb_from_files_stores_raw_bytes(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    (files / "00000.png").write_bytes(b"png bytes")
    (files / "00001.tar.npz").write_bytes(b"npz bytes")
    assert dmp_data.main(["makedb", "--from-files", str(files), "-o", str(tmp_path / "db"), "--key-suffix", "r"]) == 0
    assert _lmdb_items(tmp_path / "db") == {"00000-r": b"png bytes", "00001-r": b"npz bytes"}


def test_makedb_from_tiny_backbone_matches_its_predictions(tmp_path):
    from densediff.data.multitask import unit
    from densediff.data.synthetic_bedrooms import SyntheticBedrooms

    names = ["00000.png", "00001.png"]
    root = tmp_path / "bedrooms"
    images = _bedroom_images(root, names, (32, 32))
    kept = tmp_path / "kept"
    result = tool("makedb", "--task", "normals", "--backbone", "tiny", "-i", str(images), "-o", str(root / "normals"),
                  "--keep-predictions", str(kept), "--device", "cpu", "--set", "inference.steps=1")
    assert "wrote 2 normals targets" in result.stdout
    data = SyntheticBedrooms(root, tasks=("normals",), split="val")
    for i, name in enumerate(names):
        pred = np.load(kept / name.replace(".png", ".npy"))
        assert pred.shape == (32, 32, 3)
        assert np.abs(data[i]["normals"].permute(1, 2, 0).numpy() - unit(pred)).max() < 0.012


def test_palette_conversions_round_trip(tmp_path):
    from densediff.tasks.palettes import ADE20K_PALETTE, BEDROOM_CLASSES

    ids = np.arange(150, dtype=np.uint8).reshape(10, 15)
    index_dir, colour_dir, back_dir = tmp_path / "ids", tmp_path / "colours", tmp_path / "back"
    index_dir.mkdir()
    Image.fromarray(ids).save(index_dir / "m.png")
    tool("cls2color", str(index_dir), str(colour_dir), "--palette", "ade20k")
    colours = np.asarray(Image.open(colour_dir / "m.png"))
    np.testing.assert_array_equal(colours, np.asarray(ADE20K_PALETTE, np.uint8)[ids])
    tool("color2cls", str(colour_dir), str(back_dir), "--palette", "ade20k", "--ext", "png")
    back = np.asarray(Image.open(back_dir / "m.png"))
    np.testing.assert_array_equal(back, np.where(ids == 48, 6, ids))  # (140,140,140) is 6 and 48: the lower id
    assert dmp_data.main(["color2cls", str(colour_dir), str(tmp_path / "npy"), "--palette", "ade20k"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "m.npy"), back)
    # bedroom palette, both ways; --filter: classes outside DMP's 29 are painted black, and black reads as the
    # first black id (1, as DMP's argmin over the filtered palette)
    assert dmp_data.main(["cls2color", str(index_dir), str(tmp_path / "bed")]) == 0
    assert dmp_data.main(["color2cls", str(tmp_path / "bed"), str(tmp_path / "bed_ids"), "--ext", "png"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "bed_ids" / "m.png")), np.where(ids == 48, 6, ids))
    assert dmp_data.main(["cls2color", str(index_dir), str(tmp_path / "bed_f"), "--filter"]) == 0
    target = np.isin(ids, BEDROOM_CLASSES)
    assert (np.asarray(Image.open(tmp_path / "bed_f" / "m.png"))[~target] == 0).all()
    assert dmp_data.main(["color2cls", str(tmp_path / "bed_f"), str(tmp_path / "filtered"), "--filter"]) == 0
    filtered = np.load(tmp_path / "filtered" / "m.npy")
    np.testing.assert_array_equal(filtered[target], ids[target])
    assert (filtered[~target] == 1).all()
    assert dmp_data.main(["color2cls", str(tmp_path / "bed"), str(tmp_path / "check"), "--check"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "check" / "m.png")),
                                  np.asarray(Image.open(tmp_path / "bed" / "m.png")))
    # refuses existing outputs and names missing inputs
    assert dmp_data.main(["cls2color", str(index_dir), str(colour_dir)]) == 1
    assert dmp_data.main(["color2cls", str(tmp_path / "nope"), str(tmp_path / "x")]) == 1


def test_makedb_from_a_checkpoint_reads_it_once_and_predicts_its_task(tmp_path, monkeypatch, capsys):
    """makedb --ckpt takes the task and the model from one read of the checkpoint (densediff.run.checkpoint's
    record), and stores what the checkpoint's model predicts."""
    import densediff.run.checkpoint as checkpoint_module
    from densediff.data.multitask import unit
    from densediff.data.synthetic_bedrooms import SyntheticBedrooms
    from densediff.run import compose
    from densediff.run.model import build_model

    model = build_model(compose("train", ["backbone=tiny", "task=normals"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    checkpoint = {"state_dict": {k: v for k, v in model.state_dict().items() if k in trainable},
                  "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "normals.ckpt")
    reads = []
    read = checkpoint_module.read_checkpoint
    monkeypatch.setattr(checkpoint_module, "read_checkpoint", lambda path: reads.append(path) or read(path))
    names = ["00000.png", "00001.png"]
    root = tmp_path / "bedrooms"
    images = _bedroom_images(root, names, (32, 32))
    kept = tmp_path / "kept"
    assert dmp_data.main(["makedb", "--ckpt", str(tmp_path / "normals.ckpt"), "-i", str(images), "-o",
                          str(root / "normals"), "--keep-predictions", str(kept), "--device", "cpu"]) == 0
    assert "wrote 2 normals targets" in capsys.readouterr().out
    assert len(reads) == 1
    data = SyntheticBedrooms(root, tasks=("normals",), split="val")
    for i, name in enumerate(names):
        pred = np.load(kept / name.replace(".png", ".npy"))
        assert np.abs(data[i]["normals"].permute(1, 2, 0).numpy() - unit(pred)).max() < 0.012
