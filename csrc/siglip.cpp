// CPU kernels of the siglip op family (fastcl/ops/siglip.py): the sigmoid loss of every pair of
// rows of x (M, D) and y (N, D), logits t_ij = scale <x_i, y_j> + bias, the pairs j - i == offset
// positive (z = +1) and every other pair negative (z = -1):
//
//   sigmoid_pairs_fwd(x, y, scale, bias, offset)        row_loss (M,) = sum_j softplus(-z_ij t_ij)
//   sigmoid_pairs_bwd(x, y, scale, bias, offset, grad)  (dx (M, D), dy (N, D), dscale (), dbias ())
//   sigmoid_pairs_sum(x, y, scale, bias, offset, normalize)
//                          (sum_i row_loss_i (), and its dx, dy, dscale, dbias), rows optionally
//                          L2-normalized first
//
// With u = -z t (the logit negated on the positives), a pair's loss is softplus(u) and its
// backward weight W_ij = g_i d softplus(u_ij) / d t_ij = -z_ij g_i sigmoid(u_ij); then
// dx = scale W y, dy = scale W^T x, dscale = sum W o (x y^T) = sum_i <(W y)_i, x_i>, dbias = sum W.
//
// The N x N matrix is never materialized: the work runs over (tile_m, tile_n) tiles, each formed by
// an MKL GEMM into reused scratch and reduced by vectorized element-wise passes (exact softplus and
// sigmoid at any logit: ATen's softplus in the forward, see softplus_ below; the weighted pass
// takes sigmoid and softplus from one exp, see sigmoid_and_softplus_). The tile loop is sequential:
// each tile adds to its own rows of dx and of dy, so no two writers meet and no atomics are needed,
// while every GEMM and element-wise pass inside a tile runs on all of ATen's threads (OpenMP).
// Backward recomputes the tiles: per tile one GEMM forms the logits (scale and bias folded into it)
// and two more give W y_J and W^T x_I, so forward + backward cost 4 GEMMs (the minimum without
// keeping the matrix). sigmoid_pairs_sum, for a loss reduced to one scalar (whose upstream gradient
// only scales the gradients), does both in one pass: per tile one GEMM forms the logits, the loss
// and W (g = 1) come from them and two GEMMs accumulate dx and dy: 3 GEMMs, nothing recomputed.
// With normalize, each tile's rows are scaled by the inverse norms into scratch (the normalized
// copies of x and y are never formed) and F.normalize's Jacobian is applied to dx and dy in place.
// Every per-tile result is computed from zero into scratch and then added to its accumulator (a
// GEMM accumulating into its output chains every term of a row onto one fp32 value). Extra memory:
// O(tile_m * tile_n + (tile_m + tile_n) * D) scratch, plus fp32 copies of 16-bit or strided inputs
// and the gradients.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "checks.h"  // before cpu_kernels.h: baseline ISA
#include "cpu_kernels.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>

namespace {

using at::Tensor;

// Rows and columns of a tile: a 512 x 1024 fp32 tile (2 MiB) keeps MKL at its peak and makes few
// enough tiles that the element-wise passes' parallel regions stay cheap.
constexpr int64_t kTileRows = 512;
constexpr int64_t kTileCols = 1024;

/// x: (rows, D) features -> contiguous fp32 (no copy when already so).
Tensor features(const Tensor& x, const char* name) {
  Tensor f = fastcl::contiguous_float(x, name);
  TORCH_CHECK(f.dim() == 2, name, " must be 2-D (rows, D), got shape ", f.sizes());
  return f;
}

struct Problem {
  Tensor x, y;  // (M, D), (N, D) fp32 contiguous
  float scale, bias;
  int64_t offset;  // positives: j - i == offset
  int64_t tile_m, tile_n;

