// convert.h — DLPack arrays (nb::ndarray) to the core's TensorRef, with the checks that
// keep bad input from reaching a kernel: device, dtype, C-contiguity, sizes.
//
// Arrays are taken as generic nb::ndarray<> (no dtype/order constraints) and checked here,
// so nanobind never makes an implicit converted copy: a copy would silently drop the
// in-place update (docs/design.md T7). Anything unexpected raises a Python exception.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <initializer_list>
#include <string>
#include <vector>

#include "../spam/common.h"
#include "../spam/cpu_ops.h"
#include "../spam/math.h"
#include "../spam/quant8.h"

namespace spam::bind {

namespace nb = nanobind;

inline std::string describe(const char* what, size_t index) {
  return std::string(what) + "[" + std::to_string(index) + "]";
}

inline DType float_dtype(const nb::ndarray<>& a, const std::string& name) {
  const nb::dlpack::dtype dt = a.dtype();
  if (dt == nb::dtype<float>()) return DType::kFloat32;
  if (dt.lanes == 1 && dt.bits == 16) {
    if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat)) return DType::kBFloat16;
    if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float)) return DType::kFloat16;
  }
  throw nb::type_error((name + ": expected float32, bfloat16 or float16 data").c_str());
}

inline bool is_c_contiguous(const nb::ndarray<>& a) {
  // Empty arrays are never dereferenced, and torch keeps odd strides on them (an empty slice
  // x[::256] has stride 256: the block starts of a sparse tensor with no selected entry).
  if (a.size() == 0) return true;
  int64_t expected = 1;
  for (size_t d = a.ndim(); d-- > 0;) {
    if (a.shape(d) != 1 && a.stride(d) != expected) return false;
    expected *= static_cast<int64_t>(a.shape(d));
  }
  return true;
}

inline void check_device(const nb::ndarray<>& a, int device_type, const std::string& name) {
  if (a.device_type() != device_type)
    throw nb::type_error((name + ": tensor is on the wrong device for this backend").c_str());
  // A tensor subclass that only wraps others (FSDP2's DTensor, a __torch_dispatch__ wrapper)
  // exports a DLPack capsule without storage: a null data pointer with a non-zero size. Every
  // conversion passes here, so no kernel is ever handed one.
  if (a.size() != 0 && a.data() == nullptr)
    throw nb::type_error((name + ": tensor has no data pointer (a wrapper tensor subclass such "
                                 "as DTensor? pass its local tensor)")
                             .c_str());
  if (!is_c_contiguous(a))
    throw nb::type_error(
        (name + ": tensor must be C-contiguous (the core writes in place)").c_str());
}

inline TensorRef float_ref(const nb::ndarray<>& a, int device_type, const std::string& name) {
  check_device(a, device_type, name);
  return TensorRef{a.data(), static_cast<int64_t>(a.size()), float_dtype(a, name)};
}

template <typename T>
T* typed_buffer(const nb::ndarray<>& a, int device_type, int64_t min_numel,
                const std::string& name) {
  check_device(a, device_type, name);
  if (a.dtype() != nb::dtype<T>())
    throw nb::type_error((name + ": wrong dtype for this buffer").c_str());
  if (static_cast<int64_t>(a.size()) < min_numel)
    throw nb::value_error((name + ": buffer too small").c_str());
  return static_cast<T*>(a.data());
}

// p, g, m, v of one tensor must agree in size and dtype; a mismatch is a caller bug.
inline void check_same(const TensorRef& p, const TensorRef& other, const std::string& name) {
  if (other.numel != p.numel)
    throw nb::value_error((name + ": numel differs from the parameter's").c_str());
  if (other.dtype != p.dtype)
    throw nb::type_error((name + ": dtype differs from the parameter's").c_str());
}

inline void check_lengths(size_t n, size_t m, const char* what, const char* of = "params") {
  if (n != m)
    throw nb::value_error(
        (std::string("spam_lowmem: list '") + what + "' has a different length from '" + of + "'")
            .c_str());
}

using ArrayList = std::vector<nb::ndarray<>>;

// Every list of a call has one entry per parameter.
struct Column {
  const ArrayList& list;
  const char* name;
};
inline void check_columns(size_t n, std::initializer_list<Column> columns) {
  for (const Column& c : columns) check_lengths(n, c.list.size(), c.name);
}

// Every array of one CUDA call must be on one device: the launcher makes that device
// current and a kernel cannot dereference another GPU's memory. (CPU calls: a no-op.)
class SameDevice {
 public:
  void check(const nb::ndarray<>& a, const std::string& name) {
    if (a.device_type() != nb::device::cuda::value) return;
    const int id = static_cast<int>(a.device_id());
    if (device_ < 0) device_ = id;
    if (id != device_)
      throw nb::value_error((name + ": tensor is on cuda:" + std::to_string(id) +
                             ", other arguments are on cuda:" + std::to_string(device_))
                                .c_str());
  }
  int device() const { return device_ < 0 ? 0 : device_; }

