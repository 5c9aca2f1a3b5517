// Involution on the CPU in one pass: the forward, and the gradients for the input and the kernels.
//
// x: (B, C, H, W); w: (B, G, K*K, Ho, Wo); out: (B, C, Ho, Wo); C = G * Cg; zero padding P = (K - 1) / 2:
//     out[b, c, y, x] = sum_{i, j} w[b, c / Cg, i * K + j, y, x] * x[b, c, y * S + i - P, x * S + j - P]
//
// The forward and the input gradient run channels-last (images as (B, rows, columns, C), the input
// zero-padded): one pixel's group of Cg channels is a contiguous vector and its K*K taps a sum of
// shifted copies of it, each weighted by one kernel scalar. The sum stays in registers and the
// innermost loop runs over the Cg channels (a compile-time 16 for RedNet's groups: whole vector
// instructions). The kernel gradient is a sum over channels instead, so it runs on the native
// layout, vectorized along image rows. The kernels keep their own layout throughout: walking along
// an output row reads each tap's plane sequentially, K*K short streams that stay in cache.
// ATen, torch::Tensor and pybind11's tensor casters only: torch/extension.h (all of torch's C++ API)
// made the first build on a new machine much slower to compile.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/types.h>

#include <ATen/Parallel.h>

#include <algorithm>

namespace {

struct Shape {
  int64_t B, C, H, W, G, K, S, Ho, Wo;
  int64_t Cg() const { return C / G; }
  int64_t P() const { return (K - 1) / 2; }
  int64_t Hp() const { return H + 2 * P(); }
  int64_t Wp() const { return W + 2 * P(); }
  int64_t taps() const { return K * K; }
  int64_t plane() const { return Ho * Wo; }
};

// (B, C, H, W) -> (B, H + 2P, W + 2P, C), zero border; one task per image row, reading it contiguously.
template <typename T>
void to_channels_last(const T* __restrict__ src, T* __restrict__ dst, int64_t B, int64_t C, int64_t H, int64_t W,
                      int64_t P) {
  const int64_t Hp = H + 2 * P, Wp = W + 2 * P;
  at::parallel_for(0, B * Hp, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / Hp, y = row % Hp - P;
      T* out = dst + row * Wp * C;
      std::fill(out, out + Wp * C, T(0));
      if (y < 0 || y >= H) continue;
      for (int64_t c = 0; c < C; ++c) {
        const T* in = src + ((b * C + c) * H + y) * W;
        for (int64_t x = 0; x < W; ++x) out[(x + P) * C + c] = in[x];
      }
    }
  });
}

// (B, Hp, Wp, C) -> (B, C, H, W), dropping a border of P; one task per image row.
template <typename T>
void to_channels_first(const T* __restrict__ src, T* __restrict__ dst, int64_t B, int64_t C, int64_t H, int64_t W,
                       int64_t P) {
  const int64_t Wp = W + 2 * P;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, y = row % H;
      const T* in = src + ((b * (H + 2 * P) + y + P) * Wp + P) * C;
      for (int64_t c = 0; c < C; ++c) {
        T* out = dst + ((b * C + c) * H + y) * W;
        for (int64_t x = 0; x < W; ++x) out[x] = in[x * C + c];
      }
    }
  });
}

constexpr int64_t MAX_GROUP = 64;  // the widest group of channels one kernel may serve here

template <typename T, int64_t CG>
void forward_impl(const Shape& s, const T* __restrict__ xp, const T* __restrict__ w, T* __restrict__ out) {
  const int64_t Cg = CG ? CG : s.Cg(), Wp = s.Wp(), taps = s.taps(), plane = s.plane();
  at::parallel_for(0, s.B * s.Ho, 1, [&](int64_t begin, int64_t end) {
    T acc[CG ? CG : MAX_GROUP];  // a group's running sum: in registers when CG is known
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / s.Ho, y = row % s.Ho;
      for (int64_t x = 0; x < s.Wo; ++x) {
        for (int64_t g = 0; g < s.G; ++g) {
          const T* kern = w + (b * s.G + g) * taps * plane + y * s.Wo + x;
          for (int64_t c = 0; c < Cg; ++c) acc[c] = T(0);
          for (int64_t i = 0; i < s.K; ++i) {
            const T* in_row = xp + ((b * s.Hp() + y * s.S + i) * Wp + x * s.S) * s.C + g * Cg;
            for (int64_t j = 0; j < s.K; ++j) {
              const T weight = kern[(i * s.K + j) * plane];
              const T* in = in_row + j * s.C;
              for (int64_t c = 0; c < Cg; ++c) acc[c] += weight * in[c];
            }
          }
          T* o = out + ((b * s.Ho + y) * s.Wo + x) * s.C + g * Cg;
          for (int64_t c = 0; c < Cg; ++c) o[c] = acc[c];
        }
      }
    }
  });
}

