"""The trainer: output files, atomic checkpoints, exact resume, compatibility checks and a
two-process (torchrun, gloo) run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastcl.data import ImageData
from fastcl.train import (TrainConfig, evaluate_checkpoint, load_checkpoint, save_checkpoint,
                          train)


def tiny_data(n_train=64, n_test=32, side=8, seed=0):
    """Two classes told apart by where a bright square sits: learnable in a few steps."""
    rng = np.random.default_rng(seed)

    def draw(n):
        y = rng.integers(0, 2, n)
        x = rng.integers(0, 40, (n, 1, side, side)).astype(np.uint8)
        for i, label in enumerate(y):
            r = 0 if label == 0 else side // 2
            x[i, 0, r:r + side // 2, :side // 2] = 230
        return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))

    return ImageData("tiny", *draw(n_train), *draw(n_test), ["top", "bottom"])


def tiny_config(out, **kw):
    values = dict(method="simclr", backbone="resnet18", width=0.125, batch_size=16, epochs=2,
                  out=str(out), progress=False, deterministic=True,
                  hparams=dict(proj_hidden=32, proj_dim=16))
    values.update(kw)
    return TrainConfig(**values)


def test_outputs(tmp_path):
    result = train(tiny_config(tmp_path), data=tiny_data())
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == ["epoch", "loss", "lr", "images_per_s", "knn_top1", "seconds"]
    assert len(lines) == 3
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == result
    for key in ("knn_top1", "linear_top1"):
        assert 0.0 <= written[key] <= 1.0
    assert (tmp_path / "curves.png").stat().st_size > 1000
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 2 and state["config"]["method"] == "simclr"


def _interrupt_after_first_epoch(epoch, row):
    if epoch == 0:
        raise KeyboardInterrupt


RESUMED = {  # method -> (backbone, hyper-parameters)
    "simclr": ("resnet18", dict(proj_hidden=32, proj_dim=16)),
    "swav": ("resnet18", dict(proj_hidden=32, proj_dim=16, num_prototypes=10, num_small_crops=1)),
    # Its block masks come from the step's generator too.
    "dinov2": ("vit_small", dict(out_dim=16, head_hidden=32, bottleneck=16)),
}


@pytest.mark.parametrize("method", sorted(RESUMED))
def test_exact_resume(tmp_path, method):
    backbone, hparams = RESUMED[method]
    full = tiny_config(tmp_path / "full", method=method, backbone=backbone, hparams=hparams)
    train(full, data=tiny_data())
    parts = tiny_config(tmp_path / "parts", method=method, backbone=backbone, hparams=hparams)
    with pytest.raises(KeyboardInterrupt):
        train(parts, data=tiny_data(), on_epoch_end=_interrupt_after_first_epoch)
    assert load_checkpoint(tmp_path / "parts" / "last.pt")["epoch"] == 1
    if method == "swav":  # a checkpoint without a baseline: probed on the encoder as built
        state = load_checkpoint(tmp_path / "parts" / "last.pt")
        del state["baseline"]
        save_checkpoint(tmp_path / "parts" / "last.pt", state)
    parts.resume = True
    train(parts, data=tiny_data())
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "parts" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert a["history"][1]["loss"] == b["history"][1]["loss"]
    assert a["baseline"] == b["baseline"]  # computed once, before the first epoch, kept by resume
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("full", "parts")]
    assert metrics[0] == {**metrics[1], "train_seconds": metrics[0]["train_seconds"],
                          "images_per_s": metrics[0]["images_per_s"]}


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # interrupted in the middle of writing

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_nan_loss_names_the_epoch_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A loss that turns NaN in the second epoch: the error names epoch 2/2 as the progress line
    counts it, last.pt (epoch 1, left as it was) and the settings that can cause it."""
    from fastcl.methods import SimCLR

    forward = SimCLR.forward
    monkeypatch.setattr(SimCLR, "forward", lambda self, views, *, epoch=0, **kw: forward(
        self, views, epoch=epoch, **kw) * (float("nan") if epoch == 1 else 1.0))
    with pytest.raises(FloatingPointError) as error:
        train(tiny_config(tmp_path, epochs=2), data=tiny_data())
    message = str(error.value)
    assert "nan in epoch 2/2" in message and f"{tmp_path / 'last.pt'} (epoch 1)" in message
    assert all(option in message for option in ("--lr", "--weight-decay", "--warmup-epochs"))
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


