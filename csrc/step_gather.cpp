// Stage "gather" (nag_cuda/_step.py: gather): each param that has a grad, with its state, into one op call per
// (device, settings); new state allocated. No Python code runs here (see step.h), so the tensors are borrowed.
#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <unordered_set>

#include <ATen/ops/empty_like.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include "step.h"

namespace nag::step {
namespace {

// opt.state[param] for the params in the order of the groups, without hashing them (Tensor.__hash__ is Python code):
// the entries are walked in their insertion order with PyDict_Next, which is the order of the params wherever the
// state was made by steps or by load_state_dict, and matched to each param by identity. Where that order breaks (a
// param whose grad came late, params reordered), a table of the whole dict by identity serves the rest of the step.
// Each entry is taken at most once, so a param listed twice is seen (duplicate()).
class StateWalk {
 public:
  explicit StateWalk(PyObject* state) : state_(state) {}

  // opt.state[param] (borrowed), or null if absent. duplicate() says whether it was taken already.
  PyObject* find(PyObject* param) {
    if (slots_.empty()) {
      Py_ssize_t pos = pos_;
      PyObject *key, *value;
      if (!PyDict_Next(state_, &pos, &key, &value)) {
        if (pos_ == 0) return nullptr;  // (an empty dict)
      } else if (key == param) {
        pos_ = pos;
        return value;
      }
      index_all();  // (also at the end of the entries: the param may be one listed twice, whose entry is taken)
    }
    for (size_t i = slot(param);; i = (i + 1) & mask_) {
      Entry& e = slots_[i];
      if (e.key == nullptr) return nullptr;
      if (e.key == param) {
        duplicate_ = e.taken;
        e.taken = true;
        return e.state;
      }
    }
  }
  // A param without a grad: passed over, and its entry with it where it is next.
  void pass(PyObject* param) {
    if (!slots_.empty()) return;
    Py_ssize_t pos = pos_;
    PyObject *key, *value;
    if (PyDict_Next(state_, &pos, &key, &value) && key == param) pos_ = pos;
  }
  bool duplicate() const { return duplicate_; }

