// sparse_convert.h — argument checks and conversions shared by the CPU and CUDA bindings of the
// sparse-momentum SPAM step (cpu_sparse.cpp, cuda_sparse.cpp). Per tensor: the full-size
// parameter and gradient; compact moments (K values in the parameter dtype, or K uint8 codes
// plus ceil(K/256) float32 absmax); block_starts (int64 [ceil(K/256)]). The subset rule is
// left to each binding: the CPU reads its scalars on the host, the CUDA kernel on the device.
#pragma once

#include <limits>
#include <vector>

#include "../spam/cpu_ops.h"
#include "convert.h"

namespace spam {
namespace bind {

struct SparseBuffers {
  TensorRef param, grad;
  TensorRef exp_avg, exp_avg_sq;  // compact, parameter dtype (unused if q8 is active)
  int64_t compact = 0;
  const int64_t* block_starts = nullptr;
  float update_scale = 0.0f;
  Quant8Moments q8;
};

inline std::vector<SparseBuffers> convert_sparse_buffers(
    const ArrayList& params, const ArrayList& grads, const ArrayList& exp_avgs,
    const ArrayList& exp_avg_sqs, const ArrayList& absmax_m, const ArrayList& absmax_v,
    const ArrayList& block_starts, const ArrayList& subsets, const std::vector<double>& update_scales,
    int device_type, SameDevice& dev, bool& any_q8) {
  const size_t n = params.size();
  check_lengths(n, grads.size(), "grads");
  check_lengths(n, exp_avgs.size(), "exp_avgs");
  check_lengths(n, exp_avg_sqs.size(), "exp_avg_sqs");
  check_lengths(n, absmax_m.size(), "absmax_m");
  check_lengths(n, absmax_v.size(), "absmax_v");
  check_lengths(n, block_starts.size(), "block_starts");
  check_lengths(n, subsets.size(), "subsets");
  check_lengths(n, update_scales.size(), "update_scales");
  auto full = [&](const nb::ndarray<>& a, const char* what, size_t i) {
    return device_float_ref(a, what, i, device_type, dev);
  };
  std::vector<SparseBuffers> out;
  out.reserve(n);
  any_q8 = false;
  for (size_t i = 0; i < n; ++i) {
    SparseBuffers t;
    t.param = full(params[i], "params", i);
    t.grad = full(grads[i], "grads", i);
    check_same(t.param, t.grad, describe("grads", i));
    if (t.param.numel > std::numeric_limits<uint32_t>::max())
      throw nb::value_error((describe("params", i) + ": sparse momentum supports parameters "
                             "of fewer than 2^32 elements").c_str());
    const int64_t k = static_cast<int64_t>(exp_avgs[i].size());
    if (k > t.param.numel)
      throw nb::value_error((describe("exp_avgs", i) + ": more compact values than elements").c_str());
    const int64_t blocks = num_blocks(k);
    t.compact = k;
    t.block_starts = typed_buffer<int64_t>(block_starts[i], device_type, blocks, describe("block_starts", i));
    dev.check(block_starts[i], describe("block_starts", i));
    if (static_cast<int64_t>(block_starts[i].size()) != blocks)
      throw nb::value_error((describe("block_starts", i) + ": need one entry per 256 compact "
                             "values").c_str());
    t.update_scale = static_cast<float>(update_scales[i]);
    if (exp_avgs[i].dtype() == nb::dtype<uint8_t>()) {
      t.q8 = convert_q8_moments(exp_avgs[i], exp_avg_sqs[i], absmax_m[i], absmax_v[i], k, device_type, dev, i);
      any_q8 = true;
    } else {
      t.exp_avg = full(exp_avgs[i], "exp_avgs", i);
      t.exp_avg_sq = full(exp_avg_sqs[i], "exp_avg_sqs", i);
      if (t.exp_avg.dtype != t.param.dtype || t.exp_avg_sq.dtype != t.param.dtype)
        throw nb::type_error((describe("exp_avgs", i) + ": compact moments must have the "
                              "parameter's dtype").c_str());
      if (t.exp_avg_sq.numel != k)
        throw nb::value_error((describe("exp_avg_sqs", i) + ": m and v differ in length").c_str());
    }
    out.push_back(t);
  }
  return out;
}

}  // namespace bind
}  // namespace spam