def test_nan_loss_in_the_first_epoch_leaves_no_folder(tmp_path, monkeypatch):
    """A loss that is NaN from the start: the error says no checkpoint was written, and the output
    folder the run made is gone (an existing folder would be left as it was)."""
    from fastcl.methods import SimCLR

    forward = SimCLR.forward
    monkeypatch.setattr(SimCLR, "forward", lambda self, views, **kw: forward(
        self, views, **kw) * float("nan"))
    with pytest.raises(FloatingPointError, match="no checkpoint was written"):
        train(tiny_config(tmp_path / "run", epochs=2), data=tiny_data())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value, match", [
    ("lr", float("inf"), "--lr must be a finite number > 0"),
    ("weight_decay", -1.0, "--weight-decay must be a finite number >= 0"),
    ("warmup_epochs", 2, "--warmup-epochs must be an integer from 0 to --epochs - 1 = 1"),
    ("batch_size", 1, "--batch-size must be an integer >= 2"),
    ("knn_k", 0, "--knn-k must be an integer >= 1"),
    ("device", "gpu0", "--device must be auto, cpu, cuda or cuda:N"),
])
def test_options_are_checked_before_the_output_folder_exists(tmp_path, option, value, match):
    with pytest.raises(ValueError, match=match):
        train(tiny_config(tmp_path / "run", **{option: value}), data=tiny_data())
    assert not (tmp_path / "run").exists()


def test_default_warmup_leaves_an_epoch_of_decay(tmp_path):
    assert tiny_config(tmp_path, epochs=1).resolved().warmup_epochs == 0
    assert tiny_config(tmp_path, epochs=3).resolved().warmup_epochs == 1


def test_outputs_are_replaced_atomically(tmp_path, monkeypatch):
    """metrics.json, like last.pt, is written whole or not at all: an interrupted write keeps the
    previous run's file."""
    train(tiny_config(tmp_path, epochs=1), data=tiny_data())
    before = (tmp_path / "metrics.json").read_text()

    def interrupted_encode(self, o, _one_shot=False):
        yield "{"
        raise KeyboardInterrupt  # in the middle of writing metrics.json

    monkeypatch.setattr(json.JSONEncoder, "iterencode", interrupted_encode)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path, epochs=2, resume=True), data=tiny_data())
    assert (tmp_path / "metrics.json").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "last.pt", "metrics.csv",
                                            "metrics.json"]


def test_resume_rejects_other_method_or_backbone(tmp_path):
    train(tiny_config(tmp_path, epochs=1), data=tiny_data())
    with pytest.raises(ValueError, match="method 'simclr'"):
        train(tiny_config(tmp_path, epochs=2, method="swav", resume=True,
                          hparams=dict(num_prototypes=10)), data=tiny_data())
    with pytest.raises(ValueError, match="width"):
        train(tiny_config(tmp_path, epochs=2, width=0.25, resume=True), data=tiny_data())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tiny_config(tmp_path / "elsewhere", resume=True), data=tiny_data())
    with pytest.raises(ValueError, match="not a fastcl training checkpoint"):
        torch.save({"weights": 1}, tmp_path / "other.pt")
        load_checkpoint(tmp_path / "other.pt")


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="backbone must be one of"):
        train(tiny_config(tmp_path, backbone="vgg"), data=tiny_data())
    with pytest.raises(ValueError, match="precision"):
        train(tiny_config(tmp_path, precision="fp8"), data=tiny_data())
    with pytest.raises(ValueError, match="larger than"):
        train(tiny_config(tmp_path, batch_size=1000), data=tiny_data())