 private:
  struct Entry {
    PyObject* key = nullptr;
    PyObject* state = nullptr;
    bool taken = false;
  };
  size_t slot(PyObject* key) const {  // (Fibonacci hashing of the address, whose low 4 bits are alignment)
    return static_cast<size_t>((reinterpret_cast<uintptr_t>(key) >> 4) * 0x9E3779B97F4A7C15ull >> shift_);
  }
  // An open-addressing table of every entry, at most half full. The entries before the walk's position are taken
  // (or passed over with their param, which has no grad and so is not looked for).
  void index_all() {
    int bits = 4;
    while ((size_t{1} << bits) < 2 * static_cast<size_t>(PyDict_Size(state_))) ++bits;
    slots_.assign(size_t{1} << bits, Entry());
    mask_ = slots_.size() - 1;
    shift_ = 64 - bits;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(state_, &pos, &key, &value)) {
      size_t i = slot(key);
      while (slots_[i].key != nullptr) i = (i + 1) & mask_;
      slots_[i] = Entry{key, value, pos <= pos_};
    }
  }
  PyObject* state_;
  Py_ssize_t pos_ = 0;  // the walk's position
  std::vector<Entry> slots_;
  size_t mask_ = 0;
  int shift_ = 0;
  bool duplicate_ = false;
};

// The momentum buffer and master of one param's state dict (borrowed), each null where absent; false (not mine) for a
// dict that is not a plain dict of str keys. Read with PyDict_Next, whose identity compares run no Python code, as a
// lookup could (a key's __eq__); it stops once it has found what the step needs (a buffer, or both).
bool state_items(PyObject* st, bool master, PyObject*& buf, PyObject*& master_param) {
  buf = master_param = nullptr;
  if (st == nullptr) return true;
  if (!PyDict_CheckExact(st)) return false;
  Py_ssize_t pos = 0;
  PyObject *key, *value;
  while ((buf == nullptr || (master && master_param == nullptr)) && PyDict_Next(st, &pos, &key, &value)) {
    if (key == keys.momentum_buffer || key == keys.master_param) {
      (key == keys.momentum_buffer ? buf : master_param) = value;
    } else if (!PyUnicode_CheckExact(key)) {
      return false;
    } else if (PyUnicode_Compare(key, keys.momentum_buffer) == 0) {  // (an equal str that is not the interned one)
      buf = value;
    } else if (PyUnicode_Compare(key, keys.master_param) == 0) {
      master_param = value;
    }
  }
  return true;
}

// A state value as a tensor: false if it is there but not a plain tensor (a DTensor, a subclass, something else),
// which the Python stages handle; else true, with `out` pointing to the tensor, or null if absent or None.
bool state_tensor(PyObject* value, const at::Tensor*& out) {
  out = nullptr;
  if (value == nullptr || value == Py_None) return true;
  if (!THPVariable_CheckExact(value)) return false;
  out = &THPVariable_Unpack(value);
  return true;
}

// ---- where gather finds each param's state: read (ReadState) or as the last gather read it (CachedState) ----

#if PY_VERSION_HEX >= 0x030C0000 && !defined(Py_GIL_DISABLED)
int watcher = -1;  // the dict watcher of every StateCache (-1: none)
uint64_t events = 0;  // the count of events of the dicts it watches, since import

int count_event(PyDict_WatchEvent, PyObject*, PyObject*, PyObject*) {
  ++events;
  return 0;
}
#else
constexpr int watcher = -1;
constexpr uint64_t events = 0;
#endif

// Watches a dict gather has read (null: none), for StateCache; false if it cannot be watched.
bool watch(PyObject* dict) {
#if PY_VERSION_HEX >= 0x030C0000 && !defined(Py_GIL_DISABLED)
  if (dict == nullptr || PyDict_Watch(watcher, dict) == 0) return true;
  PyErr_Clear();
#endif
  return false;
}

// opt.state and the state dicts, read at this step; and, where a cache is given, what was found there written into
// it, for the next step, with every dict read watched.
class ReadState {
 public:
  ReadState(PyObject* state, StateCache* cache) : state_(state), walk_(state), cache_(cache) {
    if (cache_ == nullptr) return;
    cache_->valid = false;
    cache_->entries.clear();
    complete_ = watch(state);
  }
  bool next(PyObject* /*param*/, bool /*master*/) { return true; }
  // A param without a grad. Recorded too (its grad may come at a later step): a state that the step would not have
  // read, and found wrong, leaves the cache incomplete, not the step refused.
  void pass(PyObject* param) {
    if (cache_ == nullptr) return walk_.pass(param);
    PyObject* st = walk_.find(param);
    PyObject *buf, *master;
    complete_ = complete_ && !walk_.duplicate() && state_items(st, true, buf, master) && watch(st);
    if (complete_) cache_->entries.push_back({param, buf, master, true});
  }
  // A param with a grad: its buffer and (master) master weights. False: not mine.
  bool find(PyObject* param, bool master, PyObject*& buf, PyObject*& master_param) {
    PyObject* st = walk_.find(param);
    if (walk_.duplicate() || !state_items(st, master, buf, master_param)) return false;
    if (cache_ != nullptr) {
      complete_ = complete_ && watch(st);
      if (complete_) cache_->entries.push_back({param, buf, master_param, master});
    }
    return true;
  }
  // The gather planned the step: the cache holds for opt.state as it is now, until the next event.
  void planned() {
    if (cache_ == nullptr || !complete_) return;
    cache_->state = state_;
    cache_->events = events;
    cache_->valid = true;
  }

 private:
  PyObject* state_;
  StateWalk walk_;
  StateCache* cache_;
  bool complete_ = false;
};

// The state as the last gather read it (StateCache), while no watched dict has changed since: each param is looked
// for in its place in the cache's list. Objects named there are owned by opt.state (see StateCache).
class CachedState {
 public:
  explicit CachedState(const StateCache& cache) : entries_(cache.entries) {}
  // False: the param is not the one the cache lists here (the groups' lists changed), or its entry lacks the master.
  bool next(PyObject* param, bool master) {
    if (i_ == entries_.size() || entries_[i_].param != param || (master && !entries_[i_].master_known)) return false;
    ++i_;
    return true;
  }
  void pass(PyObject* /*param*/) {}
  bool find(PyObject* /*param*/, bool /*master*/, PyObject*& buf, PyObject*& master_param) {
    buf = entries_[i_ - 1].buf;
    master_param = entries_[i_ - 1].master;
    return true;
  }

