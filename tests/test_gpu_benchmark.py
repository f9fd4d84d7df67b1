"""benchmarks/gpu.py --smoke: the GPU lease script's code on tiny shapes on CPU, with the Triton
kernels under the interpreter, so the script is known to run before a GPU ever sees it."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]
FIELDS = ["case", "impl", "dtype", "ms", "peak_mib", "tflops", "gbps", "matmul_tflops",
          "copy_gbps", "device", "torch", "triton", "commit", "status", "detail"]


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
    assert {"ceiling", "nt_xent", "info_nce", "clip", "supcon", "dino", "dino_head", "ibot_head", "sinkhorn", "momentum",
            "queue", "sampled_info_nce", "train"} <= cases
    checks = [r for r in rows if r["impl"].startswith("check")]
    timed = [r for r in rows if r["ms"] and not r["impl"].startswith("check")]
    assert len(checks) >= 15 and {r["impl"] for r in timed} >= {"fastcl", "torch.compile(naive)"}
    assert all(r["copy_gbps"] and r["matmul_tflops"] for r in rows[2:])
    assert (tmp_path / "gpu_cpu.png").exists()
    assert done.stdout.strip().splitlines()[-1].startswith(f"{len(rows)} rows, 0 failed")