def test_bf16_and_evaluate_checkpoint(tmp_path):
    train(tiny_config(tmp_path, epochs=1, precision="bf16"), data=tiny_data())
    data_path = tmp_path / "tiny.npz"
    d = tiny_data()
    np.savez(data_path, x_train=d.x_train.numpy(), y_train=d.y_train.numpy(),
             x_test=d.x_test.numpy(), y_test=d.y_test.numpy())
    result = evaluate_checkpoint(tmp_path / "last.pt", str(data_path), device="cpu")
    assert result["epoch"] == 1 and 0 <= result["knn_top1"] <= 1


def _two_process_run(tmp_path, method, *options):
    """torchrun --nproc_per_node=2 -m fastcl train METHOD on the tiny data -> the checkpoint."""
    d = tiny_data()
    data_path = tmp_path / "tiny.npz"
    np.savez(data_path, x_train=d.x_train.numpy(), y_train=d.y_train.numpy(),
             x_test=d.x_test.numpy(), y_test=d.y_test.numpy())
    out = tmp_path / f"run{'-'.join(options)}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--standalone", "-m", "fastcl", "train", method, "--data", str(data_path),
           "--epochs", "1", "--batch-size", "8", "--width", "0.125", "--proj-hidden", "32",
           "--out", str(out), "--no-progress", "--device", "cpu", "--deterministic", *options]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "metrics.json").read_text())
    assert 0 <= result["knn_top1"] <= 1
    return load_checkpoint(out / "last.pt")


def test_two_process_gloo_run(tmp_path):
    """torchrun --nproc_per_node=2 -m fastcl train: DDP on CPU (gloo) with gathered losses."""
    state = _two_process_run(tmp_path, "simclr")
    # 64 images, 8 per process, 2 processes: 4 steps of a global batch of 16.
    assert state["history"][0]["epoch"] == 1
    assert state["optimizer"]["state"]  # the optimizer stepped


@pytest.mark.parametrize("method", ["simclr", "simclrv2", "mocov3", "supcon"])
def test_two_process_ring_run_equals_all_gather(tmp_path, method):
    """--gather ring trains the same weights as the all-gather (each rank's loss and gradients
    are those of every rank's rows either way), to float rounding."""
    gathered = _two_process_run(tmp_path, method)
    ring = _two_process_run(tmp_path, method, "--gather", "ring")
    assert gathered["config"]["gather"] == "all" and ring["config"]["gather"] == "ring"
    assert ring["optimizer"]["state"]  # the optimizer stepped
    for name, value in gathered["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(ring["model"][name], value, rtol=1e-4, atol=1e-5,
                                       msg=name)


def test_ring_needs_a_ring_method(tmp_path):
    with pytest.raises(ValueError, match="gather 'ring' is not available for byol"):
        train(tiny_config(tmp_path, method="byol", gather="ring"), data=tiny_data())
    with pytest.raises(ValueError, match="gather must be one of"):
        train(tiny_config(tmp_path, gather="rings"), data=tiny_data())


def test_training_crops_keep_the_data_min_crop_side(tmp_path, monkeypatch):
    """train() hands the data set's min_crop_side to the method (its crops never go below it)."""
    import dataclasses

    import fastcl.train as train_module

    built = []
    build = train_module.build_method

    def recording_build(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train_module, "build_method", recording_build)
    data = dataclasses.replace(tiny_data(side=16), min_crop_side=13)
    train(tiny_config(tmp_path, epochs=1), data=data)
    assert built[0].min_crop_side == 13
    assert all(r.scale[0] >= (13 / 16) ** 2 - 1e-9 for r in built[0].recipes)