 private:
  const std::vector<StateCache::Entry>& entries_;
  size_t i_ = 0;
};

bool has_kernel(c10::Device device) {
#ifdef NAG_WITH_CUDA
  return device.is_cpu() || device.is_cuda();
#else
  return device.is_cpu();  // (others take the Python stages' reference implementation)
#endif
}

// A tensor lr as the kernels read it (_step.device_lr): on the params' device, float32 or float64, not negated.
at::Tensor device_lr(const at::Tensor& lr, c10::Device device) {
  at::Tensor out = lr.device() == device ? lr : lr.to(device, /*non_blocking=*/true);
  out = out.resolve_neg();
  return out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble ? out : out.to(at::kDouble);
}

// Whether each call's state was made for its param's dtype and device as they are: else the param has moved since
// (model.double(), model.to(...)), and the Python stages convert its state (_step.follow). A loop of its own, after
// gather's: short enough for the CPU to overlap the buffers' cache misses, which gather's long body would serialise.
bool fits(const Plan& plan) {
  for (const Call& c : plan.calls) {
    const at::TensorList params = c.params.list(), bufs = c.bufs.list(), masters = c.masters.list();
    for (size_t i = 0; i < params.size(); ++i) {
      if (i + 8 < params.size()) __builtin_prefetch(bufs[i + 8].unsafeGetTensorImpl());
      if (bufs[i].scalar_type() != c.buffer_dtype(params[i]) || bufs[i].device() != c.device) return false;
      if (c.master && (masters[i].scalar_type() != at::kFloat || masters[i].device() != c.device)) {
        return false;
      }
    }
  }
  return true;
}

}  // namespace

std::optional<at::Tensor> on(const std::optional<at::Tensor>& t, c10::Device device) {
  if (!t.has_value() || t->device() == device) return t;
  return t->to(device, /*non_blocking=*/true);
}

