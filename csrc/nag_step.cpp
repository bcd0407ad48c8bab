// The host side of FusedNAG.step() for plain tensors, as one C++ call for every param group of a step: it reads each
// param's grad and state (momentum buffer, master weights) from the Python objects, with no Python code per tensor,
// and calls the op nag_cuda::nag_step_ through the dispatcher (autograd's checks and version counters included), once
// per (device, settings). Grads, tensors and param groups are read afresh each time, as torch's own loop reads them;
// only the lookups in opt.state are reused from the last step, and only while dict version tags say that they still
// hold (StateCache), so whatever user code changes between steps is seen.
#include <Python.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <unordered_map>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/utils/object_ptr.h>

#include "nag_ops.h"

namespace nag {
namespace {

// Tensor handles that borrow rather than own: the Python objects (params, their grads, opt.state) or new_state own
// these tensors, and nothing can drop them while this call holds the GIL. A borrow costs no reference count, where a
// copy of a tensor that Python owns costs two calls into the interpreter (see c10/util/intrusive_ptr.h).
class Borrowed {
 public:
  Borrowed() = default;
  Borrowed(Borrowed&&) = default;
  Borrowed(const Borrowed&) = delete;
  ~Borrowed() {
    for (at::Tensor& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }
  void add(const at::Tensor& t) { tensors_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(t)); }
  void reserve(size_t n) { tensors_.reserve(n); }
  bool empty() const { return tensors_.empty(); }
  size_t size() const { return tensors_.size(); }
  at::TensorList list() const { return tensors_; }