def _tiny_folder(root, data):
    """`data`'s images as an ImageFolder of PNGs, every third one enlarged to a 12x10 rectangle
    (train/ and val/, classes top and bottom)."""
    from PIL import Image

    for split, x, y in (("train", data.x_train, data.y_train), ("val", data.x_test, data.y_test)):
        for i, (image, label) in enumerate(zip(x, y)):
            folder = root / split / data.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(image[0].numpy(), "L")
            (im.resize((12, 10)) if i % 3 == 0 else im).save(folder / f"{i:03d}.png")
    return root


def _weights(path):
    return load_checkpoint(path)["model"]


def test_streamed_training_resumes_exactly_with_workers(tmp_path):
    """A streamed ImageFolder (cache never): the same run with 0 or 2 decoding workers, and with
    2 workers interrupted after its first epoch and resumed, ends with the same weights."""
    folder = str(_tiny_folder(tmp_path / "data", tiny_data(n_train=48, n_test=16)))
    options = dict(data=folder, image_size=8, cache="never", epochs=2)
    train(tiny_config(tmp_path / "w0", workers=0, **options))
    train(tiny_config(tmp_path / "w2", workers=2, **options))
    parts = tiny_config(tmp_path / "parts", workers=2, **options)
    with pytest.raises(KeyboardInterrupt):
        train(parts, on_epoch_end=_interrupt_after_first_epoch)
    state = load_checkpoint(tmp_path / "parts" / "last.pt")
    assert state["sampler"] == {"seed": 0, "epoch": 1} and state["data"]["streamed"]
    parts.resume = True
    train(parts)
    runs = [_weights(tmp_path / run / "last.pt") for run in ("w0", "w2", "parts")]
    for key, tensor in runs[0].items():
        assert torch.equal(tensor, runs[1][key]) and torch.equal(tensor, runs[2][key]), key
    # Streamed and cached runs crop differently (decode-time crops only when streamed).
    train(tiny_config(tmp_path / "cached", workers=0, **{**options, "cache": "always"}))
    cached = _weights(tmp_path / "cached" / "last.pt")
    assert not all(torch.equal(t, cached[k]) for k, t in runs[0].items())


def test_baseline_is_the_untrained_encoder_and_knn_k_is_capped(tmp_path, monkeypatch):
    """metrics.json's baseline is the probe of the encoder as built (same architecture and seed),
    taken before the first step; every kNN of the run uses k capped to half the smallest
    class's training images."""
    import fastcl.train as train_module
    from fastcl import evaluate

    data = tiny_data()
    probed, ks = [], []
    probe, knn = train_module._probe, evaluate.knn_accuracy

    def recording_probe(method, *args, **kwargs):
        probed.append({k: v.clone() for k, v in method.backbone.state_dict().items()})
        return probe(method, *args, **kwargs)

    def recording_knn(*args, k, **kwargs):
        ks.append(k)
        return knn(*args, k=k, **kwargs)

    monkeypatch.setattr(train_module, "_probe", recording_probe)
    monkeypatch.setattr(evaluate, "knn_accuracy", recording_knn)
    config = tiny_config(tmp_path, epochs=2)
    result = train(config, data=data)
    assert set(ks) == {result["knn_k"]} and len(ks) == 4  # baseline, 2 epochs, final
    untrained = train_module._build(config, data)  # the same options and seed, no step taken
    initial = untrained.method.backbone.state_dict()
    assert len(probed) == 2  # the baseline, then the final metrics
    assert all(torch.equal(t, initial[k]) for k, t in probed[0].items())
    assert not all(torch.equal(t, initial[k]) for k, t in probed[1].items())
    expected = probe(untrained.method, data, torch.device("cpu"), untrained.mean, untrained.std,
                     result["knn_k"])
    assert result["baseline"] == expected
    smallest = int(torch.bincount(data.y_train).min())
    assert result["knn_k"] == smallest // 2 < config.knn_k
