// Stage "read groups" (nag_cuda/_step.py: GroupRead): every param group's settings, as _rules.check_group(values=False)
// accepts them and GroupRead converts them. The only stage that runs Python code (a value's __float__ or __bool__):
// it runs before anything is gathered, and keeps C++ values and owned references only (see step.h).
#include <unordered_map>

#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "step.h"

namespace nag::step {
namespace {

struct SettingsHash {
  size_t operator()(const Settings& s) const {
    size_t h = std::hash<const void*>()(s.lr_tensor);
    for (double d : {s.lr, s.momentum, s.weight_decay}) h = h * 31 + std::hash<double>()(d == 0.0 ? 0.0 : d);
    h = h * 31 + (s.maximize ? 2 : 0) + (s.master ? 1 : 0) + static_cast<int>(s.momentum_dtype.value_or(at::kByte));
    return h * 31 + std::hash<int64_t>()(s.sr_seed.value_or(-1));
  }
};

// group[key] (borrowed), or null if absent. (A str key of an exact dict: no Python code runs.)
PyObject* get(PyObject* group, PyObject* key) {
  PyObject* value = PyDict_GetItemWithError(group, key);
  if (value == nullptr && PyErr_Occurred()) throw python_error();
  return value;
}

// bool(value), or -1 (no Python error left set) where that raises.
int truth(PyObject* value) {
  const int t = PyObject_IsTrue(value);
  if (t < 0) PyErr_Clear();
  return t;
}

// A hyperparameter as _rules.check_hyperparameters accepts it and GroupRead converts it: a number, or an object with
// __float__ (numpy scalars, 1-element real tensors), as float(value). False (no Python error left set) for anything
// else; `is_tensor` says whether it is a tensor, whose value is not checked at each step. read_tensor=false: a tensor
// is not read (an lr tensor, which the kernel reads on the device: no host synchronisation, and a step that a CUDA
// graph can capture).
bool number(PyObject* value, double& out, bool& is_tensor, bool read_tensor = true) {
  is_tensor = THPVariable_Check(value);
  if (is_tensor) {
    const at::Tensor& t = THPVariable_Unpack(value);
    if (t.numel() != 1 || t.is_complex()) return false;
    if (!read_tensor) return true;
  } else if (!PyFloat_Check(value) && !PyLong_Check(value) &&
             (Py_TYPE(value)->tp_as_number == nullptr || Py_TYPE(value)->tp_as_number->nb_float == nullptr)) {
    return false;
  }
  out = PyFloat_AsDouble(value);
  if (out == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

// One group; false for a value that the Python stages reject or that this reading does not know.
bool read_group(PyObject* group, Py_ssize_t index, bool scaled, bool clipped, GroupRead& out) {
  const Keys& k = keys;
  if (!PyDict_CheckExact(group)) return false;
  PyObject* params = get(group, k.params);
  PyObject* lr = get(group, k.lr);
  PyObject* momentum = get(group, k.momentum);
  PyObject* weight_decay = get(group, k.weight_decay);
  PyObject* maximize = get(group, k.maximize);
  PyObject* capturable = get(group, k.capturable);
  PyObject* momentum_dtype = get(group, k.momentum_dtype);
  PyObject* master = get(group, k.master_weights);
  PyObject* stochastic = get(group, k.stochastic_rounding);
  PyObject* nesterov = get(group, k.nesterov);
  PyObject* dampening = get(group, k.dampening);
  PyObject* differentiable = get(group, k.differentiable);
  for (PyObject* required : {params, lr, momentum, weight_decay, maximize, capturable, momentum_dtype, master,
                             stochastic}) {
    if (required == nullptr) return false;
  }
  if (!PyList_Check(params)) return false;  // (torch makes it a list; user code may have replaced it)
  // Owned from here: the conversions below may run Python code that changes the group.
  out.group = THPObjectPtr(Py_NewRef(group));
  const THPObjectPtr hold[] = {THPObjectPtr(Py_NewRef(lr)), THPObjectPtr(Py_NewRef(momentum)),
                               THPObjectPtr(Py_NewRef(weight_decay)), THPObjectPtr(Py_XNewRef(nesterov)),
                               THPObjectPtr(Py_XNewRef(dampening)), THPObjectPtr(Py_XNewRef(differentiable)),
                               THPObjectPtr(Py_NewRef(maximize)), THPObjectPtr(Py_NewRef(capturable)),
                               THPObjectPtr(Py_NewRef(momentum_dtype)), THPObjectPtr(Py_NewRef(master)),
                               THPObjectPtr(Py_NewRef(stochastic))};
  (void)hold;
  Settings& s = out.settings;
  bool lr_is_tensor, momentum_is_tensor, weight_decay_is_tensor;
  if (!number(lr, s.lr, lr_is_tensor, /*read_tensor=*/false) || !number(momentum, s.momentum, momentum_is_tensor) ||
      !number(weight_decay, s.weight_decay, weight_decay_is_tensor)) {
    return false;
  }
  if (lr_is_tensor) {
    out.lr = THPVariable_Unpack(lr);
    out.lr_object = THPObjectPtr(Py_NewRef(lr));
    s.lr_tensor = lr;
  }
  // (as check_hyperparameters compares them: NaN passes)
  if ((!lr_is_tensor && s.lr < 0.0) || (!momentum_is_tensor && s.momentum <= 0.0) ||
      (!weight_decay_is_tensor && s.weight_decay < 0.0)) {
    return false;
  }
  if (nesterov != nullptr && truth(nesterov) != 1) return false;
  if (dampening != nullptr) {
    const int nonzero = PyObject_RichCompareBool(dampening, k.zero, Py_NE);
    if (nonzero != 0) {
      if (nonzero < 0) PyErr_Clear();
      return false;
    }
  }
  if (differentiable != nullptr && truth(differentiable) != 0) return false;
  const int maximize_t = truth(maximize), capturable_t = truth(capturable), master_t = truth(master);
  const int stochastic_t = truth(stochastic);
  if (maximize_t < 0 || capturable_t < 0 || master_t < 0 || stochastic_t < 0) return false;
  if (capturable_t == 1 && (momentum_is_tensor || weight_decay_is_tensor)) return false;
  if (stochastic_t == 1 && (capturable_t == 1 || master_t == 1)) return false;  // (_rules.check_modes raises)
  s.maximize = maximize_t == 1;
  s.master = master_t == 1;
  out.may_skip = scaled || clipped || capturable_t == 1;
  if (momentum_dtype != Py_None && !THPDtype_Check(momentum_dtype)) return false;
  s.momentum_dtype = momentum_dtype == Py_None
                         ? std::nullopt
                         : std::optional(reinterpret_cast<THPDtype*>(momentum_dtype)->scalar_type);
  if (stochastic_t == 1) {  // a different key for every step and group, hashed by the kernels (as GroupRead makes it)
    PyObject* seed = get(group, k.sr_seed);
    PyObject* step = get(group, k.sr_step);
    // (a seed of None: turned on after the group was added, and drawn by the Python stages)
    if (seed == nullptr || step == nullptr || !PyLong_CheckExact(seed) || !PyLong_CheckExact(step)) return false;
    // (sr_seed + sr_step * C1 + index * C2) % 2**63, exactly: arithmetic modulo 2**64 keeps the low 63 bits
    const uint64_t key = PyLong_AsUnsignedLongLongMask(seed) +
                         PyLong_AsUnsignedLongLongMask(step) * 0x9E3779B97F4A7C15ull +
                         static_cast<uint64_t>(index) * 0xD1B54A32D192ED03ull;
    if (PyErr_Occurred()) throw python_error();
    s.sr_seed = static_cast<int64_t>(key & ((uint64_t{1} << 63) - 1));
  }
  return true;
}

}  // namespace

bool read_groups(PyObject* groups, bool scaled, bool clipped, std::vector<GroupRead>& out) {
  if (!PyList_Check(groups)) return false;  // (torch makes it a list)
  const THPObjectPtr hold(Py_NewRef(groups));  // (the groups' own Python code may replace it)
  std::unordered_map<Settings, long, SettingsHash> indices;
  out.clear();
  for (Py_ssize_t g = 0; g < PyList_GET_SIZE(groups); ++g) {
    THPObjectPtr group(Py_NewRef(PyList_GET_ITEM(groups, g)));
    GroupRead& read = out.emplace_back();
    if (!read_group(group.get(), g, scaled, clipped, read)) return false;
    // (consecutive groups often share their settings)
    const bool as_last = out.size() > 1 && out[out.size() - 2].settings == read.settings;
    read.settings_index = as_last ? out[out.size() - 2].settings_index
                                  : indices.try_emplace(read.settings, static_cast<long>(indices.size())).first->second;
  }
  return true;
}

}  // namespace nag::step