 private:
  std::vector<at::Tensor> tensors_;
};

// One op call: the params of one or more groups with the same settings, on one device.
struct Call {
  c10::Device device{c10::kCPU};
  std::optional<at::Tensor> lr_tensor;  // else lr
  double lr = 0.0, momentum = 0.0, weight_decay = 0.0;
  bool maximize = false;
  std::optional<int64_t> sr_seed;
  std::optional<at::Tensor> grad_coef;  // max_grad_norm
  Borrowed params, grads, bufs, masters;
  c10::List<bool> first;
  int64_t numel = 0;
};

// Steps that update at least this many elements run the op without the GIL, as torch's own ops do, so that other
// Python threads run meanwhile; smaller ones keep it, which lets them borrow (above).
constexpr int64_t kReleaseGilNumel = int64_t{1} << 20;

// State made by this step (a new momentum buffer or master copy): stored in opt.state once every call has run.
struct NewState {
  THPObjectPtr param;
  PyObject* key;  // an interned string, immortal for this purpose
  at::Tensor value;
};

PyObject* momentum_buffer_key = nullptr;
PyObject* master_param_key = nullptr;

// The param-group keys that _step reads, interned once (see read_group).
struct GroupKeys {
  PyObject *params, *lr, *momentum, *weight_decay, *maximize, *nesterov, *dampening, *differentiable, *capturable,
      *momentum_dtype, *master_weights, *stochastic_rounding, *sr_seed, *sr_step;
} group_keys;
PyObject* zero = nullptr;  // the int 0

// opt.state[param] (borrowed), or nullptr if absent. `id_hash`: hash(param) is id(param), as Tensor.__hash__ defines
// it, so the lookup needs no call into Python (CPython's private known-hash lookup, public up to 3.12).
PyObject* state_of(PyObject* state, PyObject* param, bool id_hash) {
  PyObject* st;
#if PY_VERSION_HEX < 0x030D0000
  if (id_hash) {
    st = _PyDict_GetItem_KnownHash(state, param, reinterpret_cast<Py_hash_t>(param));
  } else {
    st = PyDict_GetItemWithError(state, param);
  }
#else
  (void)id_hash;
  st = PyDict_GetItemWithError(state, param);
#endif
  if (st == nullptr && PyErr_Occurred()) throw python_error();
  return st;
}

// state[key] of one param (borrowed), or null if the param has no state or the key is absent.
PyObject* state_item(PyObject* st, PyObject* key) {
  if (st == nullptr) return nullptr;
  PyObject* value = PyDict_GetItemWithError(st, key);
  if (value == nullptr && PyErr_Occurred()) throw python_error();
  return value;
}

// A state value as a tensor: false if it is there but not a plain tensor (a DTensor, a subclass, something else),
// which the Python path handles; else true, with `out` pointing to the tensor (owned by its Python object), or null
// if the value is absent (null) or None.
bool state_tensor(PyObject* value, const at::Tensor*& out) {
  out = nullptr;
  if (value == nullptr || value == Py_None) return true;
  if (!THPVariable_CheckExact(value)) return false;
  out = &THPVariable_Unpack(value);
  return true;
}

// Python's dict version tags (PEP 509; removed in 3.14): a dict's tag changes whenever the dict is modified, and no
// two dicts share one. They let a step skip its lookups in opt.state where last step's results still hold.
#if PY_VERSION_HEX < 0x030E0000 && !defined(Py_GIL_DISABLED)
#define NAG_DICT_VERSIONS 1
uint64_t version_of(PyObject* dict) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"  // (3.12 and 3.13 deprecate the field, and keep it)
  return reinterpret_cast<PyDictObject*>(dict)->ma_version_tag;
#pragma GCC diagnostic pop
}
#endif

// What the last step found in opt.state for each param, in the order of the groups' lists: the param's state dict
// and in it the momentum buffer and master weights (each null where absent). An entry holds while opt.state is the
// same dict with the same version tag (no state added, removed or replaced) and the state dict has its version tag
// of then (its buffer not replaced or deleted): the entries' objects are then still owned by opt.state. Tensors are
// still read through their Python objects at every step, so whatever changes a tensor itself is seen as before.
struct StateCache {
  struct Entry {
    PyObject* param = nullptr;
    PyObject* state = nullptr;  // opt.state[param]
    uint64_t version = 0;       // its version tag
    PyObject* buf = nullptr;
    PyObject* master = nullptr;
  };
  // opt.state when the entries were checked, and its version tag then: only compared, never read (the cache does
  // not keep an old opt.state and its buffers alive); a new dict at the same address has another tag. null: no
  // entry holds.
  PyObject* state = nullptr;
  uint64_t version = 0;
  std::vector<Entry> entries;
};

void delete_cache(PyObject* capsule) {
  delete static_cast<StateCache*>(PyCapsule_GetPointer(capsule, "nag_cuda.StateCache"));
}

// What decides a param group's op call (FusedNAG._groups' `settings`): groups with equal settings share one call per
// device, so that many groups with the same hyperparameters cost one call.
struct Settings {
  PyObject* lr_tensor = nullptr;  // a tensor lr, compared by identity (the kernel reads it); else `lr`
  double lr = 0.0, momentum = 0.0, weight_decay = 0.0;
  bool maximize = false, master = false;
  std::optional<int64_t> sr_seed;
  bool operator==(const Settings& o) const {
    return lr_tensor == o.lr_tensor && lr == o.lr && momentum == o.momentum && weight_decay == o.weight_decay &&
           maximize == o.maximize && master == o.master && sr_seed == o.sr_seed;
  }
};
struct SettingsHash {
  size_t operator()(const Settings& s) const {
    size_t h = std::hash<const void*>()(s.lr_tensor);
    for (double d : {s.lr, s.momentum, s.weight_decay}) h = h * 31 + std::hash<double>()(d == 0.0 ? 0.0 : d);
    return h * 31 + (s.maximize ? 2 : 0) + (s.master ? 1 : 0) + std::hash<int64_t>()(s.sr_seed.value_or(-1));
  }
};

// One param group as the step reads it.
struct GroupSpec {
  PyObject* params = nullptr;  // its list
  Settings settings;
  std::optional<at::ScalarType> momentum_dtype;
  bool may_skip = false;  // as in FusedNAG._gather: GradScaler may skip the step, or it may be captured and replayed
};

// group[key] (borrowed), or null if absent.
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

// A hyperparameter as FusedNAG._check_hyperparameters accepts it and _groups converts it: a number, or an object
// with __float__ (numpy scalars, 1-element real tensors), as float(value). False (no Python error left set) for
// anything else; `is_tensor` says whether it is a tensor, whose value is not checked at each step. read_tensor=false:
// a tensor is not read (an lr tensor, which the kernel reads on the device: no host synchronisation, and a step that
// a CUDA graph can capture).
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

// Reads param group `index` as FusedNAG._groups and _check_group(values=False) do, for the values they accept. Returns
// false, with nothing changed and no Python error set, for a value that they reject or that this reading does not
// know: the Python path then takes the step, or raises its own error.
bool read_group(PyObject* group, Py_ssize_t index, bool scaled, GroupSpec& out) {
  const GroupKeys& k = group_keys;
  out = GroupSpec();
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
  for (PyObject* required : {params, lr, momentum, weight_decay, maximize, capturable, momentum_dtype, master,
                             stochastic}) {
    if (required == nullptr) return false;
  }
  if (!PyList_Check(params)) return false;  // (torch makes it a list; user code may have replaced it)
  out.params = params;
  Settings& s = out.settings;
  bool lr_is_tensor, momentum_is_tensor, weight_decay_is_tensor;
  if (!number(lr, s.lr, lr_is_tensor, /*read_tensor=*/false) || !number(momentum, s.momentum, momentum_is_tensor) ||
      !number(weight_decay, s.weight_decay, weight_decay_is_tensor)) {
    return false;
  }
  s.lr_tensor = lr_is_tensor ? lr : nullptr;
  // (as _check_hyperparameters compares them: NaN passes)
  if ((!lr_is_tensor && s.lr < 0.0) || (!momentum_is_tensor && s.momentum <= 0.0) ||
      (!weight_decay_is_tensor && s.weight_decay < 0.0)) {
    return false;
  }
  PyObject* nesterov = get(group, k.nesterov);
  PyObject* dampening = get(group, k.dampening);
  PyObject* differentiable = get(group, k.differentiable);
  if (nesterov != nullptr && truth(nesterov) != 1) return false;
  if (dampening != nullptr) {
    const int nonzero = PyObject_RichCompareBool(dampening, zero, Py_NE);
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
  s.maximize = maximize_t == 1;
  s.master = master_t == 1;
  out.may_skip = scaled || capturable_t == 1;
  if (momentum_dtype != Py_None && !THPDtype_Check(momentum_dtype)) return false;
  out.momentum_dtype = momentum_dtype == Py_None
                           ? std::nullopt
                           : std::optional(reinterpret_cast<THPDtype*>(momentum_dtype)->scalar_type);
  if (stochastic_t == 1) {  // a different key for every step and group, hashed by the kernels (as _groups makes it)
    PyObject* seed = get(group, k.sr_seed);
    PyObject* step = get(group, k.sr_step);
    if (seed == nullptr || step == nullptr || !PyLong_Check(seed) || !PyLong_Check(step)) return false;
    // (sr_seed + sr_step * C1 + index * C2) % 2**63, exactly: arithmetic modulo 2**64 keeps the low 63 bits
    const uint64_t key = PyLong_AsUnsignedLongLongMask(seed) +
                         PyLong_AsUnsignedLongLongMask(step) * 0x9E3779B97F4A7C15ull +
                         static_cast<uint64_t>(index) * 0xD1B54A32D192ED03ull;
    if (PyErr_Occurred()) throw python_error();
    s.sr_seed = static_cast<int64_t>(key & ((uint64_t{1} << 63) - 1));
  }
  return true;
}

std::optional<at::Tensor> on(const std::optional<at::Tensor>& t, c10::Device device) {
  if (!t.has_value() || t->device() == device) return t;
  return t->to(device, /*non_blocking=*/true);
}

std::optional<at::Tensor> optional_tensor(PyObject* obj) {
  if (obj == Py_None) return std::nullopt;
  TORCH_CHECK(THPVariable_Check(obj), "nag_cuda._C._step: expected a tensor or None");
  return THPVariable_Unpack(obj);
}

// One op call, through the dispatcher (autograd's checks and version counters included). owned: the call's tensors
// as owned handles, for a call without the GIL (else its borrowed ones).
void run(const Call& c, const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
         const std::vector<at::Tensor>* owned = nullptr) {
  auto list = [&](const Borrowed& borrowed, int k) {
    return owned != nullptr ? at::TensorList(owned[k]) : borrowed.list();
  };
  const std::optional<at::TensorList> masters =
      c.masters.empty() ? std::nullopt : std::optional<at::TensorList>(list(c.masters, 3));
  if (c.lr_tensor.has_value()) {
    step_op<const at::Tensor&>().call(list(c.params, 0), list(c.grads, 1), list(c.bufs, 2), c.first, *c.lr_tensor,
                                      c.momentum, c.weight_decay, c.maximize, on(grad_scale, c.device),
                                      on(found_inf, c.device), masters, c.sr_seed, c.grad_coef);
  } else {
    step_op<double>().call(list(c.params, 0), list(c.grads, 1), list(c.bufs, 2), c.first, c.lr, c.momentum,
                           c.weight_decay, c.maximize, on(grad_scale, c.device), on(found_inf, c.device), masters,
                           c.sr_seed, c.grad_coef);
  }
}

struct NoGil {
  PyThreadState* saved = PyEval_SaveThread();
  ~NoGil() { PyEval_RestoreThread(saved); }
};

// max_grad_norm: the norm of every grad of the step's calls (one partial result per device, as FusedNAG's Python
// path reduces them, summed on the first call's device), and each call's clip coefficient on its device. Returns
// the norm.
at::Tensor clip_calls(std::vector<Call>& calls, const std::optional<at::Tensor>& grad_scale, double max_norm,
                      double norm_type) {
  std::vector<std::pair<c10::Device, Borrowed>> by_device;
  for (const Call& c : calls) {
    auto it = std::find_if(by_device.begin(), by_device.end(), [&](const auto& d) { return d.first == c.device; });
    Borrowed& grads = it != by_device.end() ? it->second : by_device.emplace_back(c.device, Borrowed()).second;
    for (const at::Tensor& grad : c.grads.list()) grads.add(grad);
  }
  at::Tensor total;
  for (const auto& [device, grads] : by_device) {
    at::Tensor part = grad_norm_partial(grads.list(), norm_type, on(grad_scale, device));
    if (!total.defined()) {
      total = part;
      continue;
    }
    part = part.to(total.device(), /*non_blocking=*/true);
    total = std::isinf(norm_type) ? at::maximum(total, part) : total.add(part);
  }
  if (!total.defined()) total = at::zeros({}, at::kFloat);  // no grads: clip_grad_norm_ returns 0 too
  auto [norm, coef] = clip_coef(total, max_norm, norm_type);
  for (Call& c : calls) c.grad_coef = on(coef, c.device);
  return norm;
}

// _step(param_groups, state, grad_scale, found_inf, cache=None, clip=None) -> True, or the norm. Groups with equal
// settings share op calls. cache: the optimizer's StateCache (from _state_cache()), or None to look everything up.
// clip: (max_grad_norm, norm_type) to clip the grads by their global norm, which is then returned instead of True; or
// None.
// Returns False, having changed nothing, where a param group holds a value that read_group leaves to Python, a
// tensor is not a plain strided Tensor or Parameter (DTensor, other subclasses, sparse grads) or a state entry is not
// a dict: FusedNAG's Python path handles those (and raises on bad ones). Raises, having changed nothing, on bad
// tensors.
PyObject* step(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *groups, *state, *grad_scale_obj, *found_inf_obj, *cache_obj = Py_None, *clip_obj = Py_None;
  if (!PyArg_ParseTuple(args, "OO!OO|OO", &groups, &PyDict_Type, &state, &grad_scale_obj, &found_inf_obj, &cache_obj,
                        &clip_obj)) {
    return nullptr;
  }
  if (!PyList_Check(groups)) Py_RETURN_FALSE;  // (torch makes it a list)
  double max_norm = 0.0, norm_type = 2.0;
  if (clip_obj != Py_None && !PyArg_ParseTuple(clip_obj, "dd", &max_norm, &norm_type)) return nullptr;
  StateCache* cache = nullptr;
  bool known = false;  // the cache's entries hold for opt.state as it is (see StateCache)
#ifdef NAG_DICT_VERSIONS
  const uint64_t state_version = version_of(state);
  if (cache_obj != Py_None) {
    cache = static_cast<StateCache*>(PyCapsule_GetPointer(cache_obj, "nag_cuda.StateCache"));
    if (cache == nullptr) return nullptr;
    known = cache->state == state && cache->version == state_version;
    cache->state = nullptr;  // until every entry has been checked (a return or exception midway leaves none)
  }
#endif
  size_t position = 0;  // of the param in the groups' lists, its entry's index
  const std::optional<at::Tensor> grad_scale = optional_tensor(grad_scale_obj);
  const std::optional<at::Tensor> found_inf = optional_tensor(found_inf_obj);
  std::vector<NewState> new_state;
  std::vector<Call> calls;
  std::unordered_map<int64_t, size_t> call_of;  // (settings key, device) -> index in calls
  int64_t last_key = -1;
  size_t last_call = 0;
  int id_hash = -1;  // unknown until the first param: whether hash(p) == id(p)

  std::unordered_map<Settings, long, SettingsHash> keys;  // settings -> their index
  GroupSpec spec;
  Settings last_settings;
  long key = -1;
  for (Py_ssize_t g = 0; g < PyList_GET_SIZE(groups); ++g) {
    if (!read_group(PyList_GET_ITEM(groups, g), g, found_inf_obj != Py_None, spec)) Py_RETURN_FALSE;
    const Settings& settings = spec.settings;
    if (key < 0 || !(settings == last_settings)) {  // (consecutive groups often share them)
      key = keys.try_emplace(settings, static_cast<long>(keys.size())).first->second;
      last_settings = settings;
    }
    PyObject* params = spec.params;
    const bool master = settings.master;

    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) {
      PyObject* obj = PyList_GET_ITEM(params, i);
      if (!THPVariable_CheckExact(obj)) Py_RETURN_FALSE;
      const at::Tensor& p = THPVariable_Unpack(obj);
      // (read from the AutogradMeta, which autograd's own code does too: Tensor::grad() takes two calls to get there
      // and asks whether p is a leaf, for a warning when it is not and has no grad, which the call below still gives)
      const auto* meta = torch::autograd::impl::get_autograd_meta(p);
      const at::Tensor& grad = meta != nullptr && meta->grad_.defined() ? meta->grad_ : p.grad();
      StateCache::Entry* entry = nullptr;
      if (cache != nullptr) {
        if (position == cache->entries.size()) cache->entries.emplace_back();
        entry = &cache->entries[position];
      }
      ++position;
      if (!grad.defined()) {
        if (entry != nullptr && !known) entry->param = nullptr;  // (not looked up: it holds for no version)
        continue;
      }
      if (grad.layout() != at::kStrided) Py_RETURN_FALSE;
      PyObject *st, *buf_obj, *master_obj;
#ifdef NAG_DICT_VERSIONS
      if (entry != nullptr && known && entry->param == obj &&
          (entry->state == nullptr || version_of(entry->state) == entry->version)) {
        st = entry->state;
        buf_obj = entry->buf;
        master_obj = entry->master;
      } else
#endif
      {
        if (id_hash < 0) {
          const Py_hash_t h = PyObject_Hash(obj);
          if (h == -1) return nullptr;
          id_hash = h == reinterpret_cast<Py_hash_t>(obj);
        }
        st = state_of(state, obj, id_hash == 1);
        if (st != nullptr && !PyDict_CheckExact(st)) Py_RETURN_FALSE;
        buf_obj = state_item(st, momentum_buffer_key);
        master_obj = state_item(st, master_param_key);
#ifdef NAG_DICT_VERSIONS
        if (entry != nullptr) *entry = {obj, st, st != nullptr ? version_of(st) : 0, buf_obj, master_obj};
#endif
      }
      const at::Tensor *buf, *master_param = nullptr;
      if (!state_tensor(buf_obj, buf)) Py_RETURN_FALSE;
      if (master && !state_tensor(master_obj, master_param)) Py_RETURN_FALSE;

      const c10::Device device = p.device();
#ifdef NAG_WITH_CUDA
      if (!device.is_cpu() && !device.is_cuda()) Py_RETURN_FALSE;  // the Python path's reference implementation
#else
      if (!device.is_cpu()) Py_RETURN_FALSE;
#endif
      const int64_t call_key = (static_cast<int64_t>(key) << 16) | (static_cast<int64_t>(device.type()) << 8) |
                               static_cast<uint8_t>(device.index());
      if (call_key != last_key) {  // (most params of a group share the call of the param before)
        auto [it, added] = call_of.try_emplace(call_key, calls.size());
        if (added) {
          Call& call = calls.emplace_back();
          call.device = device;
          if (settings.lr_tensor != nullptr) call.lr_tensor = on(THPVariable_Unpack(settings.lr_tensor), device);
          call.lr = settings.lr;
          call.momentum = settings.momentum;
          call.weight_decay = settings.weight_decay;
          call.maximize = settings.maximize;
          call.sr_seed = settings.sr_seed;
          const size_t rest = PyList_GET_SIZE(params) - i;  // (room for the rest of the group: no regrowth)
          for (Borrowed* list : {&call.params, &call.grads, &call.bufs}) list->reserve(rest);
          if (master) call.masters.reserve(rest);
          call.first.reserve(rest);
        }
        last_key = call_key;
        last_call = it->second;
      }
      Call& call = calls[last_call];
      // As FusedNAG._gather: a new buffer is -0.0 and stepped as not-first where the step may be skipped on the
      // device (GradScaler) or replayed (capturable); else it is written by the first step.
      call.first.push_back(buf == nullptr && !spec.may_skip);
      if (buf == nullptr) {
        const at::ScalarType dtype = spec.momentum_dtype.value_or(master ? at::kFloat : p.scalar_type());
        at::Tensor made = at::empty_like(p, p.options().dtype(dtype), at::MemoryFormat::Preserve);
        if (spec.may_skip) {
          made.fill_(p.is_complex() ? c10::Scalar(c10::complex<double>(-0.0, -0.0)) : c10::Scalar(-0.0));
        }
        new_state.push_back({THPObjectPtr(Py_NewRef(obj)), momentum_buffer_key, std::move(made)});
        buf = &new_state.back().value;  // (read at once, before new_state grows again)
      }
      call.params.add(p);
      call.grads.add(grad);
      call.bufs.add(*buf);
      if (master) {
        if (master_param == nullptr) {
          at::Tensor made = p.detach().to(at::kFloat, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Preserve);
          new_state.push_back({THPObjectPtr(Py_NewRef(obj)), master_param_key, std::move(made)});
          master_param = &new_state.back().value;
        }
        call.masters.add(*master_param);
      }
      call.numel += p.numel();
    }
  }

#ifdef NAG_DICT_VERSIONS
  if (cache != nullptr) {  // every param's entry checked or made for this version of opt.state
    cache->entries.resize(position);
    cache->state = state;
    cache->version = state_version;
  }
#endif

  // Every call is checked before the first one writes (the first checks itself), so bad input changes nothing.
  int64_t numel = 0;
  for (size_t i = 0; i < calls.size(); ++i) {
    const Call& c = calls[i];
    numel += c.numel;
    if (i > 0) {
      check_step(c.params.list(), c.grads.list(), c.bufs.list(), c.first, c.lr_tensor, on(grad_scale, c.device),
                 on(found_inf, c.device), c.masters.empty() ? std::nullopt : std::optional(c.masters.list()),
                 c.sr_seed.has_value(), std::nullopt);
    }
  }
  at::Tensor norm;
  if (clip_obj != Py_None) norm = clip_calls(calls, grad_scale, max_norm, norm_type);
  for (const Call& c : calls) {
    if (numel < kReleaseGilNumel) {
      run(c, grad_scale, found_inf);
      continue;
    }
    // Owned handles, released after the GIL is taken back (they are declared before the guard).
    std::vector<at::Tensor> owned[4];
    const Borrowed* lists[4] = {&c.params, &c.grads, &c.bufs, &c.masters};
    for (int k = 0; k < 4; ++k) owned[k].assign(lists[k]->list().begin(), lists[k]->list().end());
    const NoGil no_gil;
    run(c, grad_scale, found_inf, owned);
  }

  // New state becomes state only once the kernels have written it (as in FusedNAG._step).
  for (NewState& s : new_state) {
    PyObject* st = state_of(state, s.param.get(), id_hash == 1);
    THPObjectPtr made;
    if (st == nullptr) {
      made = PyDict_New();
      if (!made || PyObject_SetItem(state, s.param.get(), made.get()) < 0) return nullptr;
      st = made.get();
    }
    THPObjectPtr value(THPVariable_Wrap(std::move(s.value)));
    if (!value || PyDict_SetItem(st, s.key, value.get()) < 0) return nullptr;
  }
  if (norm.defined()) return THPVariable_Wrap(std::move(norm));
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// _state_cache() -> an empty StateCache, for one optimizer's steps (FusedNAG._state_cache).
PyObject* state_cache(PyObject* /*module*/, PyObject* /*args*/) {
  HANDLE_TH_ERRORS
  auto* cache = new StateCache();
  PyObject* capsule = PyCapsule_New(cache, "nag_cuda.StateCache", delete_cache);
  if (capsule == nullptr) delete cache;
  return capsule;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"_step", step, METH_VARARGS, "FusedNAG.step() for plain tensors: see csrc/nag_step.cpp"},
    {"_state_cache", state_cache, METH_NOARGS, "An empty cache of opt.state lookups for _step"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace
}  // namespace nag

// `import nag_cuda._C` loads this library, which registers the ops (nag_ops.cpp) and defines _step.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nag::methods};
  nag::momentum_buffer_key = PyUnicode_InternFromString("momentum_buffer");
  nag::master_param_key = PyUnicode_InternFromString("master_param");
  if (nag::momentum_buffer_key == nullptr || nag::master_param_key == nullptr) return nullptr;
  nag::GroupKeys& k = nag::group_keys;
  const std::pair<PyObject**, const char*> keys[] = {
      {&k.params, "params"}, {&k.lr, "lr"}, {&k.momentum, "momentum"}, {&k.weight_decay, "weight_decay"},
      {&k.maximize, "maximize"}, {&k.nesterov, "nesterov"}, {&k.dampening, "dampening"},
      {&k.differentiable, "differentiable"}, {&k.capturable, "capturable"}, {&k.momentum_dtype, "momentum_dtype"},
      {&k.master_weights, "master_weights"}, {&k.stochastic_rounding, "stochastic_rounding"},
      {&k.sr_seed, "sr_seed"}, {&k.sr_step, "sr_step"}};
  for (const auto& [key, name] : keys) {
    *key = PyUnicode_InternFromString(name);
    if (*key == nullptr) return nullptr;
  }
  nag::zero = PyLong_FromLong(0);
  if (nag::zero == nullptr) return nullptr;
  return PyModule_Create(&module);
}
