// Op registration and argument checks: the schema of nag_cuda::nag_step_, the checks every device shares, and the
// split of the tensor lists into one Group per dtype for the kernels' libraries (nag_kernels.h).
#include <array>
#include <cmath>
#include <limits>
#include <tuple>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/view_as_real.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include "nag_group.h"
#include "nag_kernels.h"
#include "nag_ops.h"

namespace nag {
namespace {

const KernelTable* cpu_kernels = nullptr;
const KernelTable* cuda_kernels = nullptr;

// The kernels of `device`'s type, or an error where this build has none.
const KernelTable& kernels(c10::Device device, const char* op) {
  const KernelTable* table = device.is_cpu() ? cpu_kernels : device.is_cuda() ? cuda_kernels : nullptr;
  // (null also after a failed `import nag_cuda`, whose ImportError said why: the ops are registered before it fails)
  TORCH_CHECK(table != nullptr, op, ": nag_cuda has no kernels for ", device.type(),
              device.is_cuda() ? " (a build without CUDA, or its CUDA kernels' library did not load)" : "");
  return *table;
}

// torch's CPU kernels fuse multiply-adds except on x86-64 at the DEFAULT capability (see mul_add in nag_math.h).
bool torch_fuses_multiply_add() {
#if defined(__x86_64__)
  static const bool fused = at::get_cpu_capability() != "DEFAULT";
  return fused;
#else
  return true;
#endif
}

// (what a table's function returned: nullptr, or what failed in the kernels' library)
void check_kernels(const char* error) { TORCH_CHECK(error == nullptr, error); }

// Complex tensors are updated as (real, imaginary) pairs, as torch's SGD does: the update is real-linear.
// (where: the op and argument, for the error message)
Dtype to_dtype(at::ScalarType t, size_t i, const char* where = "nag_step_: params") {
  switch (c10::toRealValueType(t)) {
    case at::kFloat: return Dtype::kFloat;
    case at::kDouble: return Dtype::kDouble;
    case at::kHalf: return Dtype::kHalf;
    case at::kBFloat16: return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, where, "[", i, "] has dtype ", t,
                  "; supported are float32, float64, float16, bfloat16 and their complex types");
  }
}

// a == b, inlined: ArrayRef's operator== calls memcmp, which costs more than these few elements.
inline bool same(c10::IntArrayRef a, c10::IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

// dtype: the dtype `t` must have (a momentum buffer's may differ from its param's, see kind_of).
void check_tensor(const at::Tensor& t, const char* name, size_t i, const at::Tensor& param, at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), "nag_step_: ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, "nag_step_: ", name, "[", i, "] has layout ", t.layout(),
              "; sparse gradients are not supported");
  TORCH_CHECK(t.device() == param.device(), "nag_step_: ", name, "[", i, "] is on ", t.device(), ", params[", i,
              "] on ", param.device());
  TORCH_CHECK(t.scalar_type() == dtype, "nag_step_: ", name, "[", i, "] has dtype ", t.scalar_type(), ", expected ",
              dtype, " (params[", i, "] has ", param.scalar_type(), ")");
  TORCH_CHECK(same(t.sizes(), param.sizes()), "nag_step_: ", name, "[", i, "] has shape ", t.sizes(), ", params[", i,
              "] has ", param.sizes());
}

const char* mode_name(Mode mode) {
  switch (mode) {
    case Mode::kPlain: return "";
    case Mode::kMaster: return " with master_params";
    case Mode::kStochastic: return " with stochastic rounding (sr_seed)";
  }
  return "";
}

Mode mode_of(const std::optional<at::TensorList>& master_params, bool stochastic) {
  return master_params.has_value() ? Mode::kMaster : stochastic ? Mode::kStochastic : Mode::kPlain;
}

// The kernel that updates params[i] with momentum_buffers[i] (see visit_kind in nag_launch.h for the list).
Kind kind_of(const at::Tensor& p, const at::Tensor& b, Mode mode, size_t i) {
  TORCH_CHECK(p.is_complex() == b.is_complex() && (!p.is_complex() || b.scalar_type() == p.scalar_type()),
              "nag_step_: momentum_buffers[", i, "] has dtype ", b.scalar_type(), ", params[", i, "] has ",
              p.scalar_type());
  TORCH_CHECK(!p.is_complex() || mode == Mode::kPlain, "nag_step_: params[", i, "] is complex (", p.scalar_type(),
              "), which has no kernel", mode_name(mode));
  const Kind kind{to_dtype(p.scalar_type(), i), to_dtype(b.scalar_type(), i), mode};
  const bool known = visit_kind<int, int, int, int>(kind, [](auto, auto, auto) {});
  TORCH_CHECK(known, "nag_step_: no kernel for params[", i,
              "] of dtype ", p.scalar_type(), " with momentum_buffers[", i, "] of dtype ", b.scalar_type(),
              mode_name(mode), ". Supported: buffers of the param's dtype, float32 buffers for float16/bfloat16 "
              "params, bfloat16 buffers for float32 params; master_params for float16/bfloat16 params (buffers "
              "float32 or the param's dtype); stochastic rounding for bfloat16 params");
  return kind;
}

