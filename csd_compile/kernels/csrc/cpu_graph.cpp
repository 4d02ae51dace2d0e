// A compiled CPU step replayed from C++: the kernels Inductor's Python wrapper called once, called
// again in the same order on the same buffers, with no Python in between (csd_compile/cpu_graph.py
// records them and explains when a step may be replayed).
//
// A decode step of a small model runs ~300 kernels a token, each a few microseconds of work; the
// Python wrapper around them (argument parsing, views, allocations, frees) costs as much again.
// Recorded once, the step is a list of three kinds of calls:
//   - Inductor's generated C++ kernels, `extern "C" void kernel(...)` taking pointers (and int64
//     sizes): called through their address with the recorded argument words;
//   - this extension's quantized linears and decode attention, writing into the outputs the
//     recording call allocated;
//   - Python calls with their recorded arguments: Inductor's extern kernels that write into an
//     `out=` buffer (a GEMM), C++ kernels with floating-point arguments (which travel in other
//     registers), and ATen fallbacks that return new tensors (copied into the ones the recording
//     call returned, which the later steps read).
// Graph inputs are checked before each replay: the ones read in place must still be at the recorded
// addresses; small ones are copied into the graph's own buffers (the token, its position). A caller
// that passes the same tensors at every call binds them once (bind, run_bound: a Binding holds them,
// and a replay then reads no Python object).

#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

namespace csd_cpu {
void qlinear_cpu_multi_into(const at::Tensor& x, at::TensorList qdata, at::TensorList scale, at::TensorList zero,
                            at::TensorList bits, const std::vector<at::Tensor>& outs);  // qlinear_cpu.cpp
void decode_attention_into(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                           const c10::optional<at::Tensor>& attn_mask, double scale,
                           const at::Tensor& out);  // attention_cpu.cpp
}  // namespace csd_cpu

