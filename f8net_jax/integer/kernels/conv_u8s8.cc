// Direct 2-D convolution of uint8 activations with int8 weights, int32 accumulation,
// for x86-64 CPUs with AVX-512 VNNI (vpdpbusd: 4 products of u8 x s8 summed into an
// int32 lane). A custom call of the XLA FFI; see f8net_jax/integer/vnni.py.
//
//   x:    u8  [N, Hp, Wp, Cp]           input, already padded (Cp a multiple of 4)
//   w:    s8  [KH * KW * Cp / 4, Co, 4]  packed weights (Co a multiple of 16)
//   bias: s32 [Co]
//   y:    s32 [N, OH, OW, Co]           y = bias + sum over (kh, kw, c) of x * w
//
// Integer arithmetic only: the products are 8-bit x 8-bit, the sums int32 adds (which
// the caller's static bound keeps inside int32).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A micro-tile: R output pixels x 16 * V output channels (V int32 vectors of 16 lanes),
// kept in registers over the whole reduction.
template <int R, int V>
inline void MicroTile(const uint8_t* const* rows, const int8_t* w, const int32_t* bias,
                      int32_t* const* out, int64_t kh, int64_t wp, int64_t groups,
                      int64_t cp, int64_t co) {
  __m512i acc[R][V];
  for (int v = 0; v < V; ++v) {
    const __m512i b = _mm512_loadu_si512(bias + 16 * v);
    for (int i = 0; i < R; ++i) acc[i][v] = b;
  }
  // For one kernel row, the KW * Cp input bytes are contiguous: (kw, c) is one run of
  // ``groups`` 4-byte groups.
  const int8_t* wk = w;
  for (int64_t i_h = 0; i_h < kh; ++i_h) {
    const int64_t offset = i_h * wp * cp;
    for (int64_t g = 0; g < groups; ++g, wk += co * 4) {
      __m512i wv[V];
      for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_si512(wk + 64 * v);
      for (int i = 0; i < R; ++i) {
        int32_t a;
        std::memcpy(&a, rows[i] + offset + 4 * g, 4);
        const __m512i av = _mm512_set1_epi32(a);
        for (int v = 0; v < V; ++v) acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], av, wv[v]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < V; ++v) _mm512_storeu_si512(out[i] + 16 * v, acc[i][v]);
  }
}

struct Conv {
  const uint8_t* x;
  const int8_t* w;
  const int32_t* bias;
  int32_t* y;
  int64_t oh, ow, hp, wp, cp, co, stride, kh, kw;

  template <int R, int V>
  void Tile(int64_t m0, int64_t n0) const {
    const uint8_t* rows[R];
    int32_t* out[R];
    for (int i = 0; i < R; ++i) {
      const int64_t m = m0 + i, n = m / (oh * ow), r = m % (oh * ow);
      const int64_t h = (r / ow) * stride, v = (r % ow) * stride;
      rows[i] = x + ((n * hp + h) * wp + v) * cp;
      out[i] = y + m * co + n0;
    }
    MicroTile<R, V>(rows, w + n0 * 4, bias + n0, out, kh, wp, kw * cp / 4, cp, co);
  }

  // All m rows: tiles of R rows, the rest one row at a time; channel tiles of 16 * V.
  template <int R, int V>
  void Run(int64_t m) const {
    const int64_t full = m / R, tiles_n = co / (16 * V);
    // Keep the larger operand in cache: weights (K x Co) against activations (M x K).
    if (co > m) {
#pragma omp parallel for collapse(2) schedule(static)
      for (int64_t j = 0; j < tiles_n; ++j) {
        for (int64_t t = 0; t < full; ++t) Tile<R, V>(t * R, j * 16 * V);
      }
    } else {
#pragma omp parallel for schedule(static)
      for (int64_t t = 0; t < full; ++t) {
        for (int64_t j = 0; j < tiles_n; ++j) Tile<R, V>(t * R, j * 16 * V);
      }
    }
    for (int64_t r = full * R; r < m; ++r) {
      for (int64_t j = 0; j < tiles_n; ++j) Tile<1, V>(r, j * 16 * V);
    }
  }
};

ffi::Error ConvImpl(ffi::Buffer<ffi::U8> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::S32> bias,
                    ffi::ResultBuffer<ffi::S32> y, int64_t stride, int64_t kh, int64_t kw) {
  const auto xd = x.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 4 || yd.size() != 4) return ffi::Error::InvalidArgument("rank must be 4");
  const int64_t n = xd[0], hp = xd[1], wp = xd[2], cp = xd[3];
  const int64_t oh = yd[1], ow = yd[2], co = yd[3];
  if (cp % 4 || co % 16 || yd[0] != n || (oh - 1) * stride + kh > hp ||
      (ow - 1) * stride + kw > wp || w.element_count() != kh * kw * cp * co ||
      bias.element_count() != co) {
    return ffi::Error::InvalidArgument("f8net_conv_u8s8: inconsistent shapes");
  }
  const Conv conv{x.typed_data(), w.typed_data(), bias.typed_data(), y->typed_data(),
                  oh, ow, hp, wp, cp, co, stride, kh, kw};
  const int64_t m = n * oh * ow;
  if (co % 32 == 0) {
    conv.Run<12, 2>(m);
  } else {
    conv.Run<24, 1>(m);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(F8netConvU8S8, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw"));