// A tensor whose memory holds its values as they are: no lazy conjugation or negation (conj() of a complex
// tensor, .imag of such a view), which the kernels would not apply.
bool plain(const at::Tensor& t) { return !t.is_conj() && !t.is_neg(); }

// The kernels walk memory linearly, so p, grad, buf (and master) must be plain and dense with equal strides.
bool same_dense_layout(const at::Tensor& p, const at::Tensor& g, const at::Tensor& b, const at::Tensor* master) {
  return p.is_non_overlapping_and_dense() && same(p.strides(), g.strides()) && same(p.strides(), b.strides()) &&
         (master == nullptr || same(p.strides(), master->strides())) && plain(p) && plain(g) && plain(b) &&
         (master == nullptr || plain(*master));
}

// The values of `t` in a new dense tensor (or `t` itself where it already is one).
at::Tensor materialize(const at::Tensor& t) { return t.resolve_conj().resolve_neg().contiguous(); }

// GradScaler's grad_scale / found_inf, clipping's grad_coef: a float32 scalar on the params' device, read by the
// kernel there.
void check_amp_tensor(const std::optional<at::Tensor>& t, const char* name, c10::Device device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat, "nag_step_: ", name,
              " must be a one-element float32 tensor, got ", t->scalar_type(), " of shape ", t->sizes());
  TORCH_CHECK(t->device() == device, "nag_step_: ", name, " is on ", t->device(), ", params on ", device);
  TORCH_CHECK(!t->is_neg(), "nag_step_: ", name, " is a negated view (torch._neg_view), which the kernels would read "
              "as its memory holds it; pass ", name, ".resolve_neg()");
}

// What the checks of each param need to know of its call.
struct CallChecks {
  c10::Device device;
  Mode mode;
  bool unscale;         // grads are written too (GradScaler)
  bool inference_mode;  // (read once: a thread-local in another library costs a call per read)
  // The (param dtype, buffer dtype) pair last found to have a kernel, and that kernel: the next param with the same
  // pair skips the lookup.
  at::ScalarType known_param = at::ScalarType::Undefined;
  at::ScalarType known_buf = at::ScalarType::Undefined;
  Kind known_kind{Dtype::kFloat, Dtype::kFloat, Mode::kPlain};
  // The last param that passed check_tensors dense and real, with its tensors: their dispatch keys, dtypes and kind
  // (see like_last_dense). None until one has.
  std::optional<c10::DispatchKeySet> dense_keys;
  at::ScalarType dense_param = at::ScalarType::Undefined;
  at::ScalarType dense_buf = at::ScalarType::Undefined;
  Kind dense_kind{Dtype::kFloat, Dtype::kFloat, Mode::kPlain};
};

// The checks of a whole call (lengths, lr, GradScaler's tensors).
CallChecks check_call(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                      const c10::List<bool>& is_first, const std::optional<at::Tensor>& lr,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::TensorList>& master_params, bool stochastic,
                      const std::optional<at::Tensor>& grad_coef) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && bufs.size() == n && is_first.size() == n, "nag_step_: params, grads, "
              "momentum_buffers and is_first must have equal lengths, got ", n, ", ", grads.size(), ", ", bufs.size(),
              " and ", is_first.size());
  TORCH_CHECK(!master_params.has_value() || master_params->size() == n, "nag_step_: params and master_params must "
              "have equal lengths, got ", n, " and ", master_params.has_value() ? master_params->size() : 0);
  TORCH_CHECK(!(master_params.has_value() && stochastic), "nag_step_: master_params and sr_seed exclude each other: "
              "with master weights the float32 master is updated and the param is its rounding to nearest");
  c10::Device device(c10::kCPU);
  if (n > 0) {
    TORCH_CHECK(params[0].defined(), "nag_step_: params[0] is undefined");
    device = params[0].device();
    if (lr.has_value()) {  // any real dtype, as torch's SGD takes it; read as float32 or float64 (see step_impl)
      TORCH_CHECK(lr->numel() == 1 && !lr->is_complex(), "nag_step_: lr must be a one-element real tensor, got ",
                  lr->scalar_type(), " of shape ", lr->sizes());
      TORCH_CHECK(lr->device() == device, "nag_step_: lr is on ", lr->device(), ", params on ", device);
    }
    check_amp_tensor(grad_scale, "grad_scale", device);
    check_amp_tensor(found_inf, "found_inf", device);
    check_amp_tensor(grad_coef, "grad_coef", device);
  }
  return CallChecks{device, mode_of(master_params, stochastic), grad_scale.has_value(),
                    c10::InferenceMode::is_enabled()};
}

