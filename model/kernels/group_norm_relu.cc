// relu(GroupNorm(x)) for float32 NHWC on CPU, as one TensorFlow op: "BitGroupNormRelu".
//
// Why: in BiT every conv is preceded by GroupNorm + ReLU. In TensorFlow that is a statistics pass
// (reductions) plus an apply pass, several ops with a launch each; the statistics read all of x
// again from memory. Here one task takes one sample: it reads the sample once for per-channel sums
// and sums of squares, folds them into a per-channel scale and shift (group mean and variance,
// gamma, beta, eps) and applies relu(x * a + b) while the sample is still in the core's cache,
// so x comes from DRAM once and y goes back once: the traffic of a plain ReLU.
// With fewer samples than threads, samples are split into pixel ranges in two phases instead.
//
// Numerics: moments of x - k, k = the sample's first pixel per channel (a shift close to the mean,
// so a large mean against a small spread loses nothing), float32 sums over blocks of at most 64
// pixels, double above that; group mean and var = E[x^2] - E[x]^2 in double, clamped at 0; eps
// added to var.
#include <algorithm>
#include <cmath>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
namespace errors = tensorflow::errors;

constexpr int64_t kBlockPixels = 64;

// One build, best vector ISA picked at load time (GCC/clang function multi-versioning on x86-64).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BIT_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BIT_VECTOR_CLONES
#endif

// Adds the per-channel sum and sum of squares of x - k over `pixels` rows of `channels` floats to
// s, q (bs, bq: scratch of `channels` floats).
BIT_VECTOR_CLONES
void AccumulateMoments(const float* x, int64_t pixels, int64_t channels, const float* k, double* s,
                       double* q, float* bs, float* bq) {
  for (int64_t p0 = 0; p0 < pixels; p0 += kBlockPixels) {
    const int64_t p1 = std::min(pixels, p0 + kBlockPixels);
    for (int64_t c = 0; c < channels; ++c) bs[c] = bq[c] = 0.f;
    for (int64_t p = p0; p < p1; ++p) {
      const float* row = x + p * channels;
#pragma GCC ivdep
      for (int64_t c = 0; c < channels; ++c) {
        const float v = row[c] - k[c];
        bs[c] += v;
        bq[c] += v * v;
      }
    }
    for (int64_t c = 0; c < channels; ++c) {
      s[c] += bs[c];
      q[c] += bq[c];
    }
  }
}

// y = max(x * a + b, 0) per channel over `pixels` rows.
BIT_VECTOR_CLONES
void ApplyScaleShiftRelu(const float* x, int64_t pixels, int64_t channels, const float* a,
                         const float* b, float* y) {
  for (int64_t p = 0; p < pixels; ++p) {
    const float* in = x + p * channels;
    float* out = y + p * channels;
#pragma GCC ivdep
    for (int64_t c = 0; c < channels; ++c) out[c] = std::max(in[c] * a[c] + b[c], 0.f);
  }
}

// Group statistics of one sample (sums s, q of x - k over `count` pixels) -> per-channel a, b.
void FoldGroups(const double* s, const double* q, const float* k, int64_t channels, int64_t groups,
                int64_t count, const float* gamma, const float* beta, float eps, float* a, float* b) {
  const int64_t per_group = channels / groups;
  const double n = static_cast<double>(count) * per_group;
  for (int64_t g = 0; g < groups; ++g) {
    double sum = 0, sum_sq = 0;  // of x itself: sum x = s + count k, sum x^2 = q + 2 k s + count k^2
    for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
      const double shift = k[c];
      sum += s[c] + count * shift;
      sum_sq += q[c] + 2 * shift * s[c] + count * shift * shift;
    }
    const double mean = sum / n;
    const double var = std::max(sum_sq / n - mean * mean, 0.0);
    const double rstd = 1.0 / std::sqrt(var + eps);
    for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
      a[c] = static_cast<float>(gamma[c] * rstd);
      b[c] = static_cast<float>(beta[c] - mean * gamma[c] * rstd);
    }
  }
}

