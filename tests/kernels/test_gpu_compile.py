"""Every launched Triton kernel, in every configuration its launcher can choose, compiles ahead of
time for sm_80 (A100) and sm_90 (H100 / H200) with Triton's own compiler and the ptxas its wheel
carries (no GPU needed), without register spills and within the target's shared memory per block.

The interpreter that runs the kernels in the other tests accepts code a GPU compile rejects, so
this is the CPU-side proof that the kernels build. The configurations are not listed here: the
launchers are run over their modules' CONFIGS tables with the kernels swapped for recorders
(fastcl.kernels.aot), in a subprocess without TRITON_INTERPRET; all compiles run once per test
session, on up to 2 processes.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

FAMILIES = ("contrastive", "bank", "dino", "dino_head", "koleo", "momentum", "siglip", "sinkhorn")
ARCHS = (80, 90)
# (kernel, arch) -> spill bytes tolerated, with the reason. None is needed today.
SPILL_TOLERANCE: dict = {}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """fastcl.kernels.aot's JSON report: every launch of every family for both targets."""
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "fastcl.kernels.aot", "--json", str(out),
                           "--arch", *map(str, ARCHS)],
                          env=env, capture_output=True, text=True, timeout=1800)
    if not out.exists():
        pytest.fail(f"fastcl.kernels.aot wrote no report:\n{done.stdout[-3000:]}\n"
                    f"{done.stderr[-3000:]}")
    print(done.stdout)  # the per-kernel table, shown with -s
    return json.loads(out.read_text())


def _results(compiled, family, arch):
    rows = [r for r in compiled["results"] if r["family"] == family and r["arch"] == arch]
    assert rows, f"no launch of the {family} kernels was recorded"
    return rows


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_configuration_compiles(compiled, family, arch):
    failed = [f"{r['kernel']} [{r['config']}]: {r['error'][:500]}"
              for r in _results(compiled, family, arch) if not r["ok"]]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_no_register_spills(compiled, family, arch):
    spilled = [f"{r['kernel']} [{r['config']}]: {r['spill_bytes']} bytes, {r['regs']} registers"
               for r in _results(compiled, family, arch)
               if r["ok"] and r["spill_bytes"] > SPILL_TOLERANCE.get((r["kernel"], arch), 0)]
    assert not spilled, "\n".join(spilled)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_memory_fits_the_target(compiled, family, arch):
    over = [f"{r['kernel']} [{r['config']}]: {r['smem']} > {r['smem_limit']} bytes"
            for r in _results(compiled, family, arch) if r["ok"] and r["smem"] > r["smem_limit"]]
    assert not over, "\n".join(over)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_kernel_is_launched(compiled, family):
    """A *_kernel that no launcher reaches over the CONFIGS tables was not compiled either."""
    assert compiled["missed"][family] == []
