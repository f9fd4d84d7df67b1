// CPU kernels of the contrastive op family (fastcl/ops/contrastive.py): per-anchor statistics of
// logits s_ij = scale <a_i, b_j> over a (M, D) and b (N, D), and the gradients they define.
//
//   gram_stats_fwd(u, labels, scale)                              stats (4, M), a = b = u
//   gram_stats_bwd(u, labels, scale, coef)                        du = scale (W + W^T) u
//   cross_stats_fwd(q, k, q_labels, k_labels, scale, off, has_diag, with_col)
//                                                                 (row stats, column stats)
//   cross_stats_bwd(q, k, q_labels, k_labels, scale, off, has_diag, coef, col_coef, need_dk)
//                                                                 dq = scale W k, dk = scale W^T q
//   bank_lse_fwd(q, bank, scale)                                  (lse, softmax-weighted bank mean)
//
// Pairs j - i == off are left out (has_diag); of the others, those with equal labels are an
// anchor's positives and the rest its negatives. stats = [lse over negatives, lse over positives,
// sum of positive logits, number of positives]; coef (5, n) = [g, lse, lse_pos, 1 / count, r] per
// anchor gives the backward weights W_ij = g_i exp(s_ij - lse_i) for a negative and
// g_i ((q_ij - 1 / count_i) - q_ij r_i) for a positive, q_ij = exp(s_ij - lse_pos_i) (exactly 1
// for a single positive); the Python module says why this keeps late-training losses exact.
// Positives are few (one per anchor for NT-Xent and CLIP), so each tile finds them (labels
// compared, then nonzero; skipped where the tile's row and column label ranges cannot meet) and
// treats them as a sparse list; the dense work is the negatives'.
// Gram is the symmetric case b = a, offset 0, where only tiles J >= I are visited and each tile
// serves the rows of block I and, through its columns, the rows of block J.
//
// The similarity matrix is never materialized: the work runs over (tile_m, tile_n) tiles, each
// computed by an MKL GEMM into a reused scratch buffer and reduced by ATen's vectorized
// elementwise kernels. The tile loop is sequential: parallelism comes from inside each op (MKL
// and ATen threads), which on a few cores keeps the GEMMs at peak. Backward recomputes the
// tiles from the inputs and the O(M + N) statistics. Extra memory: O(tile_m * tile_n + tile * D)
// scratch plus O((M + N) * D) for fp32 copies of 16-bit or strided inputs and the gradients.
//
// Every per-tile result (row sums, W b_J products) is computed from zero into scratch and then
// added to its accumulator: accumulating inside the GEMM/GEMV (beta = 1) chains every term of
// a row onto one running fp32 value (measured: 1e-3 relative error in dq at M = 2, N = 4M).
//
// The negatives' log-sum-exp has two exact schemes:
// * Unshifted (fast): R = |scale| max_i |a_i| max_j |b_j| bounds every |s_ij|. When R <= 40
//   (e.g. unit-norm features at temperature >= 0.025), exp(s_ij) lies in [e^-40, e^40], normal
//   fp32 numbers whose sums over any N < 2^63 stay finite, so no shift is needed at all and each
//   tile element costs one exp in forward and in backward.
// * Online max (general): per-row and per-column running (max, sum) merged across tiles, as in
//   online softmax, for any magnitude (temperature 0.01, un-normalized features, NaN inputs).
// The positives always keep a running max, so that a single positive's lse is its logit exactly.
#include <torch/extension.h>

#include "checks.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using at::Tensor;
using fastcl::read_scale;

// Side of a square gram tile and row count of a cross tile. A 512 x 512 fp32 tile (1 MiB) stays
// in L2 while the elementwise passes run over it, and is big enough for MKL to reach its peak.
constexpr int64_t kTileRows = 512;
// Element budget of a cross tile: few query rows (MoCo-style M = 256) get wider tiles, up to
// kMaxTileCols: the dq GEMM sums over a tile's columns, and for few rows MKL sums them in one
// sequential chain whose fp32 rounding error grows with its length.
constexpr int64_t kTileElems = 512 * 512;
constexpr int64_t kMaxTileCols = 8192;
// Largest R for the unshifted scheme. fp32 normals span [e^-87.3, e^88.7]: exp(s) in
// [e^-40, e^40], row sums <= N e^40 and backward's exp(-lse) in [e^-(40 + ln N), e^40] all stay
// inside it for any N < 2^63 (ln 2^63 ~ 43.7).
constexpr double kMaxUnshiftedBound = 40.0;
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Input handling
// ---------------------------------------------------------------------------------------------
/// x: (rows, D) features -> contiguous fp32 (no copy when already so).
Tensor features(const Tensor& x, const char* name) {
  Tensor f = fastcl::contiguous_float(x, name);
  TORCH_CHECK(f.dim() == 2, name, " must be 2-D (rows, D), got shape ", f.sizes());
  return f;
}

