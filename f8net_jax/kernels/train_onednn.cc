// Float32 2-D convolutions of the training step through oneDNN (forward, gradient of the
// input, gradient of the weights) and max pooling (forward with its argmax workspace,
// gradient), custom calls of the XLA FFI; see f8net_jax/train_onednn.py.
//
//   x:  f32 [N, H, W, C]          activations, NHWC (JAX's layout)
//   w:  f32 [KH, KW, C / G, O]    weights, HWIO (JAX's layout, G = feature groups)
//   y:  f32 [N, OH, OW, O]        y = conv(x, w), stride s, symmetric zero padding p
//
// oneDNN picks the kernel for this CPU (AVX2, AVX-512, AMX) and the weight layout it wants;
// the weights are reordered into that layout, activations stay NHWC. Primitives are built
// once per shape and kept in a cache (XLA calls a handler from several threads: the cache
// is locked, and every call brings its own scratchpad, so executions never share memory).

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

#if DNNL_VERSION_MAJOR < 3
#error "the training kernels need oneDNN 3 or later"
#endif

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using tag = dnnl::memory::format_tag;

enum Kind : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

struct Geometry {
  int64_t n, h, w, c, o, kh, kw, oh, ow, stride, pad, groups;

  std::array<int64_t, 13> Key(Kind kind) const {
    return {kind, n, h, w, c, o, kh, kw, oh, ow, stride, pad, groups};
  }
  memory::desc Activation(int64_t channels, int64_t height, int64_t width) const {
    return memory::desc({n, channels, height, width}, memory::data_type::f32, tag::nhwc);
  }
  memory::desc Src() const { return Activation(c, h, w); }
  memory::desc Dst() const { return Activation(o, oh, ow); }
  // HWIO as oneDNN sees it: {O, I, KH, KW} in hwio order, or grouped {G, O/G, I/G, KH, KW}
  // in hwigo order (JAX's output axis is g * O/G + o).
  memory::desc Weights(bool any) const {
    if (groups == 1) {
      return memory::desc({o, c, kh, kw}, memory::data_type::f32, any ? tag::any : tag::hwio);
    }
    return memory::desc({groups, o / groups, c / groups, kh, kw}, memory::data_type::f32,
                        any ? tag::any : tag::hwigo);
  }
  memory::dims Strides() const { return {stride, stride}; }
  memory::dims Padding() const { return {pad, pad}; }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::primitive_attr Attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      g.Src(), g.Weights(true), g.Dst(), g.Strides(), g.Padding(), g.Padding(), Attr());
}

// One cached convolution: the primitive and the weight reorder it needs (if any).
struct Entry {
  dnnl::primitive conv;
  memory::desc weights;       // the layout the primitive wants its (diff) weights in
  memory::desc scratchpad;
  bool reorder = false;       // weights differ from the user's HWIO layout
  dnnl::reorder weight_reorder;
};

std::shared_ptr<Entry> Build(Kind kind, const Geometry& g) {
  auto entry = std::make_shared<Entry>();
  const auto fwd = ForwardDesc(g);
  const memory::desc user = g.Weights(false);
  if (kind == kForward) {
    entry->conv = dnnl::convolution_forward(fwd);
    entry->weights = fwd.weights_desc();
    entry->scratchpad = fwd.scratchpad_desc();
  } else if (kind == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.Weights(true), g.Dst(),
        g.Strides(), g.Padding(), g.Padding(), fwd, Attr());
    entry->conv = dnnl::convolution_backward_data(pd);
    entry->weights = pd.weights_desc();
    entry->scratchpad = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.Weights(true), g.Dst(),
        g.Strides(), g.Padding(), g.Padding(), fwd, Attr());
    entry->conv = dnnl::convolution_backward_weights(pd);
    entry->weights = pd.diff_weights_desc();
    entry->scratchpad = pd.scratchpad_desc();
  }
  entry->reorder = entry->weights != user;
  if (entry->reorder) {
    const dnnl::engine& e = Engine();
    entry->weight_reorder = kind == kBackwardWeights
                                ? dnnl::reorder(dnnl::reorder::primitive_desc(
                                      e, entry->weights, e, user))
                                : dnnl::reorder(dnnl::reorder::primitive_desc(
                                      e, user, e, entry->weights));
  }
  return entry;
}

std::shared_ptr<Entry> Get(Kind kind, const Geometry& g) {
  static std::mutex mutex;
  static std::map<std::array<int64_t, 13>, std::shared_ptr<Entry>> cache;
  const auto key = g.Key(kind);
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto entry = Build(kind, g);  // outside the lock: building can take milliseconds
  std::lock_guard<std::mutex> lock(mutex);
  return cache.emplace(key, entry).first->second;
}

