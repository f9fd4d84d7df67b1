"""The command line: listing, errors that name the valid choices, config files, train and eval."""
import json

import numpy as np
import pytest

from fastcl.cli import main


@pytest.fixture
def tiny_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (48, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 3, 48)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x[:32], y_train=y[:32], x_test=x[32:], y_test=y[32:])
    return path


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
