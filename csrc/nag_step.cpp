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

// _step(specs, state, grad_scale, found_inf, cache=None, clip=None) -> True, or the norm. specs: one tuple per param
// group, (params, key, lr, momentum, weight_decay, maximize, momentum_dtype, master_weights, may_skip, sr_seed);
// groups with equal keys share op calls. cache: the optimizer's StateCache (from _state_cache()), or None to look
// everything up. clip: (max_grad_norm, norm_type) to clip the grads by their global norm, which is then returned
// instead of True; or None.
// Returns False, having changed nothing, where a tensor is not a plain strided Tensor or Parameter (DTensor, other
// subclasses, sparse grads) or a state entry is not a dict: FusedNAG's Python path handles those. Raises, having
// changed nothing, on bad input.
PyObject* step(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *specs, *state, *grad_scale_obj, *found_inf_obj, *cache_obj = Py_None, *clip_obj = Py_None;
  if (!PyArg_ParseTuple(args, "O!O!OO|OO", &PyList_Type, &specs, &PyDict_Type, &state, &grad_scale_obj,
                        &found_inf_obj, &cache_obj, &clip_obj)) {
    return nullptr;
  }
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

  for (Py_ssize_t g = 0; g < PyList_GET_SIZE(specs); ++g) {
    PyObject *params, *lr_obj, *momentum_dtype_obj, *sr_seed_obj;
    long key;
    double momentum, weight_decay;
    int maximize, master, may_skip;
    if (!PyArg_ParseTuple(PyList_GET_ITEM(specs, g), "OlOddpOppO", &params, &key, &lr_obj, &momentum, &weight_decay,
                          &maximize, &momentum_dtype_obj, &master, &may_skip, &sr_seed_obj)) {
      return nullptr;
    }
    if (!PyList_Check(params)) Py_RETURN_FALSE;  // (torch makes it a list; user code may have replaced it)
    const bool tensor_lr = THPVariable_Check(lr_obj);
    const double lr = tensor_lr ? 0.0 : PyFloat_AsDouble(lr_obj);
    if (!tensor_lr && PyErr_Occurred()) return nullptr;
    std::optional<int64_t> sr_seed;
    if (sr_seed_obj != Py_None) {
      sr_seed = PyLong_AsLongLong(sr_seed_obj);
      if (PyErr_Occurred()) return nullptr;
    }
    if (momentum_dtype_obj != Py_None && !THPDtype_Check(momentum_dtype_obj)) Py_RETURN_FALSE;
    const std::optional<at::ScalarType> momentum_dtype =
        momentum_dtype_obj == Py_None ? std::nullopt
                                      : std::optional(reinterpret_cast<THPDtype*>(momentum_dtype_obj)->scalar_type);

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
          if (tensor_lr) call.lr_tensor = on(THPVariable_Unpack(lr_obj), device);
          call.lr = lr;
          call.momentum = momentum;
          call.weight_decay = weight_decay;
          call.maximize = maximize;
          call.sr_seed = sr_seed;
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
      call.first.push_back(buf == nullptr && !may_skip);
      if (buf == nullptr) {
        const at::ScalarType dtype = momentum_dtype.value_or(master ? at::kFloat : p.scalar_type());
        at::Tensor made = at::empty_like(p, p.options().dtype(dtype), at::MemoryFormat::Preserve);
        if (may_skip) {
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
  return PyModule_Create(&module);
}