class BitGroupNormReluOp : public OpKernel {
 public:
  explicit BitGroupNormReluOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("groups", &groups_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &eps_));
    OP_REQUIRES(ctx, groups_ > 0, errors::InvalidArgument("groups must be positive"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& gamma = ctx->input(1);
    const Tensor& beta = ctx->input(2);
    OP_REQUIRES(ctx, x.dims() == 4, errors::InvalidArgument("x must be NHWC, got rank ", x.dims()));
    const int64_t batch = x.dim_size(0), pixels = x.dim_size(1) * x.dim_size(2);
    const int64_t channels = x.dim_size(3);
    OP_REQUIRES(ctx, channels % groups_ == 0,
                errors::InvalidArgument(channels, " channels do not split into ", groups_, " groups"));
    OP_REQUIRES(ctx, gamma.NumElements() == channels && beta.NumElements() == channels,
                errors::InvalidArgument("gamma and beta need ", channels, " values"));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &y));
    if (batch == 0 || pixels == 0 || channels == 0) return;

    const float* in = x.flat<float>().data();
    float* out = y->flat<float>().data();
    const float* g = gamma.flat<float>().data();
    const float* bt = beta.flat<float>().data();
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    const int64_t sample = pixels * channels;

    if (batch >= workers->num_threads) {
      // One task per sample: moments, fold and apply back to back, the sample hot in cache.
      auto per_sample = [&](int64_t begin, int64_t end) {
        std::vector<double> s(channels), q(channels);
        std::vector<float> bs(channels), bq(channels), a(channels), b(channels);
        for (int64_t i = begin; i < end; ++i) {
          std::fill(s.begin(), s.end(), 0.0);
          std::fill(q.begin(), q.end(), 0.0);
          const float* k = in + i * sample;  // the sample's first pixel
          AccumulateMoments(in + i * sample, pixels, channels, k, s.data(), q.data(), bs.data(), bq.data());
          FoldGroups(s.data(), q.data(), k, channels, groups_, pixels, g, bt, eps_, a.data(), b.data());
          ApplyScaleShiftRelu(in + i * sample, pixels, channels, a.data(), b.data(), out + i * sample);
        }
      };
      workers->workers->ParallelFor(batch, sample * 6, per_sample);
      return;
    }

    // Few samples, many threads: pixel ranges in parallel, phase 1 moments, phase 2 apply.
    const int64_t chunk = std::max<int64_t>(kBlockPixels, (pixels + 4 * workers->num_threads - 1) /
                                                              (4 * workers->num_threads));
    const int64_t chunks = (pixels + chunk - 1) / chunk;
    std::vector<double> partial(batch * chunks * 2 * channels, 0.0);
    workers->workers->ParallelFor(batch * chunks, chunk * channels * 3, [&](int64_t begin, int64_t end) {
      std::vector<float> bs(channels), bq(channels);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i = t / chunks, p0 = (t % chunks) * chunk, n = std::min(chunk, pixels - p0);
        double* s = partial.data() + t * 2 * channels;
        AccumulateMoments(in + i * sample + p0 * channels, n, channels, in + i * sample, s, s + channels,
                          bs.data(), bq.data());
      }
    });
    std::vector<float> a(batch * channels), b(batch * channels);
    std::vector<double> s(channels), q(channels);
    for (int64_t i = 0; i < batch; ++i) {
      std::fill(s.begin(), s.end(), 0.0);
      std::fill(q.begin(), q.end(), 0.0);
      for (int64_t k = 0; k < chunks; ++k) {
        const double* p = partial.data() + (i * chunks + k) * 2 * channels;
        for (int64_t c = 0; c < channels; ++c) {
          s[c] += p[c];
          q[c] += p[channels + c];
        }
      }
      FoldGroups(s.data(), q.data(), in + i * sample, channels, groups_, pixels, g, bt, eps_, &a[i * channels],
                 &b[i * channels]);
    }
    workers->workers->ParallelFor(batch * chunks, chunk * channels * 3, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i = t / chunks, p0 = (t % chunks) * chunk, n = std::min(chunk, pixels - p0);
        ApplyScaleShiftRelu(in + i * sample + p0 * channels, n, channels, &a[i * channels],
                            &b[i * channels], out + i * sample + p0 * channels);
      }
    });
  }

 private:
  int groups_;
  float eps_;
};

}  // namespace

REGISTER_OP("BitGroupNormRelu")
    .Input("x: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Output("y: float")
    .Attr("groups: int = 32")
    .Attr("epsilon: float = 1e-5")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
      c->set_output(0, x);
      return tensorflow::OkStatus();
    })
    .Doc("relu(GroupNorm(x) * gamma + beta) for NHWC float32 x; statistics per sample and group.");

REGISTER_KERNEL_BUILDER(Name("BitGroupNormRelu").Device(tensorflow::DEVICE_CPU), BitGroupNormReluOp);
