"""benchmarks/: the harness (memory counting, the training-loop and call patterns, per-round
speed-ups), every family script's smoke mode, and the methods table methods.py renders from its CSV
into the README."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "methods.py"
FAMILIES = ["contrastive", "dino", "dino_head", "sinkhorn", "momentum", "bank", "siglip",
            "train_step"]
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


def _load_script(name="methods"):
    """The module benchmarks/<name>.py (the scripts import the harness beside them)."""
    import importlib

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


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
        return dict(knn_top1=0.5, linear_top1=0.5, images_per_s=1.0,
                    baseline=dict(knn_top1=0.1, linear_top1=0.1))

    monkeypatch.setattr(module, "load_data", lambda name: name)
    monkeypatch.setattr(module, "train", fake_train)
    rows = module.run(["digits", "digits-shift"], ["mocov2"], None)
    assert module.OVERRIDES[("digits-shift", "mocov2")] == dict(epochs=60, queue_size=128)
    assert trained == [("digits", 30, 1024), ("digits-shift", 60, 128)]
    assert [r["epochs"] for r in rows] == [30, 60]


# --- the harness -------------------------------------------------------------------------------
def test_peak_allocated_counts_what_the_allocator_hands_out():
    """CPU memory is the allocator's count of the step's own allocations still alive: a tensor
    allocated before the step counts neither while held nor when freed in it, temporaries count
    while alive, whatever the resident set size does."""
    harness = _load_script("harness")
    held = torch.empty(2**20)

    def step():
        nonlocal held
        held = None  # frees 4 MiB first
        torch.empty(2**20).fill_(1.0)  # a 4 MiB temporary
        return torch.empty(2 * 2**20)  # 8 MiB allocated and dropped

    assert harness.peak_allocated(step, "cpu") == 8 * 2**20
    assert 3 * 2**20 <= harness.peak_allocated(lambda: torch.ones(3, 2**18).sum(), "cpu") \
        <= 3 * 2**20 + 64  # and the 0-dim sum


def test_training_loop_pattern_and_rows():
    """The training-loop pattern: a fresh state per implementation whose grad-requiring inputs are
    nn.Parameters held by an optimizer, zero_grad(set_to_none=True) before every step (so the
    gradient is one step's, not a sum), the first step reported apart; each row carries both
    patterns and per-round speed-ups against the baseline."""
    harness = _load_script("harness")
    seen = []

    def make_inputs():
        return [torch.randn(64, 8, requires_grad=True), torch.randn(64, 8)]

    def loss(x, target):
        seen.append(x)
        return ((x - target) ** 2).sum()

    inputs, opt = harness.train_state(make_inputs)
    assert isinstance(inputs[0], torch.nn.Parameter) and not isinstance(inputs[1], torch.nn.Parameter)
    assert opt.param_groups[0]["params"] == [inputs[0]]
    step = harness.train_step(loss, inputs, opt, backward=True)
    step(), step()
    assert torch.allclose(inputs[0].grad, 2 * (inputs[0] - inputs[1]))  # not accumulated

    seen.clear()
    case = harness.Case("toy", make_inputs, {"a": loss, "b": lambda x, t: loss(x, t) * 2}, "a")
    rows = harness.measure_case(case, "cpu", repeats=3, compile=False)
    states = {id(x) for x in seen}  # train: one fresh state each (x2 for memory), call: one shared
    assert len(states) == 5 and all(isinstance(x, torch.nn.Parameter) for x in seen[:4 * 2])
    assert [r["impl"] for r in rows] == ["a", "b"]
    for r in rows:
        for key in ("train_cold_ms", "train_ms", "call_ms"):
            assert r[key] > 0
        assert r["train_mib"] >= 0 and r["call_mib"] >= 0
        assert r["train_speedup_min"] <= r["train_speedup"] <= r["train_speedup_max"]
    assert rows[0]["train_speedup"] == rows[0]["call_speedup"] == 1.0


def test_compiled_baseline_and_repeated_calls_are_implementations():
    harness = _load_script("harness")
    calls = []
    case = harness.Case("toy", lambda: [], {"fast": lambda: calls.append("f"),
                                            "naive": lambda: calls.append("n")}, "naive",
                        backward=False, calls=3)
    impls = harness.implementations(case, compile=True)
    assert list(impls) == ["fast", "naive", "naive + torch.compile"]
    impls["fast"]()
    assert calls == ["f"] * 3


@pytest.mark.parametrize("family", FAMILIES)
def test_family_smoke(family, tmp_path):
    """Each family's script runs its tiny cases (--quick) end to end and writes its CSV and plot:
    both patterns, memory and the baseline's speed-up of 1 in every case."""
    module = _load_script(family)
    out = tmp_path / f"{family}.csv"
    rows = module.bench_main(family, module.cases, family, argv=[
        "--quick", "--no-compile", "--repeats", "1", "--csv", str(out), "--plot",
        str(tmp_path / f"{family}.png")])
    assert rows and (tmp_path / f"{family}.png").stat().st_size > 0
    with open(out, newline="") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) and written[0]["commit"] and written[0]["device"]
    for r in rows:
        assert r["train_ms"] > 0 and r["call_ms"] > 0 and r["train_cold_ms"] > 0
        assert r["train_mib"] >= 0
    baselines = [r for r in rows if r["train_speedup"] == 1.0]
    assert {r["case"] for r in baselines} == {r["case"] for r in rows}