// The input gradient, gathered: each padded input pixel sums, over the taps that read it, the
// tap's weight times the output gradient there. Rows of the padded input are independent tasks.
template <typename T, int64_t CG, int64_t STRIDE>
void grad_input_impl(const Shape& s, const T* __restrict__ w, const T* __restrict__ grad, T* __restrict__ gxp) {
  const int64_t Cg = CG ? CG : s.Cg(), Wp = s.Wp(), taps = s.taps(), plane = s.plane();
  at::parallel_for(0, s.B * s.Hp(), 1, [&](int64_t begin, int64_t end) {
    T acc[CG ? CG : MAX_GROUP];  // a group's running sum: in registers when CG is known
    for (int64_t prow = begin; prow < end; ++prow) {
      const int64_t b = prow / s.Hp(), yp = prow % s.Hp();
      for (int64_t xp = 0; xp < Wp; ++xp) {
        for (int64_t g = 0; g < s.G; ++g) {
          for (int64_t c = 0; c < Cg; ++c) acc[c] = T(0);
          // taps i with y * S + i == yp for an output row y: i has yp's remainder modulo S
          for (int64_t i = yp % STRIDE; i < s.K; i += STRIDE) {
            const int64_t y = (yp - i) / STRIDE;
            if (yp < i || y >= s.Ho) continue;
            for (int64_t j = xp % STRIDE; j < s.K; j += STRIDE) {
              const int64_t x = (xp - j) / STRIDE;
              if (xp < j || x >= s.Wo) continue;
              const int64_t pixel = (b * s.Ho + y) * s.Wo + x;
              const T weight = w[((b * s.G + g) * taps + i * s.K + j) * plane + y * s.Wo + x];
              const T* go = grad + pixel * s.C + g * Cg;
              for (int64_t c = 0; c < Cg; ++c) acc[c] += weight * go[c];
            }
          }
          T* gx = gxp + ((b * s.Hp() + yp) * Wp + xp) * s.C + g * Cg;
          for (int64_t c = 0; c < Cg; ++c) gx[c] = acc[c];
        }
      }
    }
  });
}

// The kernel gradient on the native layout, one (image, group) per task: for each tap, the sum over
// the group's channels of the output gradient times the shifted input, along whole output rows.
// Output columns whose input falls in the padding are skipped rather than tested.
template <typename T, int64_t STRIDE>
void grad_kernel_impl(const Shape& s, const T* __restrict__ x, const T* __restrict__ grad, T* __restrict__ gw) {
  const int64_t Cg = s.Cg(), P = s.P(), image = s.H * s.W, plane = s.plane(), taps = s.taps();
  const auto valid = [&](int64_t k, int64_t n, int64_t n_out, int64_t& lo, int64_t& hi) {
    const int64_t shift = k - P;  // output o reads input o * S + shift, which must lie in [0, n)
    lo = shift >= 0 ? 0 : (-shift + STRIDE - 1) / STRIDE;
    hi = n - 1 - shift < 0 ? 0 : std::min(n_out, (n - 1 - shift) / STRIDE + 1);
  };
  at::parallel_for(0, s.B * s.G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t first_channel = (bg / s.G) * s.C + (bg % s.G) * Cg;
      T* wg = gw + bg * taps * plane;
      std::fill(wg, wg + taps * plane, T(0));
      for (int64_t i = 0; i < s.K; ++i) {
        int64_t y_lo, y_hi;
        valid(i, s.H, s.Ho, y_lo, y_hi);
        for (int64_t j = 0; j < s.K; ++j) {
          int64_t x_lo, x_hi;
          valid(j, s.W, s.Wo, x_lo, x_hi);
          for (int64_t c = 0; c < Cg; ++c) {
            const T* xc = x + (first_channel + c) * image;
            const T* gc = grad + (first_channel + c) * plane;
            for (int64_t y = y_lo; y < y_hi; ++y) {
              const T* __restrict__ in = xc + (y * STRIDE + i - P) * s.W + j - P;
              const T* __restrict__ g = gc + y * s.Wo;
              T* __restrict__ kern = wg + (i * s.K + j) * plane + y * s.Wo;
              for (int64_t xo = x_lo; xo < x_hi; ++xo) kern[xo] += g[xo] * in[xo * STRIDE];
            }
          }
        }
      }
    }
  });
}

