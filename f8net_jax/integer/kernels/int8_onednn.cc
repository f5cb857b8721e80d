// Integer convolutions and inner products of the executor through oneDNN, custom calls of
// the XLA FFI; see f8net_jax/integer/onednn.py.
//
//   x: u8 or s8 [N, H, W, C] (conv) or [N, C] (dense)   8-bit activations, true values
//   w: u8 bytes                                          int8 weights, packed (below)
//   y: s32 [N, OH, OW, O] or [N, O]                      y = sum of x * w, int32
//
// oneDNN is asked for int8 x int8 -> int32 with no scales, no zero points, no bias and no
// post-ops, so what it computes is the integer sum of 8-bit products (it picks AMX int8
// tiles, AVX-512 VNNI or AVX2 VNNI for this CPU). Zero padding is the value 0 in both
// source types. The bias add and requantization stay in the executor.
//
// Only implementations whose int8 dot products are exact are used: AMX int8 tiles and
// VNNI (AVX-512 or AVX2), which sum u8 x s8 products straight into int32. Others (the
// reference loops 'ref:any', or AVX2/AVX-512 kernels without VNNI, whose vpmaddubsw adds
// pairs of products in int16 with saturation) are skipped: the primitive for a layer is
// the first exact one oneDNN offers (primitive_desc::next_impl), or none, and the caller
// then computes that layer another way. Which one runs is decided per geometry, batch
// included, and so is the weight layout: oneDNN's kernels for batch 1 and batch 64 may
// want different layouts, and a layout forced from another batch is what sends oneDNN to
// its reference loops.
//
// Weights are packed by the caller for the layer at the batch it will run
// (F8netInt8Pack), from the program's HWIO (dense: [C, O]) int8 layout into the layout of
// that primitive (with the compensation terms it needs for an int8 source); the call
// checks the packed size and the layout's index, which the caller passes with them. Primitives are cached per geometry (the cache is locked: XLA
// may call from several threads). Each thread has its own scratchpad, kept between calls
// and grown as needed (Scratch), so concurrent calls never share one.

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

#if DNNL_VERSION_MAJOR < 3
#error "the integer kernels need oneDNN 3 or later"
#endif

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

enum Kind : int64_t { kConv = 0, kDense = 1 };

// One layer: kind, batch, input height/width/channels, output channels, kernel, output
// height/width, stride, padding, groups, whether the source is int8 (else uint8). Dense
// layers have h = w = kh = kw = oh = ow = stride = groups = 1, pad = 0.
struct Layer {
  int64_t kind, n, h, w, c, o, kh, kw, oh, ow, stride, pad, groups, src_signed;

