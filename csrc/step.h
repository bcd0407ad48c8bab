// FusedNAG.step() for plain tensors: the C++ copy of nag_cuda/_step.py (the specification), stage for stage, which
// FusedNAG.step() asks first. step.cpp runs the stages in order; each has a file of its own:
//   read groups  step_read_groups.cpp
//   gather       step_gather.cpp
//   clip, check, run  step_run.cpp
//   commit       step.cpp
// Any stage may answer "not mine" (false) before run, having changed nothing: the Python stages then take the
// step, and raise where something is wrong. Nothing is retried, and no error is matched by its text.
//
// NOTE: what runs Python code, and so what is owned. Only read_groups runs Python code (float() and bool() of the
// groups' values, whose __float__ may be anyone's), and it keeps nothing it read but C++ values and owned references.
// gather, clip, check and run call no Python: opt.state and the state dicts are read with PyDict_Next (no hashing,
// no __eq__), tensors through THPVariable_Unpack, and the ops through the dispatcher (FusedNAG sends the step to its
// Python stages under a torch function or dispatch mode, the ways the dispatcher could call Python for plain
// tensors). So while the GIL is held, nothing can drop what gather borrows: the params, grads and state stay owned by
// Python's objects. Before the GIL is released (a large step), run owns every call's tensors, in bulk. commit, which
// runs Python (hashing params into opt.state), uses owned values only.
#pragma once

#include <Python.h>

#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/MaybeOwned.h>
#include <torch/csrc/utils/object_ptr.h>

namespace nag::step {

// Tensor handles that borrow rather than own (see the NOTE above): a borrow costs no reference count, where a copy of
// a tensor that Python owns costs a call into the interpreter to take it and another to give it back (see
// c10/util/intrusive_ptr.h).
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
  at::TensorList list() const { return tensors_; }

 private:
  std::vector<at::Tensor> tensors_;
};

// What decides a param group's op call (GroupRead.settings): groups with equal settings share one call per device.
struct Settings {
  PyObject* lr_tensor = nullptr;  // a tensor lr, compared by identity (the kernel reads it); else `lr`
  double lr = 0.0, momentum = 0.0, weight_decay = 0.0;
  bool maximize = false, master = false;
  std::optional<at::ScalarType> momentum_dtype;  // (it decides the call's new buffers: see Call::buffer_dtype)
  std::optional<int64_t> sr_seed;
  bool operator==(const Settings& o) const {
    return lr_tensor == o.lr_tensor && lr == o.lr && momentum == o.momentum && weight_decay == o.weight_decay &&
           maximize == o.maximize && master == o.master && momentum_dtype == o.momentum_dtype &&
           sr_seed == o.sr_seed;
  }
};

// One param group as read_groups reads it (GroupRead): C++ values and owned references only.
struct GroupRead {
  THPObjectPtr group;  // the group's dict, whose "params" gather reads (the list as it is after every conversion)
  Settings settings;
  long settings_index = 0;  // equal settings, equal index
  std::optional<at::Tensor> lr;  // a tensor lr
  THPObjectPtr lr_object;        // (which settings.lr_tensor names)
  bool may_skip = false;  // the step may be skipped on the device or replayed: new buffers are -0.0, not first
};

// One op call (Call): the params of one or more groups with equal settings, on one device. Its tensor lists borrow.
struct Call {
  c10::Device device{c10::kCPU};
  std::optional<at::Tensor> lr_tensor;  // on `device`, as the kernels read it (device_lr); else lr
  double lr = 0.0, momentum = 0.0, weight_decay = 0.0;
  bool maximize = false;
  std::optional<int64_t> sr_seed;
  std::optional<at::Tensor> grad_scale, found_inf, grad_coef;  // on `device`
  std::optional<at::ScalarType> momentum_dtype;
  bool master = false;  // master weights (masters)
  Borrowed params, grads, bufs, masters;
  c10::List<bool> first;
  int64_t numel = 0;
  // The dtype of p's momentum buffer (the rule of _rules.buffer_dtype).
  at::ScalarType buffer_dtype(const at::Tensor& p) const {
    return momentum_dtype.value_or(master ? at::kFloat : p.scalar_type());
  }
};

// State made by this step (a new momentum buffer or master copy): stored in opt.state at commit.
struct NewState {
  size_t call;  // of the op call that steps the param: committed once it has run
  THPObjectPtr param;
  PyObject* key;  // an interned string, kept for the life of the module
  at::Tensor value;
};

struct Plan {
  std::vector<Call> calls;
  std::vector<NewState> new_state;
  // max_grad_norm: every grad of the step per device, in the order of the params (as _step.clip_calls reduces them)
  std::vector<std::pair<c10::Device, Borrowed>> grads_by_device;
};

// The interned keys the stages read (set by the module's init).
struct Keys {
  PyObject *params, *lr, *momentum, *weight_decay, *maximize, *nesterov, *dampening, *differentiable, *capturable,
      *momentum_dtype, *master_weights, *stochastic_rounding, *sr_seed, *sr_step, *momentum_buffer, *master_param;
  PyObject* zero;  // the int 0
};
extern Keys keys;

// What one optimizer's last gather found in opt.state, for each param of its groups in order (FusedNAG._state_cache,
// a capsule): the next gather takes it instead of reading opt.state and the state dicts, where nothing can have
// changed them. That needs dict watchers (PyDict_AddWatcher, Python >= 3.12): every dict it read from is watched, and
// any event of any watched dict (an insert, a delete, a clear, a dealloc) ends every cache's validity. Where the params
// are not the ones it lists, in the same places, gather starts again without it. So the objects it names are still
// owned by opt.state whenever it is used. With Python 3.11 there is none (nullptr).
struct StateCache {
  struct Entry {
    PyObject* param;
    PyObject* buf;     // state[param]["momentum_buffer"], or null
    PyObject* master;  // state[param]["master_param"], or null
    bool master_known;  // (a lookup for a group without master weights stops at the buffer)
  };
  PyObject* state = nullptr;  // the opt.state it was read from: only compared, never read
  uint64_t events = 0;        // the count of watched-dict events then
  bool valid = false;
  std::vector<Entry> entries;
};
void add_dict_watcher();  // at import
bool dict_watchers();     // whether StateCaches are used (the watcher was added)

// The stages. false: not mine, with nothing changed.
bool read_groups(PyObject* groups, bool scaled, bool clipped, std::vector<GroupRead>& out);
bool gather(PyObject* state, StateCache* cache, std::vector<GroupRead>& reads,
            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf, bool clipped,
            Plan& plan);
at::Tensor clip(Plan& plan, const std::optional<at::Tensor>& grad_scale, double max_norm, double norm_type);
void check(const Plan& plan);
void run(const Plan& plan, size_t& ran);  // ran: the number of calls that have run

// A scalar tensor on `device` (a no-op where it is there already).
std::optional<at::Tensor> on(const std::optional<at::Tensor>& t, c10::Device device);

}  // namespace nag::step