namespace {

enum class Gathered { kNotMine, kPlanned, kNotCached };  // kNotCached: a param is not where the cache lists it

template <class State>
Gathered gather_from(State& source, std::vector<GroupRead>& reads, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, bool clipped, Plan& plan) {
  constexpr Gathered not_mine = Gathered::kNotMine;
  std::unordered_set<PyObject*> made;  // params given new state (a param listed twice would be given it twice)
  std::unordered_map<int64_t, size_t> call_of;  // (settings, device) -> index in plan.calls
  int64_t last_key = -1;
  size_t last_call = 0;
  for (GroupRead& read : reads) {
    // (read again: Python code that ran while the groups were read may have replaced it, as _step.gather sees)
    PyObject* params = PyDict_GetItemWithError(read.group.get(), keys.params);
    if (params == nullptr || !PyList_Check(params)) {
      if (PyErr_Occurred()) throw python_error();
      return not_mine;
    }
    const bool master = read.settings.master;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) {
      PyObject* obj = PyList_GET_ITEM(params, i);
      if (!source.next(obj, master)) return Gathered::kNotCached;
      if (!THPVariable_CheckExact(obj)) return not_mine;
      const at::Tensor& p = THPVariable_Unpack(obj);
      // (read from the AutogradMeta, which autograd's own code does too: Tensor::grad() takes two calls to get there
      // and asks whether p is a leaf, for a warning when it is not and has no grad, which the call below still gives)
      const auto* meta = torch::autograd::impl::get_autograd_meta(p);
      const at::Tensor& grad = meta != nullptr && meta->grad_.defined() ? meta->grad_ : p.grad();
      if (!grad.defined()) {
        source.pass(obj);
        continue;
      }
      if (grad.layout() != at::kStrided) return not_mine;
      const c10::Device device = p.device();
      if (!has_kernel(device)) return not_mine;
      PyObject *buf_obj, *master_obj;
      if (!source.find(obj, master, buf_obj, master_obj)) return not_mine;  // (a param listed twice: Python raises)
      const at::Tensor *buf, *master_param = nullptr;
      if (!state_tensor(buf_obj, buf)) return not_mine;
      if (master && !state_tensor(master_obj, master_param)) return not_mine;
      const int64_t call_key = (static_cast<int64_t>(read.settings_index) << 16) |
                               (static_cast<int64_t>(device.type()) << 8) | static_cast<uint8_t>(device.index());
      if (call_key != last_key) {  // (most params of a group share the call of the param before)
        auto [it, added] = call_of.try_emplace(call_key, plan.calls.size());
        if (added) {
          Call& call = plan.calls.emplace_back();
          const Settings& s = read.settings;
          call.device = device;
          if (read.lr.has_value()) call.lr_tensor = device_lr(*read.lr, device);
          call.lr = s.lr;
          call.momentum = s.momentum;
          call.weight_decay = s.weight_decay;
          call.maximize = s.maximize;
          call.sr_seed = s.sr_seed;
          call.momentum_dtype = s.momentum_dtype;
          call.master = master;
          call.grad_scale = on(grad_scale, device);
          call.found_inf = on(found_inf, device);
          const size_t rest = PyList_GET_SIZE(params) - i;  // (room for the rest of the group: no regrowth)
          for (Borrowed* list : {&call.params, &call.grads, &call.bufs}) list->reserve(rest);
          if (master) call.masters.reserve(rest);
          call.first.reserve(rest);
        }
        last_key = call_key;
        last_call = it->second;
      }
      Call& call = plan.calls[last_call];
      call.first.push_back(buf == nullptr && !read.may_skip);
      if ((buf == nullptr || (master && master_param == nullptr)) && !made.insert(obj).second) return not_mine;
      if (buf == nullptr) {
        const at::ScalarType dtype = call.buffer_dtype(p);
        at::Tensor value = at::empty_like(p, p.options().dtype(dtype), at::MemoryFormat::Preserve);
        if (read.may_skip) {
          value.fill_(p.is_complex() ? c10::Scalar(c10::complex<double>(-0.0, -0.0)) : c10::Scalar(-0.0));
        }
        plan.new_state.push_back({last_call, THPObjectPtr(Py_NewRef(obj)), keys.momentum_buffer, std::move(value)});
        buf = &plan.new_state.back().value;  // (borrowed at once below, before new_state grows again)
      }
      call.params.add(p);
      call.grads.add(grad);
      call.bufs.add(*buf);
      if (master) {
        if (master_param == nullptr) {
          at::Tensor value = p.detach().to(at::kFloat, /*non_blocking=*/false, /*copy=*/true,
                                           at::MemoryFormat::Preserve);
          plan.new_state.push_back({last_call, THPObjectPtr(Py_NewRef(obj)), keys.master_param, std::move(value)});
          master_param = &plan.new_state.back().value;
        }
        call.masters.add(*master_param);
      }
      call.numel += p.numel();
      if (clipped) {
        auto& by_device = plan.grads_by_device;
        auto it = std::find_if(by_device.begin(), by_device.end(), [&](const auto& d) { return d.first == device; });
        (it != by_device.end() ? it->second : by_device.emplace_back(device, Borrowed()).second).add(grad);
      }
    }
  }
  return fits(plan) ? Gathered::kPlanned : not_mine;
}

}  // namespace

bool gather(PyObject* state, StateCache* cache, std::vector<GroupRead>& reads,
            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf, bool clipped,
            Plan& plan) {
  if (cache != nullptr && cache->valid && cache->state == state && cache->events == events) {
    CachedState source(*cache);
    const Gathered gathered = gather_from(source, reads, grad_scale, found_inf, clipped, plan);
    if (gathered != Gathered::kNotCached) return gathered == Gathered::kPlanned;
    plan = Plan();  // (and read it all again: what the cache lists before this param may be listed again after it)
  }
  ReadState source(state, watcher >= 0 ? cache : nullptr);
  const Gathered gathered = gather_from(source, reads, grad_scale, found_inf, clipped, plan);
  if (gathered == Gathered::kPlanned) source.planned();
  return gathered == Gathered::kPlanned;
}

bool dict_watchers() { return watcher >= 0; }

void add_dict_watcher() {
#if PY_VERSION_HEX >= 0x030C0000 && !defined(Py_GIL_DISABLED)
  watcher = PyDict_AddWatcher(count_event);
  if (watcher < 0) PyErr_Clear();  // (all taken: no caches)
#endif
}

}  // namespace nag::step
