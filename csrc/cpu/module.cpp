// The Python module repforget_kernels._C and the schemas of the repforget ops.
//
// Importing the module loads this library, whose static initialisers register the
// ops with the torch dispatcher: they are then reached as torch.ops.repforget.<name>.
// Kernels live in the other files of csrc/cpu (TORCH_LIBRARY_IMPL(repforget, CPU, m));
// CUDA bindings add theirs with TORCH_LIBRARY_IMPL(repforget, CUDA, m) or new schemas
// with TORCH_LIBRARY_FRAGMENT(repforget, m). No pybind11: the module itself is empty.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "repforget compiled kernels; the ops are registered as torch.ops.repforget.*",
      -1,  // no per-module state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(repforget, m) {
  // for each pair: acc += scale * float(grad)^2, in place (acc float32/float64).
  m.def("square_accumulate(Tensor(a!)[] accs, Tensor[] grads, float scale) -> ()");
  // counts (bins,) int64 of values in [lo, hi], linear or log10 bins.
  m.def("histogram(Tensor values, float lo, float hi, int bins, bool log) -> Tensor");
  // (L, n, d) -> ((L, n, n) centred (or U-centred) Gram matrices of (x - mean) * scale, (L,) traces).
  m.def("centered_gram(Tensor x, bool unbiased, Tensor? scale=None) -> (Tensor, Tensor)");
}