// Prefetches for the loops over a step's tensors. Each tensor's TensorImpl, StorageImpl and version counter is a
// separate allocation, and a cache miss once a step has more tensors than the caches hold (thousands): the loops below
// ask for them a few tensors ahead, so that their misses overlap instead of coming one after the other.
// (every line of the object, which starts anywhere in its first line: 176 bytes span three or four)
void prefetch_impl(const at::Tensor& t) {
  const char* impl = reinterpret_cast<const char*>(t.unsafeGetTensorImpl());
  __builtin_prefetch(impl);
  __builtin_prefetch(impl + 64);
  __builtin_prefetch(impl + 128);
  __builtin_prefetch(impl + sizeof(c10::TensorImpl) - 1);
}
// (the lines of the data pointer and the flags read with it)
void prefetch_storage(const at::Tensor& t) {
  const char* storage = reinterpret_cast<const char*>(t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
  if (storage == nullptr) return;  // (a tensor without storage, which the checks will refuse)
  __builtin_prefetch(storage + 16);
  __builtin_prefetch(storage + 63);
}
void prefetch_version(const at::Tensor& t) {
  // (a VariableVersion is one pointer, to its counter)
  static_assert(sizeof(c10::VariableVersion) == sizeof(void*));
  __builtin_prefetch(*reinterpret_cast<void* const*>(&t.unsafeGetTensorImpl()->version_counter()));
}

bool no_overlap(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() || at::has_internal_overlap(t) != at::MemOverlap::Yes;
}

// The checks of params[i] with its grad, buffer and master (or null); returns the kind of kernel that updates it.
Kind check_tensors(const at::Tensor& p, const at::Tensor& grad, const at::Tensor& buf, const at::Tensor* master,
                   size_t i, CallChecks& call) {
  TORCH_CHECK(p.defined(), "nag_step_: params[", i, "] is undefined");
  TORCH_CHECK(p.device() == call.device, "nag_step_: params[", i, "] is on ", p.device(), ", params[0] on ",
              call.device, "; call once per device");
  TORCH_CHECK(p.layout() == at::kStrided, "nag_step_: params[", i, "] has layout ", p.layout());
  check_tensor(grad, "grads", i, p, p.scalar_type());
  TORCH_CHECK(buf.defined(), "nag_step_: momentum_buffers[", i, "] is undefined");
  check_tensor(buf, "momentum_buffers", i, p, buf.scalar_type());
  Kind kind = call.known_kind;
  if (call.known_param != p.scalar_type() || call.known_buf != buf.scalar_type() || p.is_complex()) {
    kind = call.known_kind = kind_of(p, buf, call.mode, i);
    call.known_param = p.scalar_type();
    call.known_buf = buf.scalar_type();
  }
  if (master != nullptr) check_tensor(*master, "master_params", i, p, at::kFloat);
  TORCH_CHECK(no_overlap(p) && no_overlap(buf) && (master == nullptr || no_overlap(*master)), "nag_step_: params[",
              i, "], momentum_buffers[", i, "] or master_params[", i, "] has overlapping memory (e.g. expand())");
  TORCH_CHECK(!call.unscale || no_overlap(grad), "nag_step_: grads[", i, "] has overlapping memory, and grad_scale "
              "means it is unscaled in place");
  // As torch's in-place ops: an inference tensor cannot be updated outside inference mode.
  if (!call.inference_mode) {
    const at::Tensor* written[] = {&p, &buf, master, call.unscale ? &grad : nullptr};
    const char* names[] = {"params", "momentum_buffers", "master_params", "grads"};
    for (int k = 0; k < 4; ++k) {
      TORCH_CHECK(written[k] == nullptr || !written[k]->is_inference(), "Inplace update to inference tensor outside "
                  "InferenceMode is not allowed (nag_step_: ", names[k], "[", i, "] was made in inference mode). "
                  "Clone it outside InferenceMode first, or step inside InferenceMode");
    }
  }
  return kind;
}

// The common case in a few instructions: params[i], its grad, buffer and master have the dispatch keys of the last
// param that passed check_tensors dense and real (see check_param) -- which says that they are strided, neither
// conjugate nor negative views, and inference tensors or not alike --, that param's dtypes, the call's device, and
// params[i]'s sizes and strides, with params[i] dense. Then every check of check_tensors holds and the kernels can
// walk them in place. False for anything else, which check_tensors then looks at one check at a time.
bool like_last_dense(const at::Tensor& p, const at::Tensor& g, const at::Tensor& b, const at::Tensor* master,
                     const CallChecks& call) {
  const c10::DispatchKeySet keys = p.key_set();
  if (call.dense_keys != keys || p.scalar_type() != call.dense_param || p.device() != call.device ||
      !p.is_non_overlapping_and_dense()) {
    return false;
  }
  const c10::IntArrayRef sizes = p.sizes(), strides = p.strides();
  auto like = [&](const at::Tensor& t, at::ScalarType dtype) {
    return t.key_set() == keys && t.scalar_type() == dtype && t.device() == call.device && same(t.sizes(), sizes) &&
           same(t.strides(), strides);
  };
  return like(g, call.dense_param) && like(b, call.dense_buf) && (master == nullptr || like(*master, at::kFloat));
}

// check_tensors, through like_last_dense where it can. dense: whether the kernels can walk the tensors in place
// (dense, of one layout, plain and real); else step_impl copies them.
Kind check_param(const at::Tensor& p, const at::Tensor& grad, const at::Tensor& buf, const at::Tensor* master,
                 size_t i, CallChecks& call, bool& dense) {
  dense = true;
  if (like_last_dense(p, grad, buf, master, call)) return call.dense_kind;
  const Kind kind = check_tensors(p, grad, buf, master, i, call);
  dense = same_dense_layout(p, grad, buf, master) && !p.is_complex();
  if (dense) {
    call.dense_keys = p.key_set();
    call.dense_param = p.scalar_type();
    call.dense_buf = buf.scalar_type();
    call.dense_kind = kind;
  }
  return kind;
}

}  // namespace

