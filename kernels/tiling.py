"""Launch-grid arithmetic shared by the Triton launchers (host code, no kernels)."""
import triton

# Programs to aim for when a long dimension is split among programs: a few per SM on current
# GPUs, with no device query.
TARGET_PROGRAMS = 512


def whole_block_splits(n: int, block: int, splits: int) -> tuple[int, int]:
    """n items among at most `splits` programs, each taking a whole number of blocks of `block`:
    (programs, items per program). No program is left empty (fewer programs if need be), so every
    partial state a merge reads has seen at least one item."""
    per_split = triton.cdiv(triton.cdiv(max(n, 1), splits), block) * block
    return triton.cdiv(max(n, 1), per_split), per_split