// Geometry from the shapes: x [N,H,W,C], w [KH,KW,C/G,O], y [N,OH,OW,O].
ffi::Error Shapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                  ffi::Span<const int64_t> y, int64_t stride, int64_t pad, int64_t groups,
                  Geometry* g) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4) {
    return ffi::Error::InvalidArgument("f8net_conv_f32: operands must have rank 4");
  }
  *g = Geometry{x[0], x[1], x[2], x[3], w[3], w[0], w[1], y[1], y[2], stride, pad, groups};
  const bool ok = groups >= 1 && stride >= 1 && pad >= 0 && g->c % groups == 0 &&
                  g->o % groups == 0 && w[2] * groups == g->c && y[0] == g->n &&
                  y[3] == g->o && g->oh == (g->h + 2 * pad - g->kh) / stride + 1 &&
                  g->ow == (g->w + 2 * pad - g->kw) / stride + 1;
  if (!ok) return ffi::Error::InvalidArgument("f8net_conv_f32: inconsistent shapes");
  return ffi::Error::Success();
}

// Runs the cached primitive: ``src``/``dst`` name the activation arguments of ``kind``;
// ``weights`` is the user's HWIO buffer (read, or written for the weight gradient).
ffi::Error Run(Kind kind, const Geometry& g, void* act_in, void* act_out, void* weights) {
  try {
    const auto entry = Get(kind, g);
    dnnl::engine& e = Engine();
    dnnl::stream stream(e);
    memory user(g.Weights(false), e, weights);
    memory wmem = entry->reorder ? memory(entry->weights, e) : user;
    memory scratch(entry->scratchpad, e);
    if (kind != kBackwardWeights && entry->reorder) {
      entry->weight_reorder.execute(stream, user, wmem);
    }
    if (kind == kForward) {
      entry->conv.execute(stream, {{DNNL_ARG_SRC, memory(g.Src(), e, act_in)},
                                   {DNNL_ARG_WEIGHTS, wmem},
                                   {DNNL_ARG_DST, memory(g.Dst(), e, act_out)},
                                   {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (kind == kBackwardData) {
      entry->conv.execute(stream, {{DNNL_ARG_DIFF_DST, memory(g.Dst(), e, act_in)},
                                   {DNNL_ARG_WEIGHTS, wmem},
                                   {DNNL_ARG_DIFF_SRC, memory(g.Src(), e, act_out)},
                                   {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      // act_in: the layer's input x, act_out: the output gradient dy (both read).
      entry->conv.execute(stream, {{DNNL_ARG_SRC, memory(g.Src(), e, act_in)},
                                   {DNNL_ARG_DIFF_DST, memory(g.Dst(), e, act_out)},
                                   {DNNL_ARG_DIFF_WEIGHTS, wmem},
                                   {DNNL_ARG_SCRATCHPAD, scratch}});
      if (entry->reorder) entry->weight_reorder.execute(stream, wmem, user);
    }
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("f8net_conv_f32 (oneDNN): ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t pad, int64_t groups) {
  Geometry g;
  if (auto err = Shapes(x.dimensions(), w.dimensions(), y->dimensions(), stride, pad, groups,
                        &g);
      err.failure()) {
    return err;
  }
  return Run(kForward, g, x.untyped_data(), y->untyped_data(), w.untyped_data());
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t pad,
                        int64_t groups) {
  Geometry g;
  if (auto err = Shapes(dx->dimensions(), w.dimensions(), dy.dimensions(), stride, pad, groups,
                        &g);
      err.failure()) {
    return err;
  }
  return Run(kBackwardData, g, dy.untyped_data(), dx->untyped_data(), w.untyped_data());
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t pad,
                           int64_t groups) {
  Geometry g;
  if (auto err = Shapes(x.dimensions(), dw->dimensions(), dy.dimensions(), stride, pad, groups,
                        &g);
      err.failure()) {
    return err;
  }
  return Run(kBackwardWeights, g, x.untyped_data(), dy.untyped_data(), dw->untyped_data());
}

// ------------------------------------------------------------------------------------
// Max pooling: x [N, H, W, C] -> y [N, OH, OW, C], window k, stride s, padding p (padded
// positions never win). The forward also writes oneDNN's workspace (which position won,
// the first maximum in window order), which the gradient reads.

struct Pool {
  int64_t n, h, w, c, oh, ow, k, s, p;
  memory::desc Src() const {
    return memory::desc({n, c, h, w}, memory::data_type::f32, tag::nhwc);
  }
  memory::desc Dst() const {
    return memory::desc({n, c, oh, ow}, memory::data_type::f32, tag::nhwc);
  }
  dnnl::pooling_forward::primitive_desc Forward() const {
    return dnnl::pooling_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_max, Src(),
        Dst(), {s, s}, {k, k}, {0, 0}, {p, p}, {p, p}, Attr());
  }
  dnnl::pooling_backward::primitive_desc Backward(
      const dnnl::pooling_forward::primitive_desc& hint) const {
    return dnnl::pooling_backward::primitive_desc(
        Engine(), dnnl::algorithm::pooling_max, Src(), Dst(), {s, s}, {k, k}, {0, 0},
        {p, p}, {p, p}, hint, Attr());
  }
};

struct PoolEntry {
  dnnl::pooling_forward forward;
  dnnl::pooling_backward backward;
  memory::desc workspace, forward_scratch, backward_scratch;
};

std::shared_ptr<PoolEntry> GetPool(const Pool& g) {
  static std::mutex mutex;
  static std::map<std::array<int64_t, 9>, std::shared_ptr<PoolEntry>> cache;
  const std::array<int64_t, 9> key{g.n, g.h, g.w, g.c, g.oh, g.ow, g.k, g.s, g.p};
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto entry = std::make_shared<PoolEntry>();
  const auto fwd = g.Forward();
  const auto bwd = g.Backward(fwd);
  entry->forward = dnnl::pooling_forward(fwd);
  entry->backward = dnnl::pooling_backward(bwd);
  entry->workspace = fwd.workspace_desc();
  entry->forward_scratch = fwd.scratchpad_desc();
  entry->backward_scratch = bwd.scratchpad_desc();
  std::lock_guard<std::mutex> lock(mutex);
  return cache.emplace(key, entry).first->second;
}

ffi::Error PoolShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> y, int64_t window,
                      int64_t stride, int64_t pad, Pool* g) {
  if (x.size() != 4 || y.size() != 4) {
    return ffi::Error::InvalidArgument("f8net_max_pool: operands must have rank 4");
  }
  *g = Pool{x[0], x[1], x[2], x[3], y[1], y[2], window, stride, pad};
  const bool ok = window >= 1 && stride >= 1 && pad >= 0 && pad < window && y[0] == x[0] &&
                  y[3] == x[3] && g->oh == (g->h + 2 * pad - window) / stride + 1 &&
                  g->ow == (g->w + 2 * pad - window) / stride + 1;
  if (!ok) return ffi::Error::InvalidArgument("f8net_max_pool: inconsistent shapes");
  return ffi::Error::Success();
}

ffi::Error PoolForward(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::U8> workspace, int64_t window, int64_t stride,
                       int64_t pad) {
  Pool g;
  if (auto err = PoolShapes(x.dimensions(), y->dimensions(), window, stride, pad, &g);
      err.failure()) {
    return err;
  }
  try {
    const auto entry = GetPool(g);
    if (workspace->size_bytes() != entry->workspace.get_size()) {
      return ffi::Error::InvalidArgument("f8net_max_pool: wrong workspace size");
    }
    dnnl::engine& e = Engine();
    dnnl::stream stream(e);
    entry->forward.execute(stream, {{DNNL_ARG_SRC, memory(g.Src(), e, x.untyped_data())},
                                    {DNNL_ARG_DST, memory(g.Dst(), e, y->untyped_data())},
                                    {DNNL_ARG_WORKSPACE,
                                     memory(entry->workspace, e, workspace->untyped_data())},
                                    {DNNL_ARG_SCRATCHPAD, memory(entry->forward_scratch, e)}});
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("f8net_max_pool (oneDNN): ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error PoolBackward(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::U8> workspace,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t window, int64_t stride,
                        int64_t pad) {
  Pool g;
  if (auto err = PoolShapes(dx->dimensions(), dy.dimensions(), window, stride, pad, &g);
      err.failure()) {
    return err;
  }
  try {
    const auto entry = GetPool(g);
    if (workspace.size_bytes() != entry->workspace.get_size()) {
      return ffi::Error::InvalidArgument("f8net_max_pool: wrong workspace size");
    }
    dnnl::engine& e = Engine();
    dnnl::stream stream(e);
    entry->backward.execute(
        stream, {{DNNL_ARG_DIFF_DST, memory(g.Dst(), e, dy.untyped_data())},
                 {DNNL_ARG_WORKSPACE, memory(entry->workspace, e, workspace.untyped_data())},
                 {DNNL_ARG_DIFF_SRC, memory(g.Src(), e, dx->untyped_data())},
                 {DNNL_ARG_SCRATCHPAD, memory(entry->backward_scratch, e)}});
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("f8net_max_pool (oneDNN): ") + err.what());
  }
  return ffi::Error::Success();
}

}  // namespace

#define F8NET_CONV_BINDING                      \
  ffi::Ffi::Bind()                              \
      .Arg<ffi::Buffer<ffi::F32>>()             \
      .Arg<ffi::Buffer<ffi::F32>>()             \
      .Ret<ffi::Buffer<ffi::F32>>()             \
      .Attr<int64_t>("stride")                  \
      .Attr<int64_t>("pad")                     \
      .Attr<int64_t>("groups")

XLA_FFI_DEFINE_HANDLER_SYMBOL(F8netConvF32Forward, Forward, F8NET_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(F8netConvF32BackwardData, BackwardData,
                              F8NET_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(F8netConvF32BackwardWeights, BackwardWeights,
                              F8NET_CONV_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(F8netMaxPoolForward, PoolForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(F8netMaxPoolBackward, PoolBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad"));

// Bytes of the max pool's workspace for geometry {n, h, w, c, oh, ow, k, s, p}; -1 on error.
extern "C" int64_t F8netMaxPoolWorkspaceBytes(const int64_t* v) {
  try {
    return static_cast<int64_t>(
        GetPool(Pool{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]})->workspace.get_size());
  } catch (const dnnl::error&) {
    return -1;
  }
}