  std::array<int64_t, 14> Key() const {
    return {kind, n, h, w, c, o, kh, kw, oh, ow, stride, pad, groups, src_signed};
  }
  dt SrcType() const { return src_signed ? dt::s8 : dt::u8; }
  memory::desc Src() const {
    if (kind == kDense) return memory::desc({n, c}, SrcType(), tag::nc);
    return memory::desc({n, c, h, w}, SrcType(), tag::nhwc);
  }
  memory::desc Dst() const {
    if (kind == kDense) return memory::desc({n, o}, dt::s32, tag::nc);
    return memory::desc({n, o, oh, ow}, dt::s32, tag::nhwc);
  }
  // The program's layout as oneDNN sees it: HWIO is {O, I, KH, KW} in hwio order, grouped
  // {G, O/G, I/G, KH, KW} in hwigo order (output channel g * O/G + o); dense [C, O] is
  // {O, C} in io order.
  memory::desc UserWeights() const {
    if (kind == kDense) return memory::desc({o, c}, dt::s8, tag::io);
    if (groups == 1) return memory::desc({o, c, kh, kw}, dt::s8, tag::hwio);
    return memory::desc({groups, o / groups, c / groups, kh, kw}, dt::s8, tag::hwigo);
  }
  memory::desc AnyWeights() const {
    const auto user = UserWeights();
    return memory::desc(user.get_dims(), dt::s8, tag::any);
  }
  bool Valid() const {
    return n >= 1 && c >= 1 && o >= 1 && groups >= 1 && c % groups == 0 &&
           o % groups == 0 && stride >= 1 && pad >= 0 && kh >= 1 && kw >= 1 &&
           oh == (h + 2 * pad - kh) / stride + 1 && ow == (w + 2 * pad - kw) / stride + 1 &&
           oh >= 1 && ow >= 1 && (src_signed == 0 || src_signed == 1);
  }
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

struct Entry {
  bool exact = false;        // an exact implementation was found (else: offered lists all)
  dnnl::primitive primitive;
  memory::desc weights, scratchpad;
  std::string impl;          // the implementation used, or every one offered
  int64_t layout = -1;       // the weight layout's index in Layouts()
};

// Whether an implementation's int8 products are summed exactly: AMX int8 or VNNI.
bool ExactInt8(const std::string& impl) {
  return impl.find("amx") != std::string::npos || impl.find("vnni") != std::string::npos;
}

// The weight layouts seen so far (equal descs, one index): packed weights of two batches
// with the same layout are one array.
int64_t LayoutIndex(const memory::desc& d) {
  static std::mutex mutex;
  static std::vector<memory::desc> layouts;
  std::lock_guard<std::mutex> lock(mutex);
  for (size_t i = 0; i < layouts.size(); ++i) {
    if (layouts[i] == d) return static_cast<int64_t>(i);
  }
  layouts.push_back(d);
  return static_cast<int64_t>(layouts.size() - 1);
}

// The first exact implementation oneDNN offers for ``g`` (weights in the layout it
// prefers), or the list of every one it offers.
template <typename PrimitiveDesc, typename Primitive>
void Choose(PrimitiveDesc pd, Entry* entry) {
  std::string offered;
  do {
    const std::string impl = pd.impl_info_str();
    if (ExactInt8(impl)) {
      entry->exact = true;
      entry->primitive = Primitive(pd);
      entry->weights = pd.weights_desc();
      entry->scratchpad = pd.scratchpad_desc();
      entry->impl = impl;
      entry->layout = LayoutIndex(entry->weights);
      return;
    }
    offered += (offered.empty() ? "" : ", ") + impl;
  } while (pd.next_impl());
  entry->impl = offered;
}

std::shared_ptr<Entry> Get(const Layer& g) {
  static std::mutex mutex;
  static std::map<std::array<int64_t, 14>, std::shared_ptr<Entry>> cache;
  const auto key = g.Key();
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto entry = std::make_shared<Entry>();
  const auto inference = dnnl::prop_kind::forward_inference;
  if (g.kind == kDense) {
    Choose<dnnl::inner_product_forward::primitive_desc, dnnl::inner_product_forward>(
        dnnl::inner_product_forward::primitive_desc(Engine(), inference, g.Src(),
                                                    g.AnyWeights(), g.Dst(), Attr()),
        entry.get());
  } else {
    Choose<dnnl::convolution_forward::primitive_desc, dnnl::convolution_forward>(
        dnnl::convolution_forward::primitive_desc(
            Engine(), inference, dnnl::algorithm::convolution_direct, g.Src(),
            g.AnyWeights(), g.Dst(), {g.stride, g.stride}, {g.pad, g.pad}, {g.pad, g.pad},
            Attr()),
        entry.get());
  }
  std::lock_guard<std::mutex> lock(mutex);
  return cache.emplace(key, entry).first->second;
}

// A scratchpad for this thread, kept between calls: a fresh allocation per call would be
// new pages (faulted in and zeroed) every time for the larger ones.
void* Scratch(size_t bytes) {
  struct Buffer {
    void* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffer;
  if (bytes > buffer.size) {
    std::free(buffer.data);
    buffer.size = (bytes + 4095) / 4096 * 4096;
    buffer.data = std::aligned_alloc(4096, buffer.size);
    if (buffer.data == nullptr) buffer.size = 0;
  }
  return buffer.data;
}

ffi::Error Execute(const Layer& g, void* x, void* w, size_t w_bytes, int64_t layout,
                   void* y) {
  if (!g.Valid()) return ffi::Error::InvalidArgument("f8net_int8_onednn: inconsistent shapes");
  try {
    const auto entry = Get(g);
    if (!entry->exact) {
      return ffi::Error::InvalidArgument(
          "f8net_int8_onednn: oneDNN offers no exact int8 implementation for this layer "
          "(only " + entry->impl + ")");
    }
    if (w_bytes != entry->weights.get_size() || layout != entry->layout) {
      return ffi::Error::InvalidArgument(
          "f8net_int8_onednn: the packed weights do not match this layer (pack them with "
          "f8net_jax.integer.onednn.pack_weight on this machine)");
    }
    dnnl::engine& e = Engine();
    dnnl::stream stream(e);
    void* scratch = Scratch(entry->scratchpad.get_size());
    if (scratch == nullptr && entry->scratchpad.get_size() > 0) {
      return ffi::Error::Internal("f8net_int8_onednn: out of memory for the scratchpad");
    }
    entry->primitive.execute(stream, {{DNNL_ARG_SRC, memory(g.Src(), e, x)},
                                      {DNNL_ARG_WEIGHTS, memory(entry->weights, e, w)},
                                      {DNNL_ARG_DST, memory(g.Dst(), e, y)},
                                      {DNNL_ARG_SCRATCHPAD,
                                       memory(entry->scratchpad, e, scratch)}});
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("f8net_int8_onednn: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error SourceSigned(const ffi::AnyBuffer& x, int64_t* src_signed) {
  if (x.element_type() == ffi::DataType::U8) {
    *src_signed = 0;
  } else if (x.element_type() == ffi::DataType::S8) {
    *src_signed = 1;
  } else {
    return ffi::Error::InvalidArgument("f8net_int8_onednn: the source must be uint8 or int8");
  }
  return ffi::Error::Success();
}

ffi::Error Conv(ffi::AnyBuffer x, ffi::Buffer<ffi::U8> w, ffi::ResultBuffer<ffi::S32> y,
                int64_t stride, int64_t pad, int64_t groups, int64_t kh, int64_t kw,
                int64_t layout) {
  const auto xd = x.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || xd[0] != yd[0]) {
    return ffi::Error::InvalidArgument("f8net_int8_conv: x and y must be [N, H, W, C]");
  }
  int64_t src_signed;
  if (auto err = SourceSigned(x, &src_signed); err.failure()) return err;
  const Layer g{kConv, xd[0], xd[1], xd[2], xd[3], yd[3], kh, kw, yd[1], yd[2],
                stride, pad, groups, src_signed};
  return Execute(g, x.untyped_data(), w.untyped_data(), w.size_bytes(), layout,
                 y->untyped_data());
}

ffi::Error Dense(ffi::AnyBuffer x, ffi::Buffer<ffi::U8> w, ffi::ResultBuffer<ffi::S32> y,
                 int64_t layout) {
  const auto xd = x.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || xd[0] != yd[0]) {
    return ffi::Error::InvalidArgument("f8net_int8_dense: x and y must be [N, C]");
  }
  int64_t src_signed;
  if (auto err = SourceSigned(x, &src_signed); err.failure()) return err;
  const Layer g{kDense, xd[0], 1, 1, xd[1], yd[1], 1, 1, 1, 1, 1, 0, 1, src_signed};
  return Execute(g, x.untyped_data(), w.untyped_data(), w.size_bytes(), layout,
                 y->untyped_data());
}

Layer FromArray(const int64_t* v) {
  return Layer{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11],
               v[12], v[13]};
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(F8netInt8Conv, Conv,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("layout"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(F8netInt8Dense, Dense,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("layout"));

// Packs the program's int8 weights of a layer (``layer``: the 14 fields of Layer) for the
// primitive that runs it at its batch into ``out`` (``size`` bytes). Returns the packed
// size (with out == nullptr, only that), or -1 if oneDNN has no exact int8 primitive for
// this layer.
extern "C" int64_t F8netInt8Pack(const int64_t* layer, const int8_t* weights, uint8_t* out,
                                 int64_t size) {
  try {
    const Layer g = FromArray(layer);
    if (!g.Valid()) return -1;
    const auto entry = Get(g);
    if (!entry->exact) return -1;
    const int64_t bytes = static_cast<int64_t>(entry->weights.get_size());
    if (out == nullptr) return bytes;
    if (size != bytes) return -1;
    dnnl::engine& e = Engine();
    dnnl::stream stream(e);
    memory user(g.UserWeights(), e, const_cast<int8_t*>(weights));
    memory target(entry->weights, e, out);
    dnnl::reorder(user, target).execute(stream, user, target);
    stream.wait();
    return bytes;
  } catch (const dnnl::error&) {
    return -1;
  }
}

// The implementation oneDNN runs for a layer at its batch (e.g. 'brg:avx512_core_amx'), at
// most ``size`` bytes into ``out``, and its weight layout's index into ``layout``. Returns
// 1 with the implementation, 0 if none is exact (``out``: every one offered), -1 on error.
extern "C" int F8netInt8Impl(const int64_t* layer, char* out, int64_t size,
                             int64_t* layout) {
  try {
    const Layer g = FromArray(layer);
    if (!g.Valid()) return -1;
    const auto entry = Get(g);
    snprintf(out, size, "%s", entry->impl.c_str());
    *layout = entry->layout;
    return entry->exact ? 1 : 0;
  } catch (const dnnl::error&) {
    return -1;
  }
}
