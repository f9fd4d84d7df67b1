"""benchmarks/methods.py: the methods table it renders from its CSV into the README."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "methods.py"
FIELDS = ["data", "method", "backbone", "epochs", "batch_size", "knn_top1", "linear_top1",
          "random_knn_top1", "random_linear_top1", "images_per_s", "wall_s", "threads", "torch",
          "machine"]


def _row(data, method, knn, wall):
    return dict(data=data, method=method, backbone="resnet18 x0.5", epochs=3, batch_size=8,
                knn_top1=knn, linear_top1=0.5, random_knn_top1=0.25, random_linear_top1=0.3,
                images_per_s=123.4, wall_s=wall, threads=1, torch="x", machine="y")


def _render(tmp_path, rows, readme_text):
    table = tmp_path / "methods.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    readme = tmp_path / "README.md"
    readme.write_text(readme_text)
    return subprocess.run([sys.executable, str(SCRIPT), "--render", str(table), "--readme",
                           str(readme)], capture_output=True, text=True), readme


def test_render_writes_the_newest_row_of_each_run_between_the_markers(tmp_path):
    rows = [_row("digits", "byol", 0.4, 60), _row("digits", "simclr", 0.6, 90),
            _row("digits", "byol", 0.7, 120), _row("digits-shift", "simclr", 0.35, 30)]
    done, readme = _render(tmp_path, rows, "intro\n<!-- methods-table:start -->\nold\n"
                                           "<!-- methods-table:end -->\noutro\n")
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert text.startswith("intro\n<!-- methods-table:start -->\n| data |")
    assert text.endswith("<!-- methods-table:end -->\noutro\n") and "old" not in text
    lines = [line for line in text.splitlines() if line.startswith("| digits")]
    # Registry order within a data set (simclr before byol), the newest byol row only.
    assert [line.split(" | ")[1] for line in lines] == ["simclr", "byol", "simclr"]
    assert lines[1].split(" | ")[3:5] == ["0.700", "0.500"] and "+45.0" in lines[1]
    assert "| 2.0 | 123 | 1 |" in lines[1]  # minutes, images/s, threads


def test_render_without_markers_is_an_error(tmp_path):
    done, readme = _render(tmp_path, [_row("digits", "simclr", 0.6, 90)], "no table here\n")
    assert done.returncode != 0 and "methods-table" in done.stderr
    assert readme.read_text() == "no table here\n"


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("methods_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_are_appended_under_one_header(tmp_path):
    module = _load_script()
    path = tmp_path / "rows.csv"
    for row in (_row("digits", "simclr", 0.6, 90), _row("digits", "byol", 0.7, 30)):
        module.append_csv(path, row)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["simclr", "byol"] and list(rows[0]) == FIELDS


def test_harder_set_runs_take_their_overrides(monkeypatch):
    """A (data set, method) listed in OVERRIDES trains with those epochs and hyper-parameters;
    elsewhere with the method's defaults."""
    module = _load_script()
    trained = []

    def fake_train(cfg, data):
        trained.append((data, cfg.epochs, cfg.hparams["queue_size"]))
        return dict(knn_top1=0.5, linear_top1=0.5, images_per_s=1.0)

    monkeypatch.setattr(module, "load_data", lambda name: name)
    monkeypatch.setattr(module, "random_init", lambda cfg, data: (0.1, 0.1))
    monkeypatch.setattr(module, "train", fake_train)
    rows = module.run(["digits", "digits-shift"], ["mocov2"], None)
    assert module.OVERRIDES[("digits-shift", "mocov2")] == dict(epochs=60, queue_size=128)
    assert trained == [("digits", 30, 1024), ("digits-shift", 60, 128)]
    assert [r["epochs"] for r in rows] == [30, 60]
