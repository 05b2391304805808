// The Python module repforget_kernels._C.
//
// The ops are declared once, in Python (repforget_kernels/_ops.py: schema, fake, torch composite).
// Importing this module loads the library, whose static initialisers register compiled kernels of
// those ops with the torch dispatcher: the CPU kernels in the other files of csrc/cpu
// (TORCH_LIBRARY_IMPL(repforget, CPU, m)), the CUDA kernels in csrc/cuda
// (TORCH_LIBRARY_IMPL(repforget, CUDA, m)). No pybind11: the module itself is empty.
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