void check_step(at::TensorList params, at::TensorList grads, at::TensorList bufs, const c10::List<bool>& is_first,
                const std::optional<at::Tensor>& lr, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, const std::optional<at::TensorList>& master_params,
                bool stochastic, const std::optional<at::Tensor>& grad_coef) {
  CallChecks call = check_call(params, grads, bufs, is_first, lr, grad_scale, found_inf, master_params, stochastic,
                               grad_coef);
  bool dense;
  for (size_t i = 0; i < params.size(); ++i) {
    check_param(params[i], grads[i], bufs[i], master_params.has_value() ? &(*master_params)[i] : nullptr, i, call,
                dense);
  }
}

namespace {

// lr_tensor (the .tensor_lr overload): the learning rate is read by the kernel, on the device, so a step with a
// tensor lr needs no host synchronisation and can be captured in a CUDA graph.
void step_impl(at::TensorList params, at::TensorList grads, at::TensorList bufs, const c10::List<bool>& is_first,
               double lr, const at::Tensor* lr_tensor, double momentum, double weight_decay, bool maximize,
               const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
               const std::optional<at::TensorList>& master_params, std::optional<int64_t> sr_seed,
               const std::optional<at::Tensor>& grad_coef) {
  const size_t n = params.size();
  CallChecks call = check_call(params, grads, bufs, is_first,
                               lr_tensor != nullptr ? std::optional<at::Tensor>(*lr_tensor) : std::nullopt,
                               grad_scale, found_inf, master_params, sr_seed.has_value(), grad_coef);
  if (n == 0) return;
  const c10::Device device = call.device;
  // The kernels read a float32 or float64 lr; any other dtype (bfloat16, an integer) is converted to float64, exactly.
  at::Tensor lr_value;
  if (lr_tensor != nullptr) {
    // (and not a lazily negated view, torch._neg_view, whose memory holds -lr)
    const bool readable =
        (lr_tensor->scalar_type() == at::kFloat || lr_tensor->scalar_type() == at::kDouble) && !lr_tensor->is_neg();
    lr_value = readable ? *lr_tensor : lr_tensor->resolve_neg().to(at::kDouble);
  }

  // Tensors the kernel cannot walk linearly are updated through contiguous copies, written back afterwards.
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;
  std::vector<at::Tensor> keep_alive;
  std::array<Group, 16> groups;  // one per (param dtype, buffer dtype)
  const bool m_list = master_params.has_value();
  for (size_t i = 0; i < n; ++i) {
    if (i + 8 < n) {
      prefetch_impl(params[i + 8]);
      prefetch_impl(grads[i + 8]);
      prefetch_impl(bufs[i + 8]);
      if (m_list) prefetch_impl((*master_params)[i + 8]);
    }
    if (i + 4 < n) {
      prefetch_storage(params[i + 4]);
      prefetch_storage(grads[i + 4]);
      prefetch_storage(bufs[i + 4]);
      if (m_list) prefetch_storage((*master_params)[i + 4]);
    }
    const at::Tensor* p = &params[i];
    const at::Tensor* g = &grads[i];
    const at::Tensor* b = &bufs[i];
    const at::Tensor* m = master_params.has_value() ? &(*master_params)[i] : nullptr;
    bool dense;
    const Kind kind = check_param(*p, *g, *b, m, i, call, dense);
    if (p->numel() == 0) continue;
    // The common case (dense, real) reads the tensors where they are, with no copies of the Tensor handles.
    if (!dense) {
      at::Tensor dense[4] = {materialize(*p), materialize(*g), materialize(*b), m ? materialize(*m) : at::Tensor()};
      // copy_ writes the values back through the original's strides (and conjugate or negative bit)
      if (!dense[0].is_same(*p)) write_back.emplace_back(*p, dense[0]);
      if (!dense[2].is_same(*b)) write_back.emplace_back(*b, dense[2]);
      if (m && !dense[3].is_same(*m)) write_back.emplace_back(*m, dense[3]);
      if (grad_scale.has_value() && !dense[1].is_same(*g)) write_back.emplace_back(*g, dense[1]);
      for (int k = 0; k < 3; ++k) {
        if (dense[k].is_complex()) dense[k] = at::view_as_real(dense[k]);
      }
      for (const at::Tensor& t : dense) keep_alive.push_back(t);
      const size_t last = keep_alive.size() - 4;
      p = &keep_alive[last];  // (used in this iteration only, before keep_alive grows again)
      g = &keep_alive[last + 1];
      b = &keep_alive[last + 2];
      m = m ? &keep_alive[last + 3] : nullptr;
    }
    Group& group = groups[static_cast<int>(kind.param) * 4 + static_cast<int>(kind.buf)];
    if (group.numel.empty()) group.reserve(n - i, m != nullptr);  // (room for the rest: no regrowth)
    group.kind = kind;
    group.param_size = p->element_size();
    group.buf_size = b->element_size();
    group.param.push_back(p->data_ptr());
    // (grads are written only to unscale them; a read needs no copy-on-write check)
    group.grad.push_back(grad_scale.has_value() ? g->data_ptr() : const_cast<void*>(g->const_data_ptr()));
    group.buf.push_back(b->data_ptr());
    if (m) group.master.push_back(m->data_ptr());
    group.numel.push_back(p->numel());
    group.first.push_back(is_first.get(i) ? 1 : 0);
  }

  // 1/scale computed once, on the device, by ATen: float division rounds like GradScaler's double reciprocal
  // rounded to float (double has more than 2 * 24 + 2 bits), and the kernels only multiply.
  const at::Tensor inv_grad_scale = grad_scale.has_value() ? grad_scale->reciprocal() : at::Tensor();
  const StepArgs args{lr, momentum, weight_decay, maximize,
                      inv_grad_scale.defined() ? inv_grad_scale.const_data_ptr<float>() : nullptr,
                      found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr,
                      lr_value.defined() ? lr_value.const_data_ptr() : nullptr,
                      lr_value.defined() && lr_value.scalar_type() == at::kDouble,
                      static_cast<uint64_t>(sr_seed.value_or(0)),
                      grad_coef.has_value() ? grad_coef->const_data_ptr<float>() : nullptr,
                      torch_fuses_multiply_add()};
  const KernelTable& table = kernels(device, "nag_step_");
  for (const Group& group : groups) {
    if (group.numel.empty()) continue;
    const GroupView view = group.view();
    check_kernels(table.run(&view, &args, device.index()));
  }
  for (auto& [dst, src] : write_back) dst.copy_(src);
}

void nag_step(at::TensorList params, at::TensorList grads, at::TensorList bufs, const c10::List<bool>& is_first,
              double lr, double momentum, double weight_decay, bool maximize,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
              const std::optional<at::TensorList>& master_params, std::optional<int64_t> sr_seed,
              const std::optional<at::Tensor>& grad_coef) {
  step_impl(params, grads, bufs, is_first, lr, nullptr, momentum, weight_decay, maximize, grad_scale, found_inf,
            master_params, sr_seed, grad_coef);
}

void nag_step_tensor_lr(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                        const c10::List<bool>& is_first, const at::Tensor& lr, double momentum, double weight_decay,
                        bool maximize, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf,
                        const std::optional<at::TensorList>& master_params, std::optional<int64_t> sr_seed,
                        const std::optional<at::Tensor>& grad_coef) {
  step_impl(params, grads, bufs, is_first, 0.0, &lr, momentum, weight_decay, maximize, grad_scale, found_inf,
            master_params, sr_seed, grad_coef);
}

// NOTE: the two kernels below are what torch's own in-place ops get from its code generator (VariableType and
// ADInplaceOrView), written once for nag_step_'s schema. Without them the dispatcher falls through both keys: no
// version counter moves, so autograd cannot see that a param saved for backward was changed. They are unboxed (typed)
// kernels: a boxed one would copy every tensor of the lists into IValues and back at each call.

// Calls f(tensor, argument name, index) for each tensor nag_step_ writes: the arguments its schema marks (a!),
// except grads, which are written only when grad_scale is given (to unscale them).
template <typename F>
void for_each_written(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                      const std::optional<at::TensorList>& master_params, bool scaled, F&& f) {
  auto each = [&](at::TensorList list, const char* name) {
    for (size_t i = 0; i < list.size(); ++i) {
      // (of each TensorImpl, only the line that holds its version counter, which is what the bumps read)
      if (i + 8 < list.size()) __builtin_prefetch(&list[i + 8].unsafeGetTensorImpl()->version_counter());
      if (i + 4 < list.size()) prefetch_version(list[i + 4]);
      f(list[i], name, i);
    }
  };
  each(params, "params");
  if (scaled) each(grads, "grads");
  each(bufs, "momentum_buffers");
  if (master_params.has_value()) each(*master_params, "master_params");
}

// Autograd: the op has no derivative. As for torch's in-place ops, a leaf that requires grad may not be updated in
// grad mode; nor may any other argument require grad, since nothing would carry its gradient.
template <typename Lr>
void autograd_kernel(c10::DispatchKeySet keys, at::TensorList params, at::TensorList grads, at::TensorList bufs,
                     const c10::List<bool>& is_first, Lr lr, double momentum, double weight_decay, bool maximize,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                     const std::optional<at::TensorList>& master_params, std::optional<int64_t> sr_seed,
                     const std::optional<at::Tensor>& grad_coef) {
  if (c10::GradMode::is_enabled()) {
    auto check = [](const at::Tensor& t, bool written, const std::string& where) {
      if (!t.defined() || !t.requires_grad()) return;
      TORCH_CHECK(!written || !t.is_leaf(), "a leaf Variable that requires grad is being used in an in-place "
                  "operation (nag_step_: ", where, "); call it under torch.no_grad(), as optimizers do");
      TORCH_CHECK(false, "nag_step_ has no derivative, but ", where, " requires grad; call it under "
                  "torch.no_grad(), as optimizers do");
    };
    for_each_written(params, grads, bufs, master_params, /*scaled=*/true,
                     [&](const at::Tensor& t, const char* name, size_t i) {
                       check(t, true, std::string(name) + "[" + std::to_string(i) + "]");
                     });
    if constexpr (std::is_same_v<Lr, const at::Tensor&>) check(lr, false, "lr");
    if (grad_scale.has_value()) check(*grad_scale, false, "grad_scale");
    if (found_inf.has_value()) check(*found_inf, false, "found_inf");
    if (grad_coef.has_value()) check(*grad_coef, false, "grad_coef");
  }
  at::AutoDispatchBelowAutograd guard;
  step_op<Lr>().redispatch(keys & c10::after_autograd_keyset, params, grads, bufs, is_first, lr, momentum,
                           weight_decay, maximize, grad_scale, found_inf, master_params, sr_seed, grad_coef);
}

// ADInplaceOrView: every tensor the op writes gets its version counter bumped, once the update has succeeded. (The
// kernels refuse inference tensors outside inference mode, in check_tensors, in the pass that reads them anyway.)
template <typename Lr>
void inplace_kernel(c10::DispatchKeySet keys, at::TensorList params, at::TensorList grads, at::TensorList bufs,
                    const c10::List<bool>& is_first, Lr lr, double momentum, double weight_decay, bool maximize,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::TensorList>& master_params, std::optional<int64_t> sr_seed,
                    const std::optional<at::Tensor>& grad_coef) {
  const bool scaled = grad_scale.has_value();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    step_op<Lr>().redispatch(keys & c10::after_ADInplaceOrView_keyset, params, grads, bufs, is_first, lr, momentum,
                             weight_decay, maximize, grad_scale, found_inf, master_params, sr_seed, grad_coef);
  }
  for_each_written(params, grads, bufs, master_params, scaled, [](const at::Tensor& t, const char*, size_t) {
    if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
  });
}

}  // namespace

