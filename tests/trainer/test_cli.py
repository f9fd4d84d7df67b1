"""The command line: listing, errors that name the valid choices, config files, train and eval;
bad input at the command line and in data is one error line, before anything is written."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcl.cli import main
from fastcl.methods import METHODS

REPO = Path(__file__).resolve().parents[1]


def write_npz(path, **arrays):
    """48 random 8x8 gray images of 3 classes, 32 for training; `arrays` replaces some."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (48, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 3, 48)
    np.savez(path, **{**dict(x_train=x[:32], y_train=y[:32], x_test=x[32:], y_test=y[32:]),
                      **arrays})
    return path


@pytest.fixture
def tiny_npz(tmp_path):
    return write_npz(tmp_path / "tiny.npz")


TINY = ["--epochs", "1", "--batch-size", "8", "--width", "0.125", "--proj-hidden", "32",
        "--no-progress", "--device", "cpu"]


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "simclr" in out and "swav" in out and "resnet18" in out and "vit_small" in out


def test_train_help_lists_methods_and_backbones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "simclr" in out and "resnet50" in out
    with pytest.raises(SystemExit):
        main(["train", "swav", "--help"])
    out = capsys.readouterr().out
    assert "--num-prototypes" in out and "--epsilon" in out and "--precision" in out


@pytest.mark.parametrize("argv, message", [
    (["train", "simclr2"], "choose from 'simclr'"),
    (["train", "simclr", "--backbone", "resnet34"], "choose from 'resnet18'"),
    (["train", "simclr", "--data", "/no/such/folder"], "does not exist"),
    (["train", "simclr", "--precision", "fp16"], "choose from 'fp32', 'bf16'"),
    (["eval", "--checkpoint", "/no/such.pt"], "does not exist"),
])
def test_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_train_eval_and_wrong_checkpoint(tmp_path, tiny_npz, capsys):
    out = tmp_path / "run"
    assert main(["train", "simclr", "--data", str(tiny_npz), "--out", str(out), *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"knn_top1", "linear_top1"}
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "last.pt"), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["epoch"] == 1
    # Resuming that folder with another method is refused with a clear message.
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "swav", "--data", str(tiny_npz), "--out", str(out), "--resume", *TINY])
    assert exit_info.value.code == 2
    assert "trained with method 'simclr'" in capsys.readouterr().err


