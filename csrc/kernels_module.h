// What the two kernels' libraries (kernels_cpu.cpp, kernels_cuda.cpp) share: a Python module, on the limited API,
// that holds their KernelTable in a capsule, and the catch that keeps exceptions on this side of the table.
#pragma once

#include <Python.h>

#include <cstdio>
#include <exception>

#include "nag_kernels.h"

namespace nag {

// f(), with what it threw as the returned message (kept until this thread's next failure; cut at 1023 bytes, so that
// keeping it allocates nothing that could throw in turn), else nullptr.
template <typename F>
const char* catching(F&& f) noexcept {
  thread_local char message[1024];
  try {
    f();
    return nullptr;
  } catch (const std::exception& error) {
    std::snprintf(message, sizeof(message), "%s", error.what());
  } catch (...) {
    std::snprintf(message, sizeof(message), "%s", "nag_cuda: unknown error in the kernels' library");
  }
  return message;
}

// The module of `def` (for its PyInit), whose attribute "table" is a capsule of `table` named `capsule_name`.
inline PyObject* module_with_table(PyModuleDef* def, const KernelTable* table, const char* capsule_name) {
  PyObject* module = PyModule_Create(def);
  if (module == nullptr) return nullptr;
  PyObject* capsule = PyCapsule_New(const_cast<KernelTable*>(table), capsule_name, nullptr);
  if (capsule == nullptr || PyModule_AddObject(module, "table", capsule) != 0) {
    Py_XDECREF(capsule);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

}  // namespace nag