// max_grad_norm: the norm_type that the kernels reduce with (see norm_term).
NormKind norm_kind(double norm_type) {
  TORCH_CHECK(norm_type > 0.0, "nag_cuda: norm_type must be a positive number or inf, got ", norm_type);
  if (norm_type == 2.0) return NormKind::kTwo;
  if (norm_type == 1.0) return NormKind::kOne;
  if (std::isinf(norm_type)) return NormKind::kInf;
  return NormKind::kOther;
}

at::Tensor grad_norm_partial(at::TensorList grads, double norm_type, const std::optional<at::Tensor>& grad_scale) {
  const NormKind kind = norm_kind(norm_type);
  const bool max = kind == NormKind::kInf;
  if (grads.empty()) return at::zeros({}, at::kFloat);
  TORCH_CHECK(grads[0].defined(), "grad_norm_partial: grads[0] is undefined");
  const c10::Device device = grads[0].device();
  TORCH_CHECK(device.is_cpu() || device.is_cuda(), "grad_norm_partial: grads[0] is on ", device,
              ", which has no kernel");
  check_amp_tensor(grad_scale, "grad_scale", device);
  std::array<Group, 4> groups;  // the dense real grads, one group per dtype
  at::Tensor other;             // the partial result of the rest (complex, strided), from ATen
  const at::Tensor inv_scale = grad_scale.has_value() ? grad_scale->reciprocal() : at::Tensor();
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.defined() && g.layout() == at::kStrided, "grad_norm_partial: grads[", i,
                "] is undefined or not strided");
    TORCH_CHECK(g.device() == device, "grad_norm_partial: grads[", i, "] is on ", g.device(), ", grads[0] on ",
                device, "; call once per device");
    const Dtype dtype = to_dtype(g.scalar_type(), i, "grad_norm_partial: grads");
    if (g.numel() == 0) continue;
    if (g.is_complex() || !g.is_non_overlapping_and_dense() || !plain(g)) {
      at::Tensor x = (g.is_complex() ? g.abs() : g).to(at::kFloat);
      if (inv_scale.defined()) x = x.mul(inv_scale);
      const at::Tensor part = max                       ? x.abs().amax()
                              : kind == NormKind::kTwo ? x.mul(x).sum()
                                                       : x.abs().pow(norm_type).sum();
      other = !other.defined() ? part : max ? at::maximum(other, part) : other.add(part);
      continue;
    }
    Group& group = groups[static_cast<int>(dtype)];
    group.kind.param = dtype;
    group.param_size = g.element_size();
    group.grad.push_back(const_cast<void*>(g.const_data_ptr()));
    group.numel.push_back(g.numel());
  }
  int64_t blocks = 0;
  for (const Group& group : groups) {
    for (const int64_t n : group.numel) blocks += chunks_of(n);
  }
  const float* inv = inv_scale.defined() ? inv_scale.const_data_ptr<float>() : nullptr;
  const KernelTable& table = kernels(device, "grad_norm_partial");
  // Each group's partial results, after the previous group's, into `out`.
  auto norms = [&](auto* out) {
    for (const Group& group : groups) {
      if (group.numel.empty()) continue;
      const GroupView view = group.view();
      check_kernels(table.norm(&view, kind, static_cast<float>(norm_type), inv, out, device.index()));
      for (const int64_t n : group.numel) out += chunks_of(n);
    }
  };
  at::Tensor result;
  if (device.is_cpu()) {
    thread_local std::vector<double> partials;  // (kept: its capacity serves the next steps, which allocate nothing)
    partials.assign(blocks, 0.0);
    norms(partials.data());
    double total = 0.0;  // (in block order: the same result for any thread count)
    for (const double v : partials) total = max ? norm_combine<NormKind::kInf>(total, v) : total + v;
    // (a sum beyond float's range is an infinite norm, as the float sums of the CUDA kernel and of torch make it)
    result = at::scalar_tensor(total > std::numeric_limits<float>::max() ? std::numeric_limits<double>::infinity()
                                                                         : total, at::kFloat);
  } else if (blocks > 0) {
    const at::Tensor partials = at::empty({blocks}, grads[0].options().dtype(at::kFloat));
    norms(partials.mutable_data_ptr<float>());
    result = max ? partials.amax() : partials.sum();
  }
  if (!result.defined()) result = at::zeros({}, grads[0].options().dtype(at::kFloat));
  if (other.defined()) result = max ? at::maximum(result, other) : result.add(other);
  return result;
}

