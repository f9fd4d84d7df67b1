// The fastcl._C extension module: one PYBIND11_MODULE for all op families, each of which
// registers its CPU kernels from its own csrc/<family>.cpp.
#include <torch/extension.h>

#include "kept_output.h"

void bind_bank(py::module_& m);
void bind_contrastive(py::module_& m);
void bind_dino(py::module_& m);
void bind_koleo(py::module_& m);
void bind_momentum(py::module_& m);
void bind_siglip(py::module_& m);
void bind_sinkhorn(py::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcl CPU kernels (see fastcl/ops/<family>.py for each op's contract)";
  bind_bank(m);
  bind_contrastive(m);
  bind_dino(m);
  bind_koleo(m);
  bind_momentum(m);
  bind_siglip(m);
  bind_sinkhorn(m);
  m.def("empty_cache", &fastcl::empty_kept_outputs,
        "drops the output buffers kept for reuse (csrc/kept_output.h): the next calls allocate "
        "afresh");
}