def test_train_streams_an_image_folder_of_any_size(tmp_path, capsys):
    """Images of many sizes, none square, streamed by two workers at --image-size 12 and evaluated
    again at the checkpoint's size; the last line printed sets the result beside the random-init
    baseline."""
    from fastcl.train import load_checkpoint

    for split, n in (("train", 12), ("val", 6)):
        for i in range(n):
            _image(tmp_path / "d" / split / "ab"[i % 2] / f"{i}.png", side=10 + i,
                   height=8 + 2 * i)
    out = tmp_path / "run"
    assert main(["train", "simclr", "--data", str(tmp_path / "d"), "--out", str(out), *TINY,
                 "--image-size", "12", "--workers", "2", "--cache", "never"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"kNN top-1 {metrics['knn_top1']:.4f} (random init " \
           f"{metrics['baseline']['knn_top1']:.4f}, k = {metrics['knn_k']})" in last
    state = load_checkpoint(out / "last.pt")
    assert state["data"]["streamed"] and state["data"]["image_size"] == 12
    assert main(["eval", "--checkpoint", str(out / "last.pt"), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["knn_k"] == metrics["knn_k"] == 3


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file(tmp_path, tiny_npz, suffix):
    out = tmp_path / "run"
    options = {"data": str(tiny_npz), "out": str(out), "epochs": 1, "batch-size": 8,
               "width": 0.125, "proj_hidden": 32, "temperature": 0.3}
    if suffix == ".toml":
        text = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    else:
        text = "\n".join(f"{k}: {json.dumps(v)}" for k, v in options.items())
    config = tmp_path / f"run{suffix}"
    config.write_text(text)
    # The command line wins over the file: 2 epochs, not 1.
    assert main(["train", "simclr", "--config", str(config), "--epochs", "2", "--no-progress",
                 "--device", "cpu"]) == 0
    from fastcl.train import load_checkpoint

    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 2 and state["config"]["hparams"]["temperature"] == 0.3
    assert state["config"]["batch_size"] == 8


def test_config_file_unknown_key(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('epochz = 3\n')
    with pytest.raises(SystemExit):
        main(["train", "simclr", "--config", str(config)])
    err = capsys.readouterr().err
    assert "unknown option(s) ['epochz']" in err and "epochs" in err


# ----------------------------------------------------------------------------------------------
# Bad input: one "fastcl: error: ..." line, exit code 2, nothing written or lost
# ----------------------------------------------------------------------------------------------
def run_fastcl(*args, cwd):
    """python -m fastcl ARGS in a subprocess, on this checkout."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "fastcl", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_error_line(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastcl: error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _image(path, side=8, height=None):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height or side, side, 3), 100, dtype=np.uint8)).save(path)


def _bad_input(case, tmp_path):
    """(the train options that give `case`, fragments its error line must hold)."""
    x, y = np.zeros((32, 8, 8), np.float32), np.arange(32) % 3
    if case == "negative label":
        return ["--data", write_npz(tmp_path / "d.npz", y_train=y - 1)], ["y_train", "-1"]
    if case == "float label":
        return ["--data", write_npz(tmp_path / "d.npz", y_train=y + 0.5)], ["y_train", "0.5"]
    if case == "huge label":
        return ["--data", write_npz(tmp_path / "d.npz", y_train=y + 10 ** 9)], ["1000000000"]
    if case == "nan pixels":
        x[3, 2, 1] = np.nan
        return ["--data", write_npz(tmp_path / "d.npz", x_train=x)], ["x_train", "NaN"]
    if case == "non-square npz":
        return (["--data", write_npz(tmp_path / "d.npz", x_train=x[:, :, :6], x_test=x[:8, :, :6])],
                ["x_train", "d.npz", "square"])
    if case == "image-size of arrays":
        return ["--data", write_npz(tmp_path / "d.npz"), "--image-size", "16"], [
            "--image-size 16", "8 px", "ImageFolder"]
    if case == "val is a file":
        _image(tmp_path / "d" / "train" / "a" / "0.png")
        (tmp_path / "d" / "val").write_text("not a folder")
        return ["--data", tmp_path / "d"], ["'val' is a file", "folder"]
    if case in ("broken toml", "broken yaml"):
        config = tmp_path / ("run.toml" if case == "broken toml" else "run.yaml")
        config.write_text("epochs = = 3\n" if case == "broken toml" else "epochs: [1\n")
        return ["--config", config], [str(config), "TOML" if case == "broken toml" else "YAML"]
    options = {"knn-k 0": ["--knn-k", "0"], "knn-k -5": ["--knn-k", "-5"],
               "device gpu0": ["--device", "gpu0"], "device cuda": ["--device", "cuda"],
               "lr inf": ["--lr", "inf"], "weight-decay nan": ["--weight-decay", "nan"],
               "weight-decay -1": ["--weight-decay", "-1"],
               "warmup-epochs -1": ["--warmup-epochs", "-1"],
               "warmup-epochs = epochs": ["--warmup-epochs", "1"],
               "batch-size 1": ["--batch-size", "1"], "workers -1": ["--workers", "-1"],
               "image-size 2": ["--image-size", "2"]}[case]
    return options, [options[0]]


@pytest.mark.parametrize("case", [
    "negative label", "float label", "huge label", "nan pixels", "non-square npz",
    "image-size of arrays", "workers -1", "image-size 2", "val is a file", "broken toml", "broken yaml", "knn-k 0", "knn-k -5",
    "device gpu0", pytest.param("device cuda", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA")),
    "lr inf", "weight-decay nan", "weight-decay -1", "warmup-epochs -1",
    "warmup-epochs = epochs", "batch-size 1"])
def test_bad_input_fails_before_training(tmp_path, case):
    """Each case is refused up front: no epoch runs and no output folder is made."""
    options, fragments = _bad_input(case, tmp_path)
    if "--data" not in options and "--config" not in options:
        options += ["--data", write_npz(tmp_path / "d.npz")]
    out = tmp_path / "run"
    proc = run_fastcl("train", "simclr", *TINY, "--out", out, *options, cwd=tmp_path)
    assert_one_error_line(proc, *fragments)
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_nan_loss_is_one_line_naming_the_epoch_and_settings(tmp_path, tiny_npz):
    proc = run_fastcl("train", "simclr", *TINY, "--data", tiny_npz, "--out", tmp_path / "run",
                  "--lr", "1e30", cwd=tmp_path)
    assert_one_error_line(proc, "nan in epoch 1/1", "no checkpoint", "--lr 1e+30",
                          "--weight-decay", "--warmup-epochs", "--precision")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch simclr run on write_npz's data: (its data, its output folder)."""
    root = tmp_path_factory.mktemp("trained")
    data = write_npz(root / "tiny.npz")
    argv = ["train", "simclr", *TINY, "--epochs", "2", "--data", str(data), "--out",
            str(root / "run")]
    assert main(argv) == 0
    return data, root / "run"


@pytest.fixture
def run_copy(tmp_path, trained):
    """A copy of `trained`'s output folder, with its last.pt's bytes."""
    out = shutil.copytree(trained[1], tmp_path / "run")
    return trained[0], out, (out / "last.pt").read_bytes()


@pytest.mark.parametrize("case", ["other data", "fewer epochs", "truncated", "other method"])
def test_bad_resume_keeps_the_checkpoint(tmp_path, run_copy, case):
    data, out, checkpoint = run_copy
    metrics = (out / "metrics.json").read_text()
    method, options = "simclr", ["--data", data]
    if case == "other data":
        rgb = np.zeros((40, 8, 8, 3), np.uint8)
        options = ["--data", write_npz(tmp_path / "rgb.npz", x_train=rgb, y_train=np.zeros(40),
                                       x_test=rgb[:8], y_test=np.zeros(8))]
        fragments = ["trained on 'tiny'", "1-channel", "3-channel", "--data"]
    elif case == "fewer epochs":
        options += ["--epochs", "1"]
        fragments = ["--epochs 1", "2 epochs", "last.pt"]
    elif case == "truncated":
        (out / "last.pt").write_bytes(checkpoint[:len(checkpoint) // 2])
        checkpoint = (out / "last.pt").read_bytes()
        fragments = ["last.pt", "cannot be read"]
    else:
        method, fragments = "swav", ["method 'simclr'", "fastcl train simclr"]
    proc = run_fastcl("train", method, *TINY, "--out", out, "--resume", *options, cwd=tmp_path)
    assert_one_error_line(proc, *fragments)
    assert "--method" not in proc.stderr
    assert (out / "last.pt").read_bytes() == checkpoint
    assert (out / "metrics.json").read_text() == metrics


@pytest.mark.parametrize("case", ["not a checkpoint", "truncated", "knn-k 0", "device gpu0"])
def test_bad_eval(tmp_path, run_copy, case):
    _, out, checkpoint = run_copy
    path, options = out / "last.pt", []
    if case == "not a checkpoint":
        path, fragments = out / "metrics.csv", ["metrics.csv", "cannot be read"]
    elif case == "truncated":
        path.write_bytes(checkpoint[:1000])
        fragments = ["last.pt", "cannot be read"]
    else:
        options = case.replace("knn-k", "--knn-k").replace("device", "--device").split()
        fragments = [options[0]]
    assert_one_error_line(run_fastcl("eval", "--checkpoint", path, *options, cwd=tmp_path),
                          *fragments)


def test_resume_removes_a_killed_write_temporary(tmp_path, run_copy):
    """kill -9 in the middle of a checkpoint write leaves .last.pt.tmp-<pid>; the next run of that
    folder removes it."""
    data, out, _ = run_copy
    stale = out / ".last.pt.tmp-99999"
    stale.write_bytes(b"half a checkpoint")
    proc = run_fastcl("train", "simclr", *TINY, "--epochs", "3", "--data", data, "--out", out,
                  "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not stale.exists()
    assert sorted(os.listdir(out)) == ["curves.png", "last.pt", "metrics.csv", "metrics.json"]
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 3


def test_help_describes_every_option_and_method(capsys):
    for argv in (["eval", "--help"], ["train", "--help"], ["train", "simclr", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    eval_help, train_help, simclr_help = capsys.readouterr().out.split("usage: ")[1:]
    for option in ("--checkpoint PATH", "--data PATH", "--device DEVICE", "--knn-k KNN_K"):
        assert re.search(rf"^  {option}\s+\S", eval_help, re.M), (option, eval_help)
    for name in METHODS:
        assert re.search(rf"^    {name}\s+\S", train_help, re.M), (name, train_help)
    simclr_help = " ".join(simclr_help.split())
    for pattern in (r"--precision \{fp32,bf16\} default fp32", r"--seed SEED default 0 ",
                    r"--knn-k KNN_K [^-]*default 200"):
        assert re.search(pattern, simclr_help), pattern


def test_version(tmp_path):
    from fastcl import __version__

    proc = run_fastcl("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"fastcl {__version__}"