std::tuple<at::Tensor, at::Tensor> clip_coef(const at::Tensor& partial, double max_norm, double norm_type) {
  const NormKind kind = norm_kind(norm_type);
  const at::Tensor norm = kind == NormKind::kTwo                              ? partial.sqrt()
                          : kind == NormKind::kOne || kind == NormKind::kInf ? partial
                                                                              : partial.pow(1.0 / norm_type);
  // torch.nn.utils.clip_grad_norm_'s arithmetic, roundings included (max_norm / t is t.reciprocal() * max_norm)
  const at::Tensor coef = norm.add(1e-6).reciprocal().mul(max_norm).clamp_max(1.0);
  return {norm, at::where(norm.isfinite(), coef, std::numeric_limits<float>::quiet_NaN())};
}

namespace {

// Test hook: the schedule as the kernels see it. One row per block: (launch, block, tensor, begin, end), where
// [begin, end) are the elements of `tensor` that the block updates. Computed with the kernels' own lookup.
at::Tensor plan(c10::ArrayRef<int64_t> numels, int64_t max_segments, int64_t max_blocks) {
  TORCH_CHECK(max_segments >= 1 && max_segments <= kMaxSegments, "_plan: max_segments must be in [1, ",
              kMaxSegments, "]");
  TORCH_CHECK(max_blocks >= 1 && max_blocks <= kMaxBlocks, "_plan: max_blocks must be in [1, ", kMaxBlocks, "]");
  for (const int64_t v : numels) TORCH_CHECK(v >= 0, "_plan: numels must be >= 0");
  std::vector<int64_t> rows;
  std::vector<Segment> segs(max_segments);
  std::vector<int32_t> block_start(max_segments + 1);
  std::vector<int64_t> seg_numel(max_segments);
  int64_t launch = 0;
  plan_launches(numels.data(), static_cast<int64_t>(numels.size()), max_segments, max_blocks, segs.data(),
                [&](const Segment* s, int64_t count, int64_t blocks) {
                  fill_block_start(s, count, block_start.data());
                  TORCH_CHECK(block_start[count] == blocks, "_plan: block count mismatch");
                  for (int64_t i = 0; i < count; ++i) seg_numel[i] = s[i].numel;
                  for (int64_t block = 0; block < blocks; ++block) {
                    const BlockWork w = block_work(block_start.data(), seg_numel.data(), static_cast<int>(count), block);
                    const Segment& seg = s[w.segment];
                    rows.insert(rows.end(), {launch, block, seg.tensor, seg.offset + w.begin, seg.offset + w.end});
                  }
                  ++launch;
                });
  const int64_t count = static_cast<int64_t>(rows.size()) / 5;
  at::Tensor out = at::empty({count, 5}, at::kLong);
  std::copy(rows.begin(), rows.end(), out.data_ptr<int64_t>());
  return out;
}

// What this build contains, for `python -m nag_cuda`: "cpu" or "cpu;cuda=<__CUDA_ARCH_LIST__>".
std::string build_info() {
  return cuda_kernels == nullptr ? "cpu" : std::string("cpu;cuda=") + cuda_kernels->compiled_for();
}

}  // namespace