void check_same_dim(const Tensor& q, const Tensor& k) {
  TORCH_CHECK(q.size(1) == k.size(1), "q and k must have the same feature size D, got ", q.size(1),
              " and ", k.size(1));
}

/// labels: (n,) integer labels -> contiguous int64.
Tensor labels_of(const Tensor& x, int64_t n, const char* name) {
  fastcl::check_cpu(x, name);
  TORCH_CHECK(at::isIntegralType(x.scalar_type(), /*includeBool=*/false), name,
              " must be an integer tensor, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == n, name, " must have shape (", n, ",), got ", x.sizes());
  return x.to(at::kLong).contiguous();
}

/// coef: (5, n) backward coefficients [g, lse, lse_pos, 1 / count, r] -> contiguous fp32.
Tensor coefficients(const Tensor& x, int64_t n, const char* name) {
  Tensor c = fastcl::contiguous_float(x, name);
  TORCH_CHECK(c.dim() == 2 && c.size(0) == 5 && c.size(1) == n, name, " must have shape (5, ", n,
              "), got ", c.sizes());
  return c;
}

// ---------------------------------------------------------------------------------------------
// The pair problem and its tiling
// ---------------------------------------------------------------------------------------------
struct PairProblem {
  Tensor a;  // (M, D) fp32 contiguous
  Tensor b;  // (N, D) fp32 contiguous; the same tensor as a when symmetric
  Tensor a_labels, b_labels;  // (M,), (N,) int64 contiguous
  float scale;
  // Offset of the excluded pairs j - i == offset, only when that diagonal meets the matrix.
  std::optional<int64_t> excluded;
  // Gram: visit only tiles J >= I; rows and columns are one index set, so column results go to
  // the row accumulators, and a diagonal tile (I == J) contributes through its rows only.
  bool symmetric;
  int64_t tile_m, tile_n;
  // (min, max) label of each row block of a and each column block of b: a tile whose two ranges
  // do not meet has no positive (most tiles of NT-Xent and CLIP), and skips looking for them.
  std::vector<std::pair<int64_t, int64_t>> row_block_labels, col_block_labels;

  int64_t rows() const { return a.size(0); }
  int64_t cols() const { return b.size(0); }
};

/// (min, max) of labels (n,) over each block of `block` consecutive entries.
std::vector<std::pair<int64_t, int64_t>> block_label_ranges(const Tensor& labels, int64_t block) {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (int64_t start = 0; start < labels.size(0); start += block) {
    const Tensor part = labels.narrow(0, start, std::min(block, labels.size(0) - start));
    const auto [lo, hi] = at::aminmax(part);
    ranges.emplace_back(lo.item<int64_t>(), hi.item<int64_t>());
  }
  return ranges;
}

PairProblem make_problem(Tensor a, Tensor b, Tensor a_labels, Tensor b_labels, float scale,
                         std::optional<int64_t> offset, bool symmetric) {
  const int64_t m = a.size(0), n = b.size(0);
  if (offset && (*offset <= -m || *offset >= n)) offset.reset();
  // Symmetric tiles must be square so that diagonal tiles sit on the diagonal.
  const int64_t tile_m = std::max<int64_t>(1, std::min(m, kTileRows));
  const int64_t cross_n = std::clamp(kTileElems / tile_m, kTileRows, kMaxTileCols);
  const int64_t tile_n = symmetric ? tile_m : std::max<int64_t>(1, std::min(n, cross_n));
  auto row_ranges = block_label_ranges(a_labels, tile_m);
  auto col_ranges = block_label_ranges(b_labels, tile_n);
  return {std::move(a), std::move(b), std::move(a_labels), std::move(b_labels), scale, offset,
          symmetric, tile_m, tile_n, std::move(row_ranges), std::move(col_ranges)};
}

/// One tile: rows [i0, i0 + tm) of a, rows [j0, j0 + tn) of b.
struct Tile {
  int64_t i0, tm, j0, tn;
  bool on_diagonal() const { return i0 == j0; }
};

/// Calls fn(tile) for every tile in row-major order (J >= I only when symmetric).
template <typename Fn>
void for_each_tile(const PairProblem& p, Fn&& fn) {
  for (int64_t i0 = 0; i0 < p.rows(); i0 += p.tile_m) {
    const int64_t tm = std::min(p.tile_m, p.rows() - i0);
    for (int64_t j0 = p.symmetric ? i0 : 0; j0 < p.cols(); j0 += p.tile_n) {
      fn(Tile{i0, tm, j0, std::min(p.tile_n, p.cols() - j0)});
    }
  }
}

/// Whether a tile's columns must also be folded into column statistics / the b gradient.
bool serves_columns(const PairProblem& p, const Tile& t, bool wanted) {
  return p.symmetric ? !t.on_diagonal() : wanted;
}

/// x: (tm, tn) tile -> fills the excluded pairs (local diagonal) with value, if any lie in it.
void fill_excluded(const PairProblem& p, const Tile& t, const Tensor& x, const at::Scalar& value) {
  if (!p.excluded) return;
  // |excluded| < max(M, N) and |j0 - i0| < max(M, N): no overflow.
  const int64_t local = *p.excluded - (t.j0 - t.i0);
  if (local > -t.tm && local < t.tn) x.diagonal(local).fill_(value);
}

/// A (rows, cols) contiguous view on the front of a flat scratch buffer, so that edge tiles
/// reuse the buffer and out= kernels never see strided outputs.
Tensor tile_view(const Tensor& buffer, const Tile& t) {
  return buffer.narrow(0, 0, t.tm * t.tn).view({t.tm, t.tn});
}

/// Per-tile scratch, allocated once per call.
struct Scratch {
  Tensor s;     // flat, tile_m * tile_n: logits, or their exp
  Tensor aux;   // flat, tile_m * tile_n: a second exp / the backward weights W
  Tensor mask;  // flat bool, tile_m * tile_n: the positive pairs
  Tensor part;  // flat, max(tile_m, tile_n) * (D or 1): one tile's row/column sums or W b_J

  Scratch(const PairProblem& p, int64_t part_width) {
    const auto opts = p.a.options();
    s = at::empty({p.tile_m * p.tile_n}, opts);
    aux = at::empty({p.tile_m * p.tile_n}, opts);
    mask = at::empty({p.tile_m * p.tile_n}, opts.dtype(at::kBool));
    part = at::empty({std::max(p.tile_m, p.tile_n) * part_width}, opts);
  }
  /// (n,) or (n, width) contiguous view on the front of part.
  Tensor part_vec(int64_t n) const { return part.narrow(0, 0, n); }
  Tensor part_mat(int64_t n, int64_t width) const {
    return part.narrow(0, 0, n * width).view({n, width});
  }
};

/// s (tm, tn) = scale * a_I b_J^T.
void logits(const PairProblem& p, const Tile& t, Tensor s) {
  const Tensor a_i = p.a.narrow(0, t.i0, t.tm), b_j = p.b.narrow(0, t.j0, t.tn);
  at::addmm_out(s, s, a_i, b_j.t(), /*beta=*/0, /*alpha=*/p.scale);  // beta=0: s is not read
}

/// A tile's positive pairs: tile-local rows and columns, flat offsets into the tile, logits.
struct Positives {
  Tensor rows, cols, flat, logits;  // (P,) each
  bool empty() const { return flat.numel() == 0; }
};

/// The kept pairs of tile t with equal labels, and their logits read from s (tm, tn).
Positives find_positives(const PairProblem& p, const Tile& t, const Tensor& s,
                         const Scratch& buf) {
  const auto& rows_in = p.row_block_labels[t.i0 / p.tile_m];
  const auto& cols_in = p.col_block_labels[t.j0 / p.tile_n];
  if (rows_in.second < cols_in.first || cols_in.second < rows_in.first) {
    const Tensor none = at::empty({0}, p.a_labels.options());
    return {none, none, none, at::empty({0}, s.options())};
  }
  Tensor mask = tile_view(buf.mask, t);
  at::eq_out(mask, p.a_labels.narrow(0, t.i0, t.tm).unsqueeze(1),
             p.b_labels.narrow(0, t.j0, t.tn).unsqueeze(0));
  fill_excluded(p, t, mask, false);
  const Tensor where = at::nonzero(mask);  // (P, 2)
  Tensor rows = where.select(1, 0), cols = where.select(1, 1);
  Tensor flat = rows * t.tn + cols;
  return {rows, cols, flat, s.reshape(-1).index_select(0, flat)};
}

/// Whether the unshifted scheme is exact for this problem (see the file comment). A NaN/inf in
/// the inputs makes R NaN/inf and selects the online scheme.
bool unshifted_is_exact(const PairProblem& p) {
  const auto max_norm = [](const Tensor& x) {
    return at::linalg_vector_norm(x, 2, {1}).max().item<double>();
  };
  const double na = max_norm(p.a);
  const double nb = p.symmetric ? na : max_norm(p.b);
  const double r = std::abs(static_cast<double>(p.scale)) * na * nb;
  return r <= kMaxUnshiftedBound;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
/// Running log-sum-exp of the negatives of a set of rows (or of columns) across tiles.
struct OnlineLse {
  Tensor max;  // (n,) running max, -inf before any entry
  Tensor sum;  // (n,) sum of exp(s - max), with 0 in place of a -inf max
  // (tile,) work vectors, reused across tiles.
  Tensor new_max, shift, factor;

  OnlineLse(int64_t n, int64_t tile, const at::TensorOptions& opts)
      : max(at::full({n}, -kInf, opts)),
        sum(at::zeros({n}, opts)),
        new_max(at::empty({tile}, opts)),
        shift(at::empty({tile}, opts)),
        factor(at::empty({tile}, opts)) {}

  /// Folds the logits s (tm, tn) into entries [start, start + len) along dim (1: the rows of s,
  /// 0: its columns); e is (tm, tn) scratch and tile_sum (len,).
  void merge(const Tensor& s, int64_t dim, int64_t start, Tensor e, Tensor tile_sum) {
    const int64_t len = s.size(1 - dim);
    Tensor m = max.narrow(0, start, len), acc = sum.narrow(0, start, len);
    Tensor m_new = new_max.narrow(0, 0, len), sh = shift.narrow(0, 0, len);
    Tensor f = factor.narrow(0, 0, len);
    at::amax_out(m_new, s, {dim});
    at::maximum_out(m_new, m_new, m);  // NaN propagates
    // Shift by the new max, except where it is -inf (every entry so far excluded): 0 there keeps
    // exp(-inf - shift) = 0 instead of exp(-inf + inf) = NaN. NaN and +inf stay as they are.
    at::nan_to_num_out(sh, m_new, std::numeric_limits<double>::quiet_NaN(), kInf, 0.0);
    at::sub_out(f, m, sh).exp_();  // rescales the old sum; 0 where the old max was -inf
    acc.mul_(f);
    at::sub_out(e, s, sh.unsqueeze(dim)).exp_();
    acc.add_(at::sum_out(tile_sum, e, {dim}));
    m.copy_(m_new);
  }

  /// (n,) log-sum-exp; -inf where every entry was excluded (max -inf, sum 0).
  Tensor finish() { return max.add_(sum.log_()); }
};

/// Statistics of the positives of a set of rows (or columns), fed a sparse list per tile: a
/// running (max, sum) as OnlineLse, so that a single positive's lse is exactly its logit, plus
/// the sum of the positive logits and their count.
struct PositiveStats {
  Tensor max, sum, logit_sum, count;  // (n,) each

  PositiveStats(int64_t n, const at::TensorOptions& opts)
      : max(at::full({n}, -kInf, opts)),
        sum(at::zeros({n}, opts)),
        logit_sum(at::zeros({n}, opts)),
        count(at::zeros({n}, opts)) {}

  /// Folds positives with logits `values` at local indices `index` of entries [start, start + len).
  void merge(int64_t start, int64_t len, const Tensor& index, const Tensor& values) {
    Tensor m = max.narrow(0, start, len), acc = sum.narrow(0, start, len);
    const Tensor m_new = m.scatter_reduce(0, index, values, "amax", /*include_self=*/true);
    const Tensor shift = at::nan_to_num(m_new, std::numeric_limits<double>::quiet_NaN(), kInf, 0.0);
    acc.mul_((m - shift).exp_());
    acc.index_add_(0, index, (values - shift.index_select(0, index)).exp_());
    m.copy_(m_new);
    logit_sum.narrow(0, start, len).index_add_(0, index, values);
    count.narrow(0, start, len).index_add_(0, index, at::ones_like(values));
  }

  /// (4, n) stats [lse_neg, lse_pos, sum_pos, count] with the negatives' lse_neg (n,).
  Tensor finish(const Tensor& lse_neg) {
    return at::stack({lse_neg, max.add_(sum.log_()), logit_sum, count});
  }
};

/// Folds a tile's positives into the row statistics and, when it serves columns, the column ones.
void merge_positives(const Tile& t, const Positives& pos, bool columns,
                     PositiveStats& row_pos, PositiveStats& col_pos) {
  row_pos.merge(t.i0, t.tm, pos.rows, pos.logits);
  if (columns) col_pos.merge(t.j0, t.tn, pos.cols, pos.logits);
}

/// Unshifted forward: E = exp(s) once per element; lse_neg = log(sum E) over the negatives.
std::pair<Tensor, Tensor> forward_unshifted(const PairProblem& p, bool with_col,
                                            const Scratch& buf, PositiveStats& row_pos,
                                            PositiveStats& col_pos) {
  const auto opts = p.a.options();
  Tensor row_sum = at::zeros({p.rows()}, opts);
  Tensor col_sum = p.symmetric ? row_sum : (with_col ? at::zeros({p.cols()}, opts) : Tensor());
  for_each_tile(p, [&](const Tile& t) {
    Tensor e = tile_view(buf.s, t);
    logits(p, t, e);
    const Positives pos = find_positives(p, t, e, buf);
    const bool columns = serves_columns(p, t, with_col);
    e.exp_();
    if (!pos.empty()) {
      merge_positives(t, pos, columns, row_pos, col_pos);
      e.view(-1).index_fill_(0, pos.flat, 0.f);
    }
    fill_excluded(p, t, e, 0.f);
    Tensor part = buf.part_vec(t.tm);
    row_sum.narrow(0, t.i0, t.tm).add_(at::sum_out(part, e, {1}));
    if (columns) {
      part = buf.part_vec(t.tn);
      col_sum.narrow(0, t.j0, t.tn).add_(at::sum_out(part, e, {0}));
    }
  });
  Tensor col = (with_col && !p.symmetric) ? col_sum.log_() : Tensor();
  return {row_sum.log_(), col};
}

/// Online-max forward: two exps per element (row shift and column shift).
std::pair<Tensor, Tensor> forward_online(const PairProblem& p, bool with_col, const Scratch& buf,
                                         PositiveStats& row_pos, PositiveStats& col_pos) {
  const auto opts = p.a.options();
  OnlineLse rows(p.rows(), p.tile_m, opts);
  std::optional<OnlineLse> cols;
  if (with_col && !p.symmetric) cols.emplace(p.cols(), p.tile_n, opts);
  OnlineLse& col_acc = p.symmetric ? rows : *cols;
  for_each_tile(p, [&](const Tile& t) {
    Tensor s = tile_view(buf.s, t), e = tile_view(buf.aux, t);
    logits(p, t, s);
    const Positives pos = find_positives(p, t, s, buf);
    const bool columns = serves_columns(p, t, with_col);
    if (!pos.empty()) {
      merge_positives(t, pos, columns, row_pos, col_pos);
      s.view(-1).index_fill_(0, pos.flat, -kInf);
    }
    fill_excluded(p, t, s, -kInf);
    rows.merge(s, 1, t.i0, e, buf.part_vec(t.tm));
    if (columns) col_acc.merge(s, 0, t.j0, e, buf.part_vec(t.tn));
  });
  return {rows.finish(), cols ? cols->finish() : Tensor()};
}

/// (row stats (4, M), column stats (4, N) or (4, 0)); a symmetric problem has no column stats.
std::pair<Tensor, Tensor> pair_stats_forward(const PairProblem& p, bool with_col) {
  const auto opts = p.a.options();
  const Scratch buf(p, /*part_width=*/1);
  const bool columns = with_col && !p.symmetric;
  PositiveStats row_pos(p.rows(), opts);
  std::optional<PositiveStats> own_col_pos;
  if (columns) own_col_pos.emplace(p.cols(), opts);
  PositiveStats& col_pos = columns ? *own_col_pos : row_pos;
  const auto [row_neg, col_neg] = unshifted_is_exact(p)
                                      ? forward_unshifted(p, with_col, buf, row_pos, col_pos)
                                      : forward_online(p, with_col, buf, row_pos, col_pos);
  Tensor col = columns ? own_col_pos->finish(col_neg) : at::empty({4, 0}, opts);
  return {row_pos.finish(row_neg), col};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
/// Per-anchor backward coefficients (5, n) = [g, lse, lse_pos, 1 / count, r] of the rows and,
/// when the column losses reached the loss, of the columns (else undefined).
struct Upstream {
  Tensor row, col;
  bool has_col() const { return col.defined(); }
};

/// The weights of a tile's positives seen from its rows (index = pos.rows, start = i0) or its
/// columns: g ((q - 1 / count) - q r), q = exp(s - lse_pos), exactly 1 for a single positive.
Tensor positive_weights(const Tensor& coef, int64_t start, int64_t len, const Tensor& index,
                        const Tensor& logits) {
  const auto pick = [&](int64_t row) {
    return coef[row].narrow(0, start, len).index_select(0, index);
  };
  const Tensor grad = pick(0), lse_pos = pick(2), inv_count = pick(3), share = pick(4);
  const Tensor q = at::where(inv_count == 1, at::ones_like(logits), (logits - lse_pos).exp_());
  return grad * ((q - inv_count) - q * share);
}

/// Overwrites the positives' entries of the tile's weights w (tm, tn).
void set_positive_weights(const Tile& t, const Upstream& up, const Positives& pos, Tensor& w) {
  if (pos.empty()) return;
  Tensor values = positive_weights(up.row, t.i0, t.tm, pos.rows, pos.logits);
  if (up.has_col()) values.add_(positive_weights(up.col, t.j0, t.tn, pos.cols, pos.logits));
  w.view(-1).index_copy_(0, pos.flat, values);
}

/// da_I += scale * W b_J and, when the tile serves columns, db_J += scale * W^T a_I.
void accumulate_grads(const PairProblem& p, const Tile& t, const Tensor& w, const Scratch& buf,
                      Tensor& da, Tensor& db, bool need_db) {
  const Tensor a_i = p.a.narrow(0, t.i0, t.tm), b_j = p.b.narrow(0, t.j0, t.tn);
  const int64_t d = p.a.size(1);
  Tensor part = buf.part_mat(t.tm, d);
  da.narrow(0, t.i0, t.tm).add_(at::mm_out(part, w, b_j), /*alpha=*/p.scale);
  if (serves_columns(p, t, need_db)) {
    part = buf.part_mat(t.tn, d);
    db.narrow(0, t.j0, t.tn).add_(at::mm_out(part, w.t(), a_i), /*alpha=*/p.scale);
  }
}

/// Unshifted backward: a negative's g exp(s - lse) = exp(s) * g exp(-lse), one exp per element;
/// lse >= -R, so the per-row factor exp(-lse) <= e^40 cannot overflow.
void backward_unshifted(const PairProblem& p, const Upstream& up, const Scratch& buf, Tensor& da,
                        Tensor& db, bool need_db) {
  // Rows whose every pair is excluded have lse = -inf and an infinite factor; all their W entries
  // are excluded pairs, which are overwritten with 0 below.
  const Tensor row_coef = up.row[0] * at::exp(-up.row[1]);
  const Tensor col_coef = up.has_col() ? up.col[0] * at::exp(-up.col[1]) : Tensor();
  for_each_tile(p, [&](const Tile& t) {
    Tensor e = tile_view(buf.s, t), w = tile_view(buf.aux, t);
    logits(p, t, e);
    const Positives pos = find_positives(p, t, e, buf);
    e.exp_();
    const Tensor rc = row_coef.narrow(0, t.i0, t.tm).unsqueeze(1);
    if (col_coef.defined()) {
      at::add_out(w, rc, col_coef.narrow(0, t.j0, t.tn).unsqueeze(0)).mul_(e);
    } else {
      at::mul_out(w, e, rc);
    }
    set_positive_weights(t, up, pos, w);
    fill_excluded(p, t, w, 0.f);
    accumulate_grads(p, t, w, buf, da, db, need_db);
  });
}

/// Online backward: exp(s - row lse) and exp(s - column lse) separately, each <= 1.
void backward_online(const PairProblem& p, const Upstream& up, const Scratch& buf, Tensor& da,
                     Tensor& db, bool need_db) {
  for_each_tile(p, [&](const Tile& t) {
    Tensor s = tile_view(buf.s, t), w = tile_view(buf.aux, t);
    logits(p, t, s);
    const Positives pos = find_positives(p, t, s, buf);
    at::sub_out(w, s, up.row[1].narrow(0, t.i0, t.tm).unsqueeze(1)).exp_();
    w.mul_(up.row[0].narrow(0, t.i0, t.tm).unsqueeze(1));
    if (up.has_col()) {
      s.sub_(up.col[1].narrow(0, t.j0, t.tn).unsqueeze(0)).exp_();
      w.addcmul_(s, up.col[0].narrow(0, t.j0, t.tn).unsqueeze(0));
    }
    set_positive_weights(t, up, pos, w);
    // Excluded pairs were not masked before exp (a fully excluded row has lse = -inf and would
    // give exp(-inf + inf) = NaN): whatever they hold now is overwritten.
    fill_excluded(p, t, w, 0.f);
    accumulate_grads(p, t, w, buf, da, db, need_db);
  });
}

/// (da (M, D), db (N, D) or (0,)); for a symmetric problem da already holds both directions
/// and db is (0,).
std::pair<Tensor, Tensor> pair_backward(const PairProblem& p, const Upstream& up, bool need_db) {
  const auto opts = p.a.options();
  Tensor da = at::zeros(p.a.sizes(), opts);
  Tensor db = p.symmetric ? da : (need_db ? at::zeros(p.b.sizes(), opts) : Tensor());
  const Scratch buf(p, /*part_width=*/p.a.size(1));
  if (unshifted_is_exact(p)) {
    backward_unshifted(p, up, buf, da, db, need_db);
  } else {
    backward_online(p, up, buf, da, db, need_db);
  }
  return {da, (need_db && !p.symmetric) ? db : at::empty({0}, opts)};
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------
/// A Gram problem with its rows sorted by label (stable). The problem is the same under any
/// permutation (self-pairs stay on the diagonal), and sorted rows put every positive in tiles near
/// the diagonal: the others skip the search for positives (SupCon with 100 classes: most tiles).
struct SortedGram {
  Tensor order;  // (M,) original row of each sorted row
  PairProblem problem;

  SortedGram(const Tensor& a, const Tensor& labels, float scale)
      : order(std::get<1>(at::sort(labels, std::optional<bool>(true), /*dim=*/0))),
        problem(sorted_problem(a, labels, order, scale)) {}

  static PairProblem sorted_problem(const Tensor& a, const Tensor& labels, const Tensor& order,
                                    float scale) {
    const Tensor rows = a.index_select(0, order), row_labels = labels.index_select(0, order);
    return make_problem(rows, rows, row_labels, row_labels, scale, 0, /*symmetric=*/true);
  }
  /// x (..., M) or (M, ...) of sorted rows along dim -> in the original order.
  Tensor unsort(const Tensor& x, int64_t dim) const {
    return at::empty_like(x).index_copy_(dim, order, x);
  }
};

/// u (M, D), labels (M,), scale () -> stats (4, M) fp32, self-pairs excluded.
Tensor gram_stats_fwd(const Tensor& u, const Tensor& labels, const Tensor& scale) {
  at::NoGradGuard no_grad;
  const Tensor a = features(u, "u");
  const Tensor l = labels_of(labels, a.size(0), "labels");
  const float sc = read_scale(scale);
  if (a.size(0) == 0) return at::empty({4, 0}, a.options());
  const SortedGram gram(a, l, sc);
  return gram.unsort(pair_stats_forward(gram.problem, false).first, 1);
}

/// u (M, D), labels (M,), scale (), coef (5, M) -> du (M, D) fp32.
Tensor gram_stats_bwd(const Tensor& u, const Tensor& labels, const Tensor& scale,
                      const Tensor& coef) {
  at::NoGradGuard no_grad;
  const Tensor a = features(u, "u");
  const Tensor l = labels_of(labels, a.size(0), "labels");
  const float sc = read_scale(scale);
  const Tensor c = coefficients(coef, a.size(0), "coef");
  if (a.size(0) == 0) return at::zeros(a.sizes(), a.options());
  const SortedGram gram(a, l, sc);
  const Tensor sorted_coef = c.index_select(1, gram.order);
  const Upstream up{sorted_coef, sorted_coef};
  return gram.unsort(pair_backward(gram.problem, up, /*need_db=*/true).first, 0);
}

/// The checked inputs of cross_stats_fwd / cross_stats_bwd: features a (M, D), b (N, D) fp32,
/// labels (M,), (N,) int64, the scale, and the left-out diagonal j - i == offset (if any).
struct CrossInputs {
  Tensor a, b, la, lb;
  float scale;
  std::optional<int64_t> offset;
  bool empty() const { return a.size(0) == 0 || b.size(0) == 0; }
  PairProblem problem() const { return make_problem(a, b, la, lb, scale, offset, false); }
};

CrossInputs cross_inputs(const Tensor& q, const Tensor& k, const Tensor& q_labels,
                         const Tensor& k_labels, const Tensor& scale, int64_t diag_offset,
                         bool has_diag) {
  Tensor a = features(q, "q"), b = features(k, "k");
  check_same_dim(a, b);
  Tensor la = labels_of(q_labels, a.size(0), "q_labels");
  Tensor lb = labels_of(k_labels, b.size(0), "k_labels");
  return {a, b, la, lb, read_scale(scale),
          has_diag ? std::optional<int64_t>(diag_offset) : std::nullopt};
}

/// q (M, D), k (N, D), labels (M,), (N,), scale () -> (stats (4, M), column stats (4, N) or
/// (4, 0)) fp32, excluding the pairs j - i == diag_offset when has_diag.
std::tuple<Tensor, Tensor> cross_stats_fwd(const Tensor& q, const Tensor& k,
                                           const Tensor& q_labels, const Tensor& k_labels,
                                           const Tensor& scale, int64_t diag_offset, bool has_diag,
                                           bool with_col) {
  at::NoGradGuard no_grad;
  const CrossInputs in = cross_inputs(q, k, q_labels, k_labels, scale, diag_offset, has_diag);
  const auto opts = in.a.options();
  if (in.empty()) {  // empty sums: lse = -inf, nothing positive
    const auto empty_stats = [&](int64_t n) {
      return at::stack({at::full({n}, -kInf, opts), at::full({n}, -kInf, opts),
                        at::zeros({n}, opts), at::zeros({n}, opts)});
    };
    return {empty_stats(in.a.size(0)), empty_stats(with_col ? in.b.size(0) : 0)};
  }
  const auto [row, col] = pair_stats_forward(in.problem(), with_col);
  return {row, col};
}

/// q (M, D), k (N, D), labels, scale (), coef (5, M), col_coef (5, N) or (5, 0) ->
/// (dq (M, D), dk (N, D) or (0,)) fp32.
std::tuple<Tensor, Tensor> cross_stats_bwd(const Tensor& q, const Tensor& k,
                                           const Tensor& q_labels, const Tensor& k_labels,
                                           const Tensor& scale, int64_t diag_offset, bool has_diag,
                                           const Tensor& coef, const Tensor& col_coef,
                                           bool need_dk) {
  at::NoGradGuard no_grad;
  const CrossInputs in = cross_inputs(q, k, q_labels, k_labels, scale, diag_offset, has_diag);
  Upstream up{coefficients(coef, in.a.size(0), "coef"), Tensor()};
  if (col_coef.size(-1) > 0 || in.b.size(0) == 0) {
    up.col = coefficients(col_coef, in.b.size(0), "col_coef");
  }
  const auto opts = in.a.options();
  if (in.empty()) {
    Tensor dk = need_dk ? at::zeros(in.b.sizes(), opts) : at::empty({0}, opts);
    return {at::zeros(in.a.sizes(), opts), dk};
  }
  const auto [dq, dk] = pair_backward(in.problem(), up, need_dk);
  return {dq, dk};
}

/// Bank negatives (MoCo queue, memory banks): q (M, D), bank (K, D), scale () ->
/// (lse (M,), mean (M, D)) with lse_i = log sum_j exp(s_ij) and mean_i = sum_j softmax(s_i)_j bank_j.
/// Since only dq is wanted, dq_i = scale * grad_i * mean_i: saving the O(M * D) mean lets the
/// backward skip a second pass over the bank (2 GEMMs in all instead of 3). Online max per row,
/// exact for any magnitude; the mean accumulator is rescaled when the running max moves.
std::tuple<Tensor, Tensor> bank_lse_fwd(const Tensor& q_in, const Tensor& bank_in,
                                        const Tensor& scale) {
  const Tensor q = features(q_in, "q");
  const Tensor bank = features(bank_in, "bank");
  check_same_dim(q, bank);
  const float sc = read_scale(scale);
  const int64_t m = q.size(0), k = bank.size(0), d = q.size(1);
  const auto opts = q.options();
  Tensor row_max = at::full({m, 1}, -kInf, opts);
  Tensor row_sum = at::zeros({m, 1}, opts);
  Tensor mean = at::zeros({m, d}, opts);
  const int64_t cols = std::clamp<int64_t>(kTileElems / std::max<int64_t>(m, 1), kTileRows,
                                           kMaxTileCols);
  Tensor scratch = at::empty({m, std::min(cols, std::max<int64_t>(k, 1))}, opts);
  for (int64_t start = 0; start < k; start += cols) {
    const int64_t n = std::min(cols, k - start);
    const Tensor block = bank.narrow(0, start, n);
    Tensor s = scratch.narrow(1, 0, n);
    at::mm_out(s, q, block.t());
    s.mul_(sc);
    const Tensor new_max = at::maximum(row_max, std::get<0>(s.max(1, true)));
    // Rows whose max is still -inf shift by 0, avoiding (-inf) - (-inf).
    const Tensor shift = at::where(new_max == -kInf, at::zeros_like(new_max), new_max);
    const Tensor rescale = (row_max - shift).exp_();
    s.sub_(shift).exp_();
    row_sum.mul_(rescale).add_(s.sum(1, true));
    mean.mul_(rescale).addmm_(s, block);
    row_max = new_max;
  }
  Tensor lse = (row_max + row_sum.log()).squeeze(1);
  mean.div_(row_sum);
  return {lse, mean};
}

}  // namespace

// Registered into fastcl._C by csrc/bindings.cpp.
void bind_contrastive(py::module_& m) {
  // The kernels run on ATen/MKL threads only and never touch Python objects: release the GIL.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("gram_stats_fwd", &gram_stats_fwd, "u (M, D), labels (M,), scale () -> stats (4, M)",
        py::arg("u"), py::arg("labels"), py::arg("scale"), nogil);
  m.def("gram_stats_bwd", &gram_stats_bwd,
        "u (M, D), labels (M,), scale (), coef (5, M) -> du (M, D)", py::arg("u"),
        py::arg("labels"), py::arg("scale"), py::arg("coef"), nogil);
  m.def("cross_stats_fwd", &cross_stats_fwd,
        "q (M, D), k (N, D), q_labels, k_labels, scale (), diag_offset, has_diag, with_col -> "
        "(stats (4, M), col_stats (4, N) or (4, 0))",
        py::arg("q"), py::arg("k"), py::arg("q_labels"), py::arg("k_labels"), py::arg("scale"),
        py::arg("diag_offset"), py::arg("has_diag"), py::arg("with_col"), nogil);
  m.def("cross_stats_bwd", &cross_stats_bwd,
        "q, k, q_labels, k_labels, scale, diag_offset, has_diag, coef (5, M), col_coef (5, N) or "
        "(5, 0), need_dk -> (dq (M, D), dk (N, D) or (0,))",
        py::arg("q"), py::arg("k"), py::arg("q_labels"), py::arg("k_labels"), py::arg("scale"),
        py::arg("diag_offset"), py::arg("has_diag"), py::arg("coef"), py::arg("col_coef"),
        py::arg("need_dk"), nogil);
  m.def("bank_lse_fwd", &bank_lse_fwd, "q (M, D), bank (K, D), scale () -> (lse (M,), mean (M, D))",
        py::arg("q"), py::arg("bank"), py::arg("scale"), nogil);
}