namespace {

namespace py = pybind11;

// A C function whose arguments are all pointers or 64-bit integers, called with n argument words.
// Pointers and 64-bit integers are passed alike (the same registers, then 8-byte stack slots) by the
// x86-64 System V and Windows conventions and by AArch64's, so one signature per arity serves every
// such kernel.
using Word = int64_t;
constexpr size_t kMaxWords = 48;

template <size_t... I>
void call_words_impl(void* fn, const Word* w, std::index_sequence<I...>) {
  using Fn = void (*)(decltype((void)I, Word{})...);
  reinterpret_cast<Fn>(fn)(w[I]...);
}

template <size_t N>
void call_words(void* fn, const Word* w) {
  call_words_impl(fn, w, std::make_index_sequence<N>{});
}

template <size_t... N>
constexpr std::array<void (*)(void*, const Word*), sizeof...(N)> word_callers(std::index_sequence<N...>) {
  return {&call_words<N>...};
}

constexpr auto kCallers = word_callers(std::make_index_sequence<kMaxWords + 1>{});

// Metadata prefetch. A decode step streams ~100 MB of weights through the caches, so by the next
// replay every tensor's TensorImpl and StorageImpl (sizes, strides, dtype, data pointer: what the
// quantized linear and attention calls check and read) is back in memory, and each call would wait
// on a chain of misses for them, one tensor after another (~16 tensors per grouped linear). The
// replay fetches them ahead instead: the step's graph inputs in a few rounds of independent
// prefetches before checking them, and each call's records and tensors while earlier calls run.
// (CpuGraph.set_prefetch(False) turns it off, for A/B measurements.)
std::atomic<bool> g_prefetch{true};

template <typename T>
inline void prefetch_object(const T* p) {
  const char* c = reinterpret_cast<const char*>(p);
  for (size_t off = 0; off < sizeof(T); off += 64) __builtin_prefetch(c + off);
}

// The lines a call reads of one tensor's metadata: its TensorImpl and StorageImpl, and (`value`) the
// first line of its data, for the runtime bit-width tensors a quantized linear reads on the host.
void add_meta(std::vector<const void*>& meta, const at::Tensor& t, bool value = false) {
  if (!t.defined()) return;
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  for (size_t off = 0; off < sizeof(c10::TensorImpl); off += 64) meta.push_back(reinterpret_cast<const char*>(impl) + off);
  if (t.has_storage()) {
    const c10::StorageImpl* st = t.storage().unsafeGetStorageImpl();
    for (size_t off = 0; off < sizeof(c10::StorageImpl); off += 64) meta.push_back(reinterpret_cast<const char*>(st) + off);
    if (value && t.const_data_ptr() != nullptr) meta.push_back(t.const_data_ptr());
  }
}

struct Step {
  enum Kind { kKernel, kQlinear, kAttention, kPython, kPythonInto };
  explicit Step(Kind k) : kind(k) {}
  Kind kind;
  // kKernel
  void* fn = nullptr;
  std::vector<Word> words;
  // kQlinear
  at::Tensor x;
  std::vector<at::Tensor> qdata, scale, zero, bits, outs;
  // kAttention
  at::Tensor q, k, v, out;
  c10::optional<at::Tensor> mask;
  double sm_scale = 0.0;
  // kPython, kPythonInto (whose call returns new tensors: copied into `outs`)
  py::object pyfn;
  py::tuple pyargs;
  py::dict pykwargs;
  // kQlinear, kAttention: the metadata lines the call reads (fetched while earlier calls run)
  std::vector<const void*> meta;
};

// A call's record is read in three dependent steps, each fetched a call before the next needs it:
// the Step itself, then the arrays it points to (metadata addresses, argument words), then the
// metadata lines those addresses name.
void prefetch_arrays(const Step& s) {
  const char* m = reinterpret_cast<const char*>(s.meta.data());
  for (size_t off = 0; off < s.meta.size() * sizeof(void*); off += 64) __builtin_prefetch(m + off);
  const char* w = reinterpret_cast<const char*>(s.words.data());
  for (size_t off = 0; off < s.words.size() * sizeof(Word); off += 64) __builtin_prefetch(w + off);
}

void prefetch_targets(const Step& s) {
  for (const void* p : s.meta) __builtin_prefetch(p);
}

const at::Tensor& unpack(PyObject* obj);

// A replayed call's result (a tensor, or a tuple or list of them) into the recorded outputs.
void copy_results(const py::object& result, const std::vector<at::Tensor>& outs) {
  std::vector<PyObject*> items;
  if (THPVariable_Check(result.ptr())) {
    items.push_back(result.ptr());
  } else if (PyTuple_Check(result.ptr()) || PyList_Check(result.ptr())) {
    for (const auto& item : result) items.push_back(item.ptr());
  }
  TORCH_CHECK(items.size() == outs.size(), "csd CPU graph: a replayed call returned ", items.size(),
              " tensors where its recording returned ", outs.size());
  for (size_t i = 0; i < items.size(); ++i) {
    const at::Tensor& t = unpack(items[i]);
    TORCH_CHECK(t.sizes() == outs[i].sizes(), "csd CPU graph: a replayed call returned a tensor of shape ",
                t.sizes(), " where its recording returned ", outs[i].sizes());
    if (!t.is_same(outs[i])) outs[i].copy_(t);
  }
}

const at::Tensor& unpack(PyObject* obj) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), "csd CPU graph: expected a tensor, got ", Py_TYPE(obj)->tp_name);
  return THPVariable_Unpack(obj);
}

class CpuGraph;

// A graph's inputs held for CpuGraph::run_bound: the tensors read in place (in the order of
// CpuGraph::pinned_) and the ones copied in (in the order of CpuGraph::copied_).
struct Binding {
  const CpuGraph* graph = nullptr;
  std::vector<at::Tensor> pinned, sources;
};

class CpuGraph {
 public:
  void add_kernel(uintptr_t fn, std::vector<Word> words) {
    TORCH_CHECK_VALUE(fn != 0 && words.size() <= kMaxWords, "csd CPU graph: a kernel needs an address and at most ",
                      kMaxWords, " argument words, got ", words.size());
    Step s(Step::kKernel);
    s.fn = reinterpret_cast<void*>(fn);
    s.words = std::move(words);
    steps_.push_back(std::move(s));
  }

  void add_qlinear(at::Tensor x, std::vector<at::Tensor> qdata, std::vector<at::Tensor> scale,
                   std::vector<at::Tensor> zero, std::vector<at::Tensor> bits, std::vector<at::Tensor> outs) {
    Step s(Step::kQlinear);
    s.x = std::move(x);
    s.qdata = std::move(qdata), s.scale = std::move(scale), s.zero = std::move(zero), s.bits = std::move(bits);
    s.outs = std::move(outs);
    add_meta(s.meta, s.x);
    for (const auto* list : {&s.qdata, &s.scale, &s.zero, &s.outs})
      for (const at::Tensor& t : *list) add_meta(s.meta, t);
    for (const at::Tensor& t : s.bits) add_meta(s.meta, t, /*value=*/true);
    steps_.push_back(std::move(s));
  }

