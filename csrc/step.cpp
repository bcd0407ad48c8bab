// nag_cuda._C._step: FusedNAG.step() for plain tensors, the stages of nag_cuda/_step.py.step in order (step.h), and
// stage "commit". Also the module nag_cuda._C itself, whose import registers the ops (nag_ops.cpp).
#include <Python.h>

#include <memory>

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "nag_kernels.h"
#include "nag_ops.h"
#include "step.h"

namespace nag::step {

Keys keys;

namespace {

std::optional<at::Tensor> optional_tensor(PyObject* obj) {
  if (obj == Py_None) return std::nullopt;
  TORCH_CHECK(THPVariable_Check(obj), "nag_cuda._C._step: expected a tensor or None");
  return THPVariable_Unpack(obj);
}

// Stage "commit" (_step.commit): new state into opt.state, once the kernels have written it (that of the first `ran`
// calls). Python code runs here (hashing a param, a dict's insert): what it uses is owned.
void commit(PyObject* state, Plan& plan, size_t ran) {
  for (NewState& s : plan.new_state) {
    if (s.call >= ran) continue;
    THPObjectPtr value(THPVariable_Wrap(std::move(s.value)));
    if (!value) throw python_error();
    THPObjectPtr st(Py_XNewRef(PyDict_GetItemWithError(state, s.param.get())));
    if (!st) {
      if (PyErr_Occurred()) throw python_error();
      st = THPObjectPtr(PyDict_New());
      if (!st || PyDict_SetItem(state, s.param.get(), st.get()) < 0) throw python_error();
    }
    if (PyDict_SetItem(st.get(), s.key, value.get()) < 0) throw python_error();
  }
}

constexpr const char* kCacheName = "nag_cuda._C.StateCache";

// _state_cache() -> a new StateCache for one optimizer's steps (FusedNAG._state_cache), or None where gather cannot
// use one (Python < 3.12).
PyObject* state_cache(PyObject* /*module*/, PyObject* /*args*/) {
  HANDLE_TH_ERRORS
  if (!dict_watchers()) Py_RETURN_NONE;
  auto cache = std::make_unique<StateCache>();
  PyObject* capsule = PyCapsule_New(cache.get(), kCacheName, [](PyObject* capsule) {
    delete static_cast<StateCache*>(PyCapsule_GetPointer(capsule, kCacheName));
  });
  if (capsule != nullptr) cache.release();
  return capsule;
  END_HANDLE_TH_ERRORS
}

// _step(param_groups, state, grad_scale, found_inf, clip, cache) -> False ("not mine", nothing changed), True
// (stepped), or the norm (stepped with clip = (max_grad_norm, norm_type)). Raises, with nothing changed, on bad tensors, as the
// op does; after the first op call has written, only for a failing kernel.
PyObject* step(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *groups, *state, *grad_scale_obj, *found_inf_obj, *clip_obj, *cache_obj = Py_None;
  if (!PyArg_ParseTuple(args, "OO!OOO|O", &groups, &PyDict_Type, &state, &grad_scale_obj, &found_inf_obj, &clip_obj,
                        &cache_obj)) {
    return nullptr;
  }
  StateCache* cache = nullptr;  // (None: read all state)
  if (cache_obj != Py_None) {
    cache = static_cast<StateCache*>(PyCapsule_GetPointer(cache_obj, kCacheName));
    if (cache == nullptr) return nullptr;
  }
  double max_norm = 0.0, norm_type = 2.0;
  const bool clipped = clip_obj != Py_None;
  if (clipped && !PyArg_ParseTuple(clip_obj, "dd", &max_norm, &norm_type)) return nullptr;
  const std::optional<at::Tensor> grad_scale = optional_tensor(grad_scale_obj);
  const std::optional<at::Tensor> found_inf = optional_tensor(found_inf_obj);

  std::vector<GroupRead> reads;
  if (!read_groups(groups, found_inf.has_value(), clipped, reads)) Py_RETURN_FALSE;
  Plan plan;
  if (!gather(state, cache, reads, grad_scale, found_inf, clipped, plan)) Py_RETURN_FALSE;
  const at::Tensor norm = clipped ? clip(plan, grad_scale, max_norm, norm_type) : at::Tensor();
  check(plan);
  size_t ran = 0;
  try {
    run(plan, ran);
  } catch (...) {
    commit(state, plan, ran);  // (the state of the calls that ran, as _step.run commits it)
    throw;
  }
  commit(state, plan, ran);
  if (norm.defined()) return THPVariable_Wrap(norm);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// The KernelTable of the kernels' library `module` (nag_kernels.h), importing it; or nullptr with an ImportError set
// that names the library.
const KernelTable* import_kernels(const char* module, const char* capsule) {
  const char* reinstall = "reinstall nag_cuda (pip install --no-build-isolation --force-reinstall --no-deps .) so "
                          "that its libraries come from one build";
  THPObjectPtr library(PyImport_ImportModule(module));
  THPObjectPtr table_object(library ? PyObject_GetAttrString(library.get(), "table") : nullptr);
  const auto* table = table_object ? static_cast<const KernelTable*>(PyCapsule_GetPointer(table_object.get(),
                                                                                         capsule))
                                   : nullptr;
  if (table == nullptr) {
    PyErr_Clear();
    PyErr_Format(PyExc_ImportError, "nag_cuda: the kernels' library %s is missing or did not load: %s", module,
                 reinstall);
    return nullptr;
  }
  if (table->abi != kKernelAbi || table->table_size != sizeof(KernelTable) || table->view_size != sizeof(GroupView) ||
      table->args_size != sizeof(StepArgs)) {
    PyErr_Format(PyExc_ImportError, "nag_cuda: the kernels' library %s is of another build (kernel ABI %u, "
                 "nag_cuda._C expects %u): %s", module, table->abi, kKernelAbi, reinstall);
    return nullptr;
  }
  return table;
}

PyMethodDef methods[] = {
    {"_step", step, METH_VARARGS, "FusedNAG.step() for plain tensors: see csrc/step.h"},
    {"_state_cache", state_cache, METH_NOARGS, "A cache of one optimizer's state lookups for _step (or None)"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace
}  // namespace nag::step

// `import nag_cuda._C` loads this library, which registers the ops (nag_ops.cpp), defines _step and imports the
// kernels' libraries (nag_kernels.h) that the ops run.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nag::step::methods};
  const nag::KernelTable* cpu = nag::step::import_kernels("nag_cuda._kernels", NAG_TABLE_CAPSULE("nag_cuda._kernels"));
  if (cpu == nullptr) return nullptr;
#ifdef NAG_WITH_CUDA
  const nag::KernelTable* cuda =
      nag::step::import_kernels("nag_cuda._kernels_cuda", NAG_TABLE_CAPSULE("nag_cuda._kernels_cuda"));
  if (cuda == nullptr) return nullptr;
#else
  const nag::KernelTable* cuda = nullptr;
#endif
  nag::set_kernels(cpu, cuda);
  nag::step::Keys& k = nag::step::keys;
  const std::pair<PyObject**, const char*> names[] = {
      {&k.params, "params"}, {&k.lr, "lr"}, {&k.momentum, "momentum"}, {&k.weight_decay, "weight_decay"},
      {&k.maximize, "maximize"}, {&k.nesterov, "nesterov"}, {&k.dampening, "dampening"},
      {&k.differentiable, "differentiable"}, {&k.capturable, "capturable"}, {&k.momentum_dtype, "momentum_dtype"},
      {&k.master_weights, "master_weights"}, {&k.stochastic_rounding, "stochastic_rounding"},
      {&k.sr_seed, "sr_seed"}, {&k.sr_step, "sr_step"}, {&k.momentum_buffer, "momentum_buffer"},
      {&k.master_param, "master_param"}};
  for (const auto& [key, name] : names) {
    *key = PyUnicode_InternFromString(name);
    if (*key == nullptr) return nullptr;
  }
  k.zero = PyLong_FromLong(0);
  if (k.zero == nullptr) return nullptr;
  nag::step::add_dict_watcher();
  return PyModule_Create(&module);
}