void set_kernels(const KernelTable* cpu, const KernelTable* cuda) {
  cpu_kernels = cpu;
  cuda_kernels = cuda;
}

}  // namespace nag

TORCH_LIBRARY(nag_cuda, m) {
  m.def(
      "nag_step_(Tensor(a!)[] params, Tensor(c!)[] grads, Tensor(b!)[] momentum_buffers, bool[] is_first, "
      "float lr, float momentum, float weight_decay, bool maximize, *, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor(d!)[]? master_params=None, int? sr_seed=None, Tensor? grad_coef=None) -> ()");
  m.def(
      "nag_step_.tensor_lr(Tensor(a!)[] params, Tensor(c!)[] grads, Tensor(b!)[] momentum_buffers, bool[] is_first, "
      "Tensor lr, float momentum, float weight_decay, bool maximize, *, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor(d!)[]? master_params=None, int? sr_seed=None, Tensor? grad_coef=None) -> ()");
  m.def("_check_step(Tensor[] params, Tensor[] grads, Tensor[] momentum_buffers, bool[] is_first, Tensor? lr, *, "
        "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor[]? master_params=None, bool stochastic=False, "
        "Tensor? grad_coef=None) -> ()",
        &nag::check_step);
  // max_grad_norm: the partial result of one device's grads (sum of |g / grad_scale|^p, or the largest |g / grad_scale|
  // for p = inf), which sums (max) across devices and ranks; then the norm and clip_grad_norm_'s coefficient, NaN
  // where the norm is not finite.
  m.def("grad_norm_partial(Tensor[] grads, float norm_type, *, Tensor? grad_scale=None) -> Tensor");
  m.def("clip_coef(Tensor partial, float max_norm, float norm_type) -> (Tensor, Tensor)", &nag::clip_coef);
  m.def("_plan(int[] numels, int max_segments, int max_blocks) -> Tensor", &nag::plan);
  m.def("_build_info() -> str", &nag::build_info);
}