  void add_attention(at::Tensor q, at::Tensor k, at::Tensor v, c10::optional<at::Tensor> mask, double scale,
                     at::Tensor out) {
    Step s(Step::kAttention);
    s.q = std::move(q), s.k = std::move(k), s.v = std::move(v), s.mask = std::move(mask), s.out = std::move(out);
    s.sm_scale = scale;
    for (const at::Tensor* t : {&s.q, &s.k, &s.v, &s.out}) add_meta(s.meta, *t);
    if (s.mask.has_value()) add_meta(s.meta, *s.mask);
    steps_.push_back(std::move(s));
  }

  void add_python(py::object fn, py::tuple args, py::dict kwargs) {
    Step s(Step::kPython);
    s.pyfn = std::move(fn);
    s.pyargs = std::move(args);
    s.pykwargs = std::move(kwargs);
    steps_.push_back(std::move(s));
  }

  // a call that returns new tensors (an ATen fallback): each replay copies them into `outs`, the
  // tensors the recording call returned, which the later steps read
  void add_python_into(py::object fn, py::tuple args, py::dict kwargs, std::vector<at::Tensor> outs) {
    Step s(Step::kPythonInto);
    s.pyfn = std::move(fn);
    s.pyargs = std::move(args);
    s.pykwargs = std::move(kwargs);
    s.outs = std::move(outs);
    steps_.push_back(std::move(s));
  }

  // inputs read in place: (position, the address recorded)
  void pin_input(int64_t index, uintptr_t address) { pinned_.emplace_back(index, address); }

  // inputs copied into the graph's buffer before each replay: (position, buffer)
  void copy_input(int64_t index, at::Tensor buffer) {
    TORCH_CHECK_VALUE(buffer.is_contiguous(), "csd CPU graph: an input buffer must be contiguous");
    copied_.emplace_back(index, std::move(buffer));
  }

  int64_t num_inputs() const { return num_inputs_; }
  void set_num_inputs(int64_t n) { num_inputs_ = n; }
  size_t size() const { return steps_.size(); }

  // Replays the step on `args` (the graph's inputs); false, having run nothing, when an input read
  // in place has moved or one copied in does not match its buffer (the caller records again).
  bool run(const py::list& args, bool timed) {
    PyObject* list = args.ptr();
    if (PyList_GET_SIZE(list) != num_inputs_) return false;
    const bool prefetch = g_prefetch.load(std::memory_order_relaxed);
    if (prefetch) {  // the pinned inputs' objects, then their TensorImpls, then their StorageImpls
      for (const auto& entry : pinned_) prefetch_object(PyList_GET_ITEM(list, entry.first));
      for (const auto& entry : pinned_) {
        PyObject* obj = PyList_GET_ITEM(list, entry.first);
        if (THPVariable_Check(obj)) prefetch_object(THPVariable_Unpack(obj).unsafeGetTensorImpl());
      }
      for (const auto& entry : pinned_) {
        PyObject* obj = PyList_GET_ITEM(list, entry.first);
        if (THPVariable_Check(obj)) {
          const at::Tensor& t = THPVariable_Unpack(obj);
          if (t.has_storage()) prefetch_object(t.storage().unsafeGetStorageImpl());
        }
      }
      prefetch_first_steps();
    }
    for (const auto& [index, address] : pinned_) {
      PyObject* obj = PyList_GET_ITEM(list, index);
      if (!THPVariable_Check(obj) ||
          reinterpret_cast<uintptr_t>(THPVariable_Unpack(obj).const_data_ptr()) != address)
        return false;
    }
    for (const auto& [index, buffer] : copied_) {
      PyObject* obj = PyList_GET_ITEM(list, index);
      if (!THPVariable_Check(obj) || !fits(THPVariable_Unpack(obj), buffer)) return false;
    }
    for (const auto& [index, buffer] : copied_) copy_in(unpack(PyList_GET_ITEM(list, index)), buffer);
    run_steps(prefetch, timed);
    return true;
  }