 private:
  int device_ = -1;
};

// The block layout (quant8.h, BlockRows) of `count` 8-bit values from the shape of their absmax
// array `a`: 1-D [num_blocks(count)] is flat; 2-D [R, num_blocks(L)] is R rows of L = count / R
// (blocks restarting at each row; R = 0 is an empty shard, count 0). `rows_allowed` is false for
// arrays that are flat by definition (the compact moments of sparse momentum).
inline BlockRows q8_layout(const nb::ndarray<>& a, int64_t count, bool rows_allowed,
                           const std::string& name) {
  auto fail = [&](const std::string& why) { throw nb::value_error((name + ": " + why).c_str()); };
  if (a.ndim() == 1) {
    if (static_cast<int64_t>(a.shape(0)) != num_blocks(count))
      fail("need one float32 absmax per 256 moment entries (a 1-D absmax is the flat layout)");
    return flat_blocks(count);
  }
  if (a.ndim() != 2 || !rows_allowed)
    fail(rows_allowed ? "absmax must be 1-D (flat blocks) or 2-D [rows, blocks per row]"
                      : "absmax must be 1-D: these moments use the flat block layout");
  const int64_t rows = static_cast<int64_t>(a.shape(0));
  const int64_t per_row = static_cast<int64_t>(a.shape(1));
  if (rows == 0) {
    if (count != 0) fail("an absmax of 0 rows needs an empty tensor");
    return BlockRows{};
  }
  if (count % rows != 0)
    fail("absmax has " + std::to_string(rows) + " rows, which do not divide the " +
         std::to_string(count) + " elements");
  const int64_t row_len = count / rows;
  if (per_row != num_blocks(row_len))
    fail("absmax rows need one float32 absmax per 256 elements of a row (" +
         std::to_string(num_blocks(row_len)) + " for rows of " + std::to_string(row_len) +
         "), got " + std::to_string(per_row));
  return rows_of_blocks(rows, row_len);
}

// 8-bit moments of tensor i: `count` uint8 codes for m and for v (the parameter's numel, or
// the compact count of a sparse tensor) and float32 absmax laid out as q8_layout says, the same
// for m and v.
inline Quant8Moments convert_q8_moments(const nb::ndarray<>& m_codes, const nb::ndarray<>& v_codes,
                                        const nb::ndarray<>& m_absmax,
                                        const nb::ndarray<>& v_absmax, int64_t count,
                                        bool rows_allowed, int device_type, SameDevice& dev,
                                        size_t i) {
  const BlockRows rows = q8_layout(m_absmax, count, rows_allowed, describe("absmax_m", i));
  q8_layout(v_absmax, count, rows_allowed, describe("absmax_v", i));
  if (m_absmax.ndim() != v_absmax.ndim() || m_absmax.shape(0) != v_absmax.shape(0))
    throw nb::value_error(
        (describe("absmax_v", i) + ": absmax of m and v differ in layout").c_str());
  const int64_t blocks = rows.total(count);
  auto codes = [&](const nb::ndarray<>& a, const char* what) {
    uint8_t* ptr = typed_buffer<uint8_t>(a, device_type, count, describe(what, i));
    if (static_cast<int64_t>(a.size()) != count)
      throw nb::value_error((describe(what, i) + ": need one 8-bit code per moment entry").c_str());
    dev.check(a, describe(what, i));
    return ptr;
  };
  auto absmax = [&](const nb::ndarray<>& a, const char* what) {
    float* ptr = typed_buffer<float>(a, device_type, blocks, describe(what, i));
    dev.check(a, describe(what, i));
    return ptr;
  };
  return Quant8Moments{codes(m_codes, "exp_avgs"), absmax(m_absmax, "absmax_m"),
                       codes(v_codes, "exp_avg_sqs"), absmax(v_absmax, "absmax_v"), rows};
}

// The buffers of an Adam-family step, converted and cross-checked. Moments are either
// dense (exp_avg / exp_avg_sq in the parameter dtype; absmax entries unused) or 8-bit
// (exp_avg / exp_avg_sq hold uint8 codes, absmax_m / absmax_v one float32 per block: 1-D flat,
// or 2-D [rows, blocks per row] with blocks restarting at each row, q8_layout).
struct StepBuffers {
  std::vector<TensorRef> p, g, m, v;
  std::vector<Quant8Moments> q8;
  bool any_q8 = false;
};