Shape shape_of(const torch::Tensor& x, const torch::Tensor& w, int64_t K, int64_t S) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "the fused involution runs on the CPU");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "the fused involution needs one dtype for x and the kernels");
  TORCH_CHECK(S == 1 || S == 2, "the fused involution supports strides 1 and 2, got ", S);
  TORCH_CHECK(x.size(1) / w.size(1) <= MAX_GROUP, "the fused involution serves at most ", MAX_GROUP,
              " channels per kernel");
  return {x.size(0), x.size(1), x.size(2), x.size(3), w.size(1), K, S, w.size(3), w.size(4)};
}

template <typename T>
torch::Tensor channels_last(const torch::Tensor& t, int64_t P) {
  auto out = torch::empty({t.size(0), t.size(2) + 2 * P, t.size(3) + 2 * P, t.size(1)}, t.options());
  to_channels_last<T>(t.data_ptr<T>(), out.data_ptr<T>(), t.size(0), t.size(1), t.size(2), t.size(3), P);
  return out;
}

template <typename T>
torch::Tensor channels_first(const torch::Tensor& t, int64_t C, int64_t H, int64_t W, int64_t P) {
  auto out = torch::empty({t.size(0), C, H, W}, t.options());
  to_channels_first<T>(t.data_ptr<T>(), out.data_ptr<T>(), t.size(0), C, H, W, P);
  return out;
}

}  // namespace

// float or double; the group width 16 (RedNet's) and the strides 1 and 2 are compiled specially.
torch::Tensor forward(torch::Tensor x, torch::Tensor w, int64_t kernel_size, int64_t stride) {
  const Shape s = shape_of(x, w, kernel_size, stride);
  x = x.contiguous();
  w = w.contiguous();
  torch::Tensor result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "involution_forward", [&] {
    const auto xp = channels_last<scalar_t>(x, s.P());
    auto out = torch::empty({s.B, s.Ho, s.Wo, s.C}, x.options());
    auto run = s.Cg() == 16 ? forward_impl<scalar_t, 16> : forward_impl<scalar_t, 0>;
    run(s, xp.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    result = channels_first<scalar_t>(out, s.C, s.Ho, s.Wo, 0);
  });
  return result;
}

torch::Tensor grad_input(torch::Tensor x, torch::Tensor w, torch::Tensor grad, int64_t kernel_size, int64_t stride) {
  const Shape s = shape_of(x, w, kernel_size, stride);
  w = w.contiguous();
  grad = grad.contiguous();
  torch::Tensor result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "involution_grad_input", [&] {
    const auto go = channels_last<scalar_t>(grad, 0);
    auto gxp = torch::empty({s.B, s.Hp(), s.Wp(), s.C}, x.options());
    auto run = s.Cg() == 16 ? (s.S == 1 ? grad_input_impl<scalar_t, 16, 1> : grad_input_impl<scalar_t, 16, 2>)
                            : (s.S == 1 ? grad_input_impl<scalar_t, 0, 1> : grad_input_impl<scalar_t, 0, 2>);
    run(s, w.data_ptr<scalar_t>(), go.data_ptr<scalar_t>(), gxp.data_ptr<scalar_t>());
    result = channels_first<scalar_t>(gxp, s.C, s.H, s.W, s.P());
  });
  return result;
}

torch::Tensor grad_kernel(torch::Tensor x, torch::Tensor w, torch::Tensor grad, int64_t kernel_size, int64_t stride) {
  const Shape s = shape_of(x, w, kernel_size, stride);
  x = x.contiguous();
  grad = grad.contiguous();
  auto gw = torch::empty({s.B, s.G, s.taps(), s.Ho, s.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "involution_grad_kernel", [&] {
    auto run = s.S == 1 ? grad_kernel_impl<scalar_t, 1> : grad_kernel_impl<scalar_t, 2>;
    run(s, x.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>());
  });
  return gw;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "involution forward (CPU, one pass)");
  m.def("grad_input", &grad_input, "involution gradient for the input (CPU, one pass)");
  m.def("grad_kernel", &grad_kernel, "involution gradient for the kernels (CPU, one pass)");
}