  // The inputs of `args` held in C++ for run_bound: for a caller that passes the very same tensors at
  // every call (a decoding loop), which then skips the Python list and the objects in it. None when
  // `args` would not replay (an input moved or does not fit its buffer).
  std::optional<Binding> bind(const py::list& args) const {
    PyObject* list = args.ptr();
    if (PyList_GET_SIZE(list) != num_inputs_) return std::nullopt;
    Binding b;
    b.graph = this;
    for (const auto& [index, address] : pinned_) {
      PyObject* obj = PyList_GET_ITEM(list, index);
      if (!THPVariable_Check(obj)) return std::nullopt;
      const at::Tensor& t = THPVariable_Unpack(obj);
      if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) != address) return std::nullopt;
      b.pinned.push_back(t);
    }
    for (const auto& [index, buffer] : copied_) {
      PyObject* obj = PyList_GET_ITEM(list, index);
      if (!THPVariable_Check(obj) || !fits(THPVariable_Unpack(obj), buffer)) return std::nullopt;
      b.sources.push_back(THPVariable_Unpack(obj));
    }
    return b;
  }

  // Replays the step on the inputs `b` holds, with the same checks as run(); false, having run
  // nothing, when one fails (or `b` was bound to another graph).
  bool run_bound(const Binding& b) {
    if (b.graph != this || b.pinned.size() != pinned_.size() || b.sources.size() != copied_.size()) return false;
    const bool prefetch = g_prefetch.load(std::memory_order_relaxed);
    if (prefetch) {  // the inputs' TensorImpls, then their StorageImpls
      for (const at::Tensor& t : b.pinned) prefetch_object(t.unsafeGetTensorImpl());
      for (const at::Tensor& t : b.pinned)
        if (t.has_storage()) prefetch_object(t.storage().unsafeGetStorageImpl());
      prefetch_first_steps();
    }
    for (size_t i = 0; i < pinned_.size(); ++i)
      if (reinterpret_cast<uintptr_t>(b.pinned[i].const_data_ptr()) != pinned_[i].second) return false;
    for (size_t i = 0; i < copied_.size(); ++i)
      if (!fits(b.sources[i], copied_[i].second)) return false;
    for (size_t i = 0; i < copied_.size(); ++i) copy_in(b.sources[i], copied_[i].second);
    run_steps(prefetch, /*timed=*/false);
    return true;
  }

  // A greedy decoding loop on the inputs `b` holds: up to tokens.numel() replays, each followed by
  // reading the token the replay wrote to `out` (one int64) into `tokens`, adding 1 to the bound
  // input `count` (the position) and, unless the token is one of `stop` or the last asked for,
  // writing it to the bound input `feed` for the next replay; `each` (unless None) is called with
  // each token as it comes (a streamer). Each replay checks its inputs as run_bound does; between
  // replays other threads may take the GIL and pending signals are raised (Ctrl-C). Returns how many
  // replays ran: fewer than asked, without a stop token, when a check failed (the caller goes on
  // without the binding).
  int64_t run_bound_loop(const Binding& b, const at::Tensor& tokens, const at::Tensor& out, const at::Tensor& feed,
                         const at::Tensor& count, const std::vector<int64_t>& stop, const py::object& each) {
    auto int64_scalar = [](const at::Tensor& t) {
      return t.scalar_type() == at::kLong && t.numel() == 1 && t.device().is_cpu();
    };
    auto bound_source = [&](const at::Tensor& t) {
      for (const at::Tensor& src : b.sources)
        if (src.is_same(t)) return true;
      return false;
    };
    TORCH_CHECK_VALUE(int64_scalar(out) && int64_scalar(feed) && int64_scalar(count),
                      "csd CPU graph loop: the output, feed and count must be one-element int64 CPU tensors");
    TORCH_CHECK_VALUE(bound_source(feed) && bound_source(count),
                      "csd CPU graph loop: feed and count must be inputs copied in from the binding");
    TORCH_CHECK_VALUE(tokens.scalar_type() == at::kLong && tokens.dim() == 1 && tokens.is_contiguous() &&
                          tokens.device().is_cpu(),
                      "csd CPU graph loop: tokens must be a contiguous 1-d int64 CPU tensor");
    int64_t* dst = tokens.mutable_data_ptr<int64_t>();
    const int64_t n = tokens.numel();
    for (int64_t t = 0; t < n; ++t) {
      if (!run_bound(b)) return t;
      const int64_t token = *out.const_data_ptr<int64_t>();
      dst[t] = token;
      *count.mutable_data_ptr<int64_t>() += 1;
      if (!each.is_none()) each(token);
      if (std::find(stop.begin(), stop.end(), token) != stop.end()) return t + 1;
      if (t + 1 == n) return n;
      *feed.mutable_data_ptr<int64_t>() = token;
      { py::gil_scoped_release let_others_run; }
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    }
    return n;
  }

  // seconds spent in each step over the timed replays (diagnostics: where a replayed step goes)
  std::vector<double> step_seconds() const { return seconds_; }

 private:
  static bool fits(const at::Tensor& src, const at::Tensor& buffer) {
    return src.scalar_type() == buffer.scalar_type() && src.sizes() == buffer.sizes() && src.device().is_cpu();
  }

  static void copy_in(const at::Tensor& src, const at::Tensor& buffer) {
    if (src.is_contiguous())
      std::memcpy(buffer.mutable_data_ptr(), src.const_data_ptr(), buffer.nbytes());
    else
      buffer.copy_(src);
  }

  void prefetch_first_steps() const {
    const size_t n = steps_.size();
    for (size_t i = 0; i < n && i < 4; ++i) prefetch_object(&steps_[i]);
    for (size_t i = 0; i < n && i < 3; ++i) prefetch_arrays(steps_[i]);
    for (size_t i = 0; i < n && i < 2; ++i) prefetch_targets(steps_[i]);
  }

  void run_steps(bool prefetch, bool timed) {
    if (timed && seconds_.size() != steps_.size()) seconds_.assign(steps_.size(), 0.0);
    for (size_t i = 0; i < steps_.size(); ++i) {
      Step& s = steps_[i];
      if (prefetch) {
        if (i + 4 < steps_.size()) prefetch_object(&steps_[i + 4]);
        if (i + 3 < steps_.size()) prefetch_arrays(steps_[i + 3]);
        if (i + 2 < steps_.size()) prefetch_targets(steps_[i + 2]);
      }
      const auto t0 = timed ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
      switch (s.kind) {
        case Step::kKernel:
          kCallers[s.words.size()](s.fn, s.words.data());
          break;
        case Step::kQlinear:
          csd_cpu::qlinear_cpu_multi_into(s.x, s.qdata, s.scale, s.zero, s.bits, s.outs);
          break;
        case Step::kAttention:
          csd_cpu::decode_attention_into(s.q, s.k, s.v, s.mask, s.sm_scale, s.out);
          break;
        case Step::kPython:
          s.pyfn(*s.pyargs, **s.pykwargs);
          break;
        case Step::kPythonInto:
          copy_results(s.pyfn(*s.pyargs, **s.pykwargs), s.outs);
          break;
      }
      if (timed) seconds_[i] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
  }

  std::vector<Step> steps_;
  std::vector<std::pair<int64_t, uintptr_t>> pinned_;
  std::vector<std::pair<int64_t, at::Tensor>> copied_;
  int64_t num_inputs_ = 0;
  std::vector<double> seconds_;
};

}  // namespace