  Problem(const Tensor& x_in, const Tensor& y_in, const Tensor& scale_in, const Tensor& bias_in,
          int64_t offset_in)
      : x(features(x_in, "x")),
        y(features(y_in, "y")),
        scale(fastcl::read_scale(scale_in, "scale")),
        bias(fastcl::read_scale(bias_in, "bias")),
        offset(offset_in),
        tile_m(std::max<int64_t>(1, std::min(x.size(0), kTileRows))),
        tile_n(std::max<int64_t>(1, std::min(y.size(0), kTileCols))) {
    TORCH_CHECK(x.size(1) == y.size(1), "x and y must have the same feature size D, got ",
                x.size(1), " and ", y.size(1));
  }
  int64_t rows() const { return x.size(0); }
  int64_t cols() const { return y.size(0); }
};

struct Tile {
  int64_t i0, tm, j0, tn;
};

/// Calls fn(tile) for every tile, row block by row block.
template <typename Fn>
void for_each_tile(const Problem& p, Fn&& fn) {
  for (int64_t i0 = 0; i0 < p.rows(); i0 += p.tile_m) {
    const int64_t tm = std::min(p.tile_m, p.rows() - i0);
    for (int64_t j0 = 0; j0 < p.cols(); j0 += p.tile_n) {
      fn(Tile{i0, tm, j0, std::min(p.tile_n, p.cols() - j0)});
    }
  }
}

/// A (tm, tn) contiguous view on the front of a flat scratch buffer.
Tensor tile_view(const Tensor& buffer, const Tile& t) {
  return buffer.narrow(0, 0, t.tm * t.tn).view({t.tm, t.tn});
}

/// Negates the tile's positive pairs (its local diagonal offset - (j0 - i0)), if any lie in it.
void negate_positives(const Problem& p, const Tile& t, const Tensor& x) {
  // |offset| may be anything: compare before forming the local index of an in-range offset.
  const int64_t local = p.offset - (t.j0 - t.i0);
  if (p.offset > -p.rows() && p.offset < p.cols() && local > -t.tm && local < t.tn) {
    x.diagonal(local).neg_();
  }
}

/// u (tm, tn) = -z (scale x_i y_j^T + bias) for the tile's rows x_i, y_j: one GEMM whose output
/// starts at bias.
void signed_logits(const Problem& p, const Tile& t, const Tensor& bias, const Tensor& x_i,
                   const Tensor& y_j, Tensor u) {
  at::addmm_out(u, bias, x_i, y_j.t(), /*beta=*/1, /*alpha=*/p.scale);
  negate_positives(p, t, u);
}

/// softplus(u) = log(1 + exp(u)), in place. ATen's softplus is log1p(exp(u)) (exact for the tiny
/// losses of u << 0) up to threshold 20, then u itself: off by log1p(exp(-u)) < 2.1e-9 absolute,
/// a relative 1e-10 of the value, below fp32 rounding.
void softplus_(Tensor u) { at::softplus_out(u, u, /*beta=*/1, /*threshold=*/20); }

Tensor sigmoid_pairs_fwd(const Tensor& x, const Tensor& y, const Tensor& scale, const Tensor& bias,
                         int64_t offset) {
  fastcl::require_avx2("SigLIP");
  const Problem p(x, y, scale, bias, offset);
  const auto opts = p.x.options();
  const Tensor bias_f = at::scalar_tensor(p.bias, opts);
  Tensor row_loss = at::zeros({p.rows()}, opts);
  Tensor u = at::empty({p.tile_m * p.tile_n}, opts), part = at::empty({p.tile_m}, opts);
  for_each_tile(p, [&](const Tile& t) {
    Tensor u_t = tile_view(u, t);
    signed_logits(p, t, bias_f, p.x.narrow(0, t.i0, t.tm), p.y.narrow(0, t.j0, t.tn), u_t);
    softplus_(u_t);
    Tensor part_t = part.narrow(0, 0, t.tm);
    row_loss.narrow(0, t.i0, t.tm).add_(at::sum_out(part_t, u_t, {1}));
  });
  return row_loss;
}

/// F.normalize's row scaling of x (rows, D): (1 / max(|x_i|, eps), whether |x_i| > eps), the
/// second a 0/1 float mask: the rows clamped at eps are only scaled, so their Jacobian has no
/// projection term.
std::pair<Tensor, Tensor> inverse_norms(const Tensor& x) {
  constexpr double kEps = 1e-12;  // F.normalize's default
  const Tensor norms = at::linalg_vector_norm(x, 2, {1});
  return {norms.clamp_min(kEps).reciprocal_(), norms.gt(kEps).to(at::kFloat)};
}

/// The rows [start, start + count) of features f, normalized into scratch when inv is defined.
Tensor rows_of(const Tensor& f, const Tensor& inv, int64_t start, int64_t count,
               const Tensor& scratch) {
  const Tensor rows = f.narrow(0, start, count);
  if (!inv.defined()) return rows;
  Tensor out = scratch.narrow(0, 0, count * f.size(1)).view({count, f.size(1)});
  return at::mul_out(out, rows, inv.narrow(0, start, count).unsqueeze(1));
}

/// The gradient w.r.t. the normalized rows, a (rows, D) = A * scale with dots_i = <A_i, f_hat_i>,
/// turned in place into the gradient w.r.t. the raw rows: scale inv_i (A_i - f_hat_i dots_i)
/// (F.normalize's Jacobian; the projection dropped on clamped rows).
void normalize_backward_(Tensor a, const Tensor& f_hat, const Tensor& dots, const Tensor& inv,
                         const Tensor& kept, float scale) {
  a.addcmul_(f_hat, (dots * kept).unsqueeze(1), -1).mul_((inv * scale).unsqueeze(1));
}

using Vec = at::vec::Vectorized<float>;

/// Over a contiguous tile u (tm, tn) of u = -z t: u replaced in place by d softplus(u) / du =
/// sigmoid(u) and, when loss_rows is not null, each row's sum of softplus(u) added to its entry,
/// both from one exp: e = exp(-|u|), softplus(u) = max(u, 0) + log1p(e) (exact for the tiny losses
/// of u << 0, where e is the loss) and sigmoid(u) = (u >= 0 ? 1 : e) / (1 + e). One read and one
/// write of the tile, rows split over ATen's threads.
void sigmoid_and_softplus_(Tensor u, float* loss_rows) {
  const int64_t tn = u.size(1);
  float* data = u.data_ptr<float>();
  at::parallel_for(0, u.size(0), 16, [&](int64_t begin, int64_t end) {
    const Vec zero(0.f), one(1.f);
    for (int64_t i = begin; i < end; ++i) {
      float* row = data + i * tn;
      Vec acc(0.f);
      int64_t j = 0;
      for (; j + Vec::size() <= tn; j += Vec::size()) {
        const Vec v = Vec::loadu(row + j);
        const Vec e = v.abs().neg().exp();
        if (loss_rows) acc = acc + at::vec::maximum(v, zero) + e.log1p();
        (Vec::blendv(e, one, v >= zero) / (one + e)).store(row + j);
      }
      float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
      for (; j < tn; ++j) {
        const float v = row[j], e = std::exp(-std::fabs(v));
        sum += std::max(v, 0.f) + std::log1p(e);
        row[j] = (v >= 0 ? 1.f : e) / (1.f + e);
      }
      if (loss_rows) loss_rows[i] += sum;
    }
  });
}

struct Grads {
  Tensor dx, dy, dscale, dbias;
};

/// The weighted pass over every tile: W = -z g sigmoid(u) (g = 1 when grad is undefined) and
/// dx = scale W y, dy = scale W^T x, dscale, dbias; when loss_rows is defined, each tile's
/// softplus(u) is also added to it. normalize: x and y are L2-normalized rows first (each tile's
/// rows scaled into scratch; only the inverse norms are kept) and dx, dy are returned w.r.t. the
/// raw rows.
Grads weighted_pass(const Problem& p, const Tensor& grad, Tensor loss_rows, bool normalize) {
  const auto opts = p.x.options();
  const int64_t d = p.x.size(1);
  const Tensor bias_f = at::scalar_tensor(p.bias, opts);
  Tensor inv_x, kept_x, inv_y, kept_y;
  if (normalize) {
    std::tie(inv_x, kept_x) = inverse_norms(p.x);
    std::tie(inv_y, kept_y) = inverse_norms(p.y);
  }
  Tensor dx = at::zeros_like(p.x), dy = at::zeros_like(p.y);
  // Per-row sums of W and of W o (x y^T), summed once at the end (ATen's cascade sum).
  Tensor dbias_rows = at::zeros({p.rows()}, opts), dscale_rows = at::zeros({p.rows()}, opts);
  Tensor w = at::empty({p.tile_m * p.tile_n}, opts);
  // Scratch: a tile's (rows, D) product, then (tile_m,) row sums after it; normalized rows.
  Tensor part = at::empty({std::max(p.tile_m, p.tile_n) * (d + 1)}, opts);
  Tensor x_hat = normalize ? at::empty({p.tile_m * d}, opts) : Tensor();
  Tensor y_hat = normalize ? at::empty({p.tile_n * d}, opts) : Tensor();
  Tensor x_i;
  for_each_tile(p, [&](const Tile& t) {
    if (t.j0 == 0) x_i = rows_of(p.x, inv_x, t.i0, t.tm, x_hat);
    const Tensor y_j = rows_of(p.y, inv_y, t.j0, t.tn, y_hat);
    Tensor w_t = tile_view(w, t);
    signed_logits(p, t, bias_f, x_i, y_j, w_t);
    float* tile_losses = loss_rows.defined() ? loss_rows.data_ptr<float>() + t.i0 : nullptr;
    sigmoid_and_softplus_(w_t, tile_losses);  // W / g, and the loss terms
    negate_positives(p, t, w_t);  // d u / d t = -z
    if (grad.defined()) w_t.mul_(grad.narrow(0, t.i0, t.tm).unsqueeze(1));
    Tensor row_sums = part.narrow(0, 0, t.tm);
    dbias_rows.narrow(0, t.i0, t.tm).add_(at::sum_out(row_sums, w_t, {1}));
    Tensor part_x = part.narrow(0, 0, t.tm * d).view({t.tm, d});
    dx.narrow(0, t.i0, t.tm).add_(at::mm_out(part_x, w_t, y_j));
    Tensor part_y = part.narrow(0, 0, t.tn * d).view({t.tn, d});
    dy.narrow(0, t.j0, t.tn).add_(at::mm_out(part_y, w_t.t(), x_i));
    if (t.j0 + t.tn == p.cols()) {
      // Rows I of dx are complete: sum_j W_ij <x_i, y_j> = <(W y)_i, x_i> (before dx's scale).
      Tensor dx_i = dx.narrow(0, t.i0, t.tm);
      Tensor rows = part.narrow(0, t.tm * d, t.tm);
      at::sum_out(rows, at::mul_out(part_x, dx_i, x_i), {1});
      dscale_rows.narrow(0, t.i0, t.tm).copy_(rows);
      if (normalize) {
        normalize_backward_(dx_i, x_i, rows, inv_x.narrow(0, t.i0, t.tm),
                            kept_x.narrow(0, t.i0, t.tm), p.scale);
      }
    }
  });
  if (normalize) {
    // dy is complete only now: its Jacobian block by block, with <(W^T x)_j, y_hat_j>.
    for (int64_t j0 = 0; j0 < p.cols(); j0 += p.tile_n) {
      const int64_t tn = std::min(p.tile_n, p.cols() - j0);
      const Tensor y_j = rows_of(p.y, inv_y, j0, tn, y_hat);
      Tensor dy_j = dy.narrow(0, j0, tn);
      Tensor part_y = part.narrow(0, 0, tn * d).view({tn, d});
      Tensor rows = part.narrow(0, tn * d, tn);
      at::sum_out(rows, at::mul_out(part_y, dy_j, y_j), {1});
      normalize_backward_(dy_j, y_j, rows, inv_y.narrow(0, j0, tn), kept_y.narrow(0, j0, tn),
                          p.scale);
    }
  } else {
    dx.mul_(p.scale);
    dy.mul_(p.scale);
  }
  return {dx, dy, dscale_rows.sum(), dbias_rows.sum()};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> sigmoid_pairs_bwd(const Tensor& x, const Tensor& y,
                                                             const Tensor& scale,
                                                             const Tensor& bias, int64_t offset,
                                                             const Tensor& grad) {
  fastcl::require_avx2("SigLIP");
  const Problem p(x, y, scale, bias, offset);
  const Tensor g = fastcl::contiguous_float(grad, "grad");
  TORCH_CHECK(g.dim() == 1 && g.size(0) == p.rows(), "grad must have shape (", p.rows(),
              ",), got ", g.sizes());
  Grads r = weighted_pass(p, g, Tensor(), /*normalize=*/false);
  return {r.dx, r.dy, r.dscale, r.dbias};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> sigmoid_pairs_sum(
    const Tensor& x, const Tensor& y, const Tensor& scale, const Tensor& bias, int64_t offset,
    bool normalize) {
  fastcl::require_avx2("SigLIP");
  const Problem p(x, y, scale, bias, offset);
  Tensor loss_rows = at::zeros({p.rows()}, p.x.options());
  Grads r = weighted_pass(p, Tensor(), loss_rows, normalize);
  return {loss_rows.sum(), r.dx, r.dy, r.dscale, r.dbias};
}

}  // namespace

FASTCL_END_AVX2_KERNELS

void bind_siglip(py::module_& m) {
  // The kernels run on ATen/MKL threads only and never touch Python objects: release the GIL.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("sigmoid_pairs_fwd", &sigmoid_pairs_fwd,
        "x (M, D), y (N, D), scale (), bias (), diag_offset -> row_loss (M,)", py::arg("x"),
        py::arg("y"), py::arg("scale"), py::arg("bias"), py::arg("diag_offset"), nogil);
  m.def("sigmoid_pairs_bwd", &sigmoid_pairs_bwd,
        "x (M, D), y (N, D), scale (), bias (), diag_offset, grad (M,) -> (dx (M, D), dy (N, D), "
        "dscale (), dbias ())",
        py::arg("x"), py::arg("y"), py::arg("scale"), py::arg("bias"), py::arg("diag_offset"),
        py::arg("grad"), nogil);
  m.def("sigmoid_pairs_sum", &sigmoid_pairs_sum,
        "x (M, D), y (N, D), scale (), bias (), diag_offset, normalize -> (loss (), dx (M, D), "
        "dy (N, D), dscale (), dbias ()): the summed loss and its gradients in one pass",
        py::arg("x"), py::arg("y"), py::arg("scale"), py::arg("bias"), py::arg("diag_offset"),
        py::arg("normalize"), nogil);
}