def test_ring_smoke(tmp_path):
    """benchmarks/ring.py on 2 gloo processes, tiny sizes: a row per size and mode, with memory
    and time, written to its CSV."""
    module = _load_script("ring")
    out = tmp_path / "ring.csv"
    rows = module.main(["--quick", "--csv", str(out)])
    assert [(r["n_per_rank"], r["gather"]) for r in rows] == [
        (16, "True"), (16, "ring"), (32, "True"), (32, "ring")]
    assert all(r["mib"] > 0 and r["ms"] > 0 for r in rows)
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_stream_script_smoke(tmp_path):
    """benchmarks/stream.py on a tiny folder: make, the loader alone, the step alone, and watch's
    memory of a command's process tree."""
    import os

    script = BENCHMARKS / "stream.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(BENCHMARKS.parent), os.environ.get("PYTHONPATH", "")]))

    def run(*args):
        proc = subprocess.run([sys.executable, str(script), *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    run("make", tmp_path / "d", "--train", 20, "--val", 10, "--side", 32)
    assert len(list((tmp_path / "d" / "train").glob("class*/*.jpg"))) == 20
    assert "images/s" in run("load", tmp_path / "d", "--image-size", 16, "--workers", 0,
                             "--batch-size", 4, "--batches", 2)
    assert "images/s" in run("step", "--image-size", 16, "--batch-size", 4, "--steps", 1)
    # watch samples once a second: the array is held for 3 s so that a sample sees it.
    out = run("watch", "--", sys.executable, "-c",
              "import time, numpy; a = numpy.ones(2 ** 25); time.sleep(3)")
    pss = float(out.split("PSS ")[1].split()[0])
    assert 256 <= pss < 2048, out  # the 256 MiB array counts


def test_siglip_training_step_keeps_only_the_gradients():
    """benchmarks/siglip.py's training step (raw rows, normalize=True, "mean"): the peak above the
    inputs is the two gradients the forward computes and saves plus the two the leaves receive,
    4 (N, D) fp32 tensors (the tile scratch is freed by then); no normalized copies, no zero
    gradients for the op's gradient outputs."""
    from fastcl import siglip

    harness = _load_script("harness")
    n, d = 4096, 256

    def make_inputs():
        rows = [torch.randn(n, d), torch.randn(n, d)]
        return [t.requires_grad_() for t in rows + [torch.tensor(2.3), torch.tensor(-10.0)]]

    inputs, opt = harness.train_state(make_inputs)
    step = harness.train_step(lambda x, y, s, b: siglip(x, y, s.exp(), b), inputs, opt, True)
    assert harness.peak_allocated(lambda: (step(), step()), "cpu") <= 4 * n * d * 4 + 1024


@pytest.mark.parametrize("naive", [False, True])
def test_train_step_bf16_channels_last(naive):
    """train_step.training_step with bf16=True and channels_last=True (gpu.py's training-step
    section): the encoder gets channels-last image views and computes in bfloat16, and the step
    updates the weights; without them, contiguous float32."""
    from fastcl.models import Bottleneck, ResNet

    module = _load_script("train_step")
    for fast in (True, False):
        backbone = ResNet(Bottleneck, (1, 1, 1, 1), 3, 0.125, stem="imagenet")
        method, cfg = module.build("simclr", backbone=backbone, channels=3, side=16,
                                   batch_size=4, hparams={"proj_hidden": 16})
        if fast:
            method.to(memory_format=torch.channels_last)
        args = module.fresh_state(method, cfg, module.batch(cfg, 3, 16, 8, "cpu"))
        seen = []
        args[0].backbone.stem[0].register_forward_hook(lambda m, i, o: seen.append(
            (i[0].is_contiguous(memory_format=torch.channels_last), o.dtype)))
        before = args[0].backbone.stem[0].weight.detach().clone()
        module.training_step(naive, bf16=fast, channels_last=fast)(*args)
        assert set(seen) == {(fast, torch.bfloat16 if fast else torch.float32)}
        assert not torch.equal(args[0].backbone.stem[0].weight, before)