namespace csd_cpu {
void bind_cpu_graph(py::module& m) {
  py::class_<Binding>(m, "CpuGraphBinding", "a CPU graph's inputs, held for CpuGraph.run_bound");
  py::class_<CpuGraph>(m, "CpuGraph", "a recorded CPU step, replayed from C++ (csd_compile/cpu_graph.py)")
      .def(py::init<>())
      .def("add_kernel", &CpuGraph::add_kernel)
      .def("add_qlinear", &CpuGraph::add_qlinear)
      .def("add_attention", &CpuGraph::add_attention)
      .def("add_python", &CpuGraph::add_python)
      .def("add_python_into", &CpuGraph::add_python_into)
      .def("pin_input", &CpuGraph::pin_input)
      .def("copy_input", &CpuGraph::copy_input)
      .def("set_num_inputs", &CpuGraph::set_num_inputs)
      .def_property_readonly("num_inputs", &CpuGraph::num_inputs)
      .def("__len__", &CpuGraph::size)
      .def("run", &CpuGraph::run, py::arg("args"), py::arg("timed") = false)
      .def("bind", &CpuGraph::bind, py::arg("args"))
      .def("run_bound", &CpuGraph::run_bound, py::arg("binding"))
      .def("run_bound_loop", &CpuGraph::run_bound_loop, py::arg("binding"), py::arg("tokens"), py::arg("out"),
           py::arg("feed"), py::arg("count"), py::arg("stop"), py::arg("each") = py::none())
      .def("step_seconds", &CpuGraph::step_seconds)
      .def_static(
          "set_prefetch", [](bool on) { return g_prefetch.exchange(on); }, py::arg("on"),
          "fetch each call's record and tensor metadata ahead of it (the default, True); returns the previous "
          "setting");
  m.attr("cpu_graph_max_words") = kMaxWords;
}
}  // namespace csd_cpu
