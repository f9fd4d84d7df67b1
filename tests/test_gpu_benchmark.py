"""benchmarks/gpu.py --smoke: the GPU lease script's code on tiny shapes on CPU, with the Triton
kernels under the interpreter, so the script is known to run before a GPU ever sees it."""
import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]
FIELDS = ["case", "impl", "dtype", "ms", "peak_mib", "tflops", "gbps", "images_s", "speedup",
          "matmul_tflops", "copy_gbps", "device", "torch", "triton", "commit", "status", "detail"]
STEP_METHODS = {"simclr", "mocov2", "mocov3", "byol", "simsiam", "swav", "dino", "supcon",
                "instdisc"}


def test_smoke_run_checks_and_measures_every_op(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                             "FASTCL_CPU_BACKEND")}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--smoke",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "gpu_cpu.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == FIELDS
    bad = [f"{r['case']} / {r['impl']} / {r['dtype']}: {r['status']} {r['detail']}"
           for r in rows if r["status"] != "ok"]
    assert not bad, "\n".join(bad)
    cases = {r["case"].split(" ")[0] for r in rows}
    assert {"ceiling", "nt_xent", "info_nce", "clip", "supcon", "dino", "dino_head", "ibot_head",
            "sinkhorn", "momentum", "queue", "sampled_info_nce", "train", "train_step"} <= cases
    checks = [r for r in rows if r["impl"].startswith("check")]
    timed = [r for r in rows if r["ms"] and not r["impl"].startswith("check")]
    assert len(checks) >= 15 and {r["impl"] for r in timed} >= {"fastcl", "torch.compile(naive)"}
    assert all(r["copy_gbps"] and r["matmul_tflops"] for r in rows[2:])
    assert (tmp_path / "gpu_cpu.png").exists()
    assert done.stdout.strip().splitlines()[-1].startswith(f"{len(rows)} rows, 0 failed")
    check_train_steps(rows)


def check_train_steps(rows):
    """Every method's whole step (bf16 autocast, channels-last) on the ResNet-50 layout, and MoCo
    v3's and DINO's on the ViT, fused and naive, with a finite images/s; speed-ups naive / impl
    (1 for naive itself)."""
    steps = [r for r in rows if r["case"].startswith("train_step ")]
    pairs = {(r["case"].split(" ")[2], r["case"].split(" ")[1]) for r in steps}
    assert pairs == {("resnet50", m) for m in STEP_METHODS} | {("vit_s16", "mocov3"),
                                                                 ("vit_s16", "dino")}
    for case in {r["case"] for r in steps}:
        impls = {r["impl"]: r for r in steps if r["case"] == case}
        assert set(impls) == {"fastcl", "naive"}, case
        for r in impls.values():
            assert r["dtype"] == "bf16" and 0 < float(r["images_s"]) < math.inf, r
            assert float(r["ms"]) == pytest.approx(8e3 / float(r["images_s"]), rel=2e-3)
            assert 0 < float(r["speedup"]) < math.inf
        assert float(impls["naive"]["speedup"]) == 1.0


def test_train_step_cases_keep_to_the_deadline(tmp_path):
    """A training-step case past the section's deadline is a skipped row; one whose warm-up steps
    leave too little time for its timed rounds is skipped too, saying how long they would take."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu

    run = gpu.Run(tmp_path, smoke=True, budget=math.inf, compile_baselines=False)
    gpu.train_step_case(run, "late", "resnet50", "simclr", time.perf_counter() - 1)
    gpu.train_step_case(run, "short", "resnet50", "simclr", time.perf_counter() + 0.05)
    assert [(r["case"], r["status"]) for r in run.rows] == [("late", "skipped"),
                                                            ("short", "skipped")]
    assert "budget" in run.rows[0]["detail"] and "rounds would take" in run.rows[1]["detail"]