// The same kernels for every backend: they dispatch on the tensors' device themselves. A sparse gradient
// dispatches to the Sparse* keys, where nag_step's checks reject it with a clear message, before any write.
static void impl_step(torch::Library& m) {
  m.impl("nag_step_", &nag::nag_step);
  m.impl("nag_step_.tensor_lr", &nag::nag_step_tensor_lr);
  m.impl("grad_norm_partial", &nag::grad_norm_partial);
}

TORCH_LIBRARY_IMPL(nag_cuda, CPU, m) { impl_step(m); }
TORCH_LIBRARY_IMPL(nag_cuda, Autograd, m) {
  m.impl("nag_step_", TORCH_FN(nag::autograd_kernel<double>));
  m.impl("nag_step_.tensor_lr", TORCH_FN(nag::autograd_kernel<const at::Tensor&>));
}
TORCH_LIBRARY_IMPL(nag_cuda, ADInplaceOrView, m) {
  m.impl("nag_step_", TORCH_FN(nag::inplace_kernel<double>));
  m.impl("nag_step_.tensor_lr", TORCH_FN(nag::inplace_kernel<const at::Tensor&>));
}
// Conjugate and negative views reach the kernels as they are (torch's fallbacks refuse them in mutable lists);
// step_impl reads and writes their values through copies.
TORCH_LIBRARY_IMPL(nag_cuda, Conjugate, m) {
  m.impl("nag_step_", torch::CppFunction::makeFallthrough());
  m.impl("nag_step_.tensor_lr", torch::CppFunction::makeFallthrough());
}
TORCH_LIBRARY_IMPL(nag_cuda, Negative, m) {
  m.impl("nag_step_", torch::CppFunction::makeFallthrough());
  m.impl("nag_step_.tensor_lr", torch::CppFunction::makeFallthrough());
}
TORCH_LIBRARY_IMPL(nag_cuda, SparseCPU, m) { impl_step(m); }
#ifdef NAG_WITH_CUDA
TORCH_LIBRARY_IMPL(nag_cuda, CUDA, m) { impl_step(m); }
TORCH_LIBRARY_IMPL(nag_cuda, SparseCUDA, m) { impl_step(m); }
#endif