// Tensor i of a list (`what`[i] in messages), as a float TensorRef on `device_type`, checked to
// share the call's device.
inline TensorRef device_float_ref(const nb::ndarray<>& a, const char* what, size_t i,
                                  int device_type, SameDevice& dev) {
  const std::string name = describe(what, i);
  TensorRef ref = float_ref(a, device_type, name);
  dev.check(a, name);
  return ref;
}

// `packed` (optional, one flag per tensor): tensor i is a packed 4-bit weight (PackedParam,
// cpu_ops.h). Its params[i] is then an empty array that only names the working dtype; the
// TensorRef gets the gradient's numel and no data, and its moments must be dense.
inline StepBuffers convert_step_buffers(const ArrayList& params, const ArrayList& grads,
                                        const ArrayList& exp_avgs, const ArrayList& exp_avg_sqs,
                                        const ArrayList& absmax_m, const ArrayList& absmax_v,
                                        int device_type, SameDevice& dev,
                                        const std::vector<char>* packed = nullptr) {
  const size_t n = params.size();
  check_columns(n, {{grads, "grads"},
                    {exp_avgs, "exp_avgs"},
                    {exp_avg_sqs, "exp_avg_sqs"},
                    {absmax_m, "absmax_m"},
                    {absmax_v, "absmax_v"}});
  StepBuffers b;
  auto convert = [&](const nb::ndarray<>& a, const char* what, size_t i) {
    return device_float_ref(a, what, i, device_type, dev);
  };
  for (size_t i = 0; i < n; ++i) {
    const bool is_packed = packed && (*packed)[i];
    b.g.push_back(convert(grads[i], "grads", i));
    if (is_packed) {
      if (params[i].size() != 0)
        throw nb::value_error((describe("params", i) + ": a packed weight's entry must be an "
                                                       "empty array naming the working dtype")
                                  .c_str());
      b.p.push_back(
          TensorRef{nullptr, b.g[i].numel, float_dtype(params[i], describe("params", i))});
    } else {
      b.p.push_back(convert(params[i], "params", i));
    }
    check_same(b.p[i], b.g[i], describe("grads", i));
    Quant8Moments q;
    if (is_packed && exp_avgs[i].dtype() == nb::dtype<uint8_t>())
      throw nb::value_error((describe("exp_avgs", i) +
                             ": a packed 4-bit weight needs dense "
                             "(32-bit) moments; 8-bit moments are not supported with it")
                                .c_str());
    if (exp_avgs[i].dtype() == nb::dtype<uint8_t>()) {
      q = convert_q8_moments(exp_avgs[i], exp_avg_sqs[i], absmax_m[i], absmax_v[i], b.p[i].numel,
                             true, device_type, dev, i);
      b.any_q8 = true;
      b.m.push_back(TensorRef{});
      b.v.push_back(TensorRef{});
    } else {
      b.m.push_back(convert(exp_avgs[i], "exp_avgs", i));
      b.v.push_back(convert(exp_avg_sqs[i], "exp_avg_sqs", i));
      check_same(b.p[i], b.m[i], describe("exp_avgs", i));
      check_same(b.p[i], b.v[i], describe("exp_avg_sqs", i));
    }
    b.q8.push_back(q);
  }
  return b;
}

// A code map as [values f32[256], midpoints f32[256], buckets i32[2*kQuantBuckets],
// simd u8[kQuantSimdBytes]] (quant8.h).
inline QuantMap convert_map(const ArrayList& parts, int device_type, const char* name) {
  if (parts.size() != 4)
    throw nb::value_error(
        (std::string(name) + ": expected [values, midpoints, buckets, simd]").c_str());
  const std::string n(name);
  return QuantMap{typed_buffer<float>(parts[0], device_type, kQuantCodes, n + ".values"),
                  typed_buffer<float>(parts[1], device_type, kQuantCodes, n + ".midpoints"),
                  typed_buffer<int32_t>(parts[2], device_type, 2 * kQuantBuckets, n + ".buckets"),
                  typed_buffer<uint8_t>(parts[3], device_type, kQuantSimdBytes, n + ".simd")};
}

// A code map on the call's device (a kernel cannot read another GPU's table), and the m
// (signed) and v (unsigned) maps of a call with 8-bit moments.
inline QuantMap convert_device_map(const ArrayList& parts, int device_type, const char* name,
                                   SameDevice& dev) {
  const QuantMap q = convert_map(parts, device_type, name);
  for (size_t k = 0; k < parts.size(); ++k) dev.check(parts[k], describe(name, k));
  return q;
}

inline QuantMaps convert_maps(const ArrayList& m_map, const ArrayList& v_map, int device_type,
                              SameDevice& dev) {
  return QuantMaps{convert_device_map(m_map, device_type, "m_map", dev),
                   convert_device_map(v_map, device_type, "v_map", dev)};
}

}  // namespace spam::bind
