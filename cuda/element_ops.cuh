// element_ops.cuh — what is specific to each Adam-family optimizer in the CUDA step shells
// (dense_step.cuh, step8.cuh, packed_step.cu): which math.h element function runs, and which
// scalars it gets. The shells are written once; an op plugs an algorithm into them.
//
// An op is a small struct with
//   Extra                   per-tensor scalars, one entry per slot of the multi-tensor table
//                           (its size sets how many tensors a launch holds, multi_tensor.cuh);
//   its own fields          per-call scalars, passed by value as a kernel argument;
//   element(extra) (device) the element functor of one tensor, (p, g, m, v) -> ElementFlags,
//                           built once per thread block from the call's and the tensor's
//                           scalars; it calls the same math.h function as the CPU loops.
#pragma once

#include <cmath>
#include <cstdint>

#include "../cpp/spam/algorithms.h"
#include "../cpp/spam/math.h"

namespace spam::cuda {

// ------------------------------------------------------------------------------ SPAM
struct SpamExtra {
  float update_scale;  // lr * s * sqrt(1 - beta2^t) / (1 - beta1^t), per tensor
};

struct SpamOp {
  using Extra = SpamExtra;
  SpamHyper hyper;

  struct Element {
    SpamHyper h;
    float scale;
#if defined(__CUDACC__)
    __device__ __forceinline__ ElementFlags operator()(float& p, float g, float& m,
                                                       float& v) const {
      return spam_element(p, g, m, v, h, scale);
    }
#endif
  };
#if defined(__CUDACC__)
  __device__ __forceinline__ Element element(const Extra& e) const {
    return Element{hyper, e.update_scale};
  }
#endif
};

// --------------------------------------------------------------- element algorithms
// Any descriptor of algorithms.h (AdamW, ...): its per-tensor scalars are the Extra, its
// per-call Hyper the op's field, its element function the functor. Instantiated for every
// entry of SPAM_ELEMENT_ALGORITHMS in element_step.cu and packed_step.cu.
template <class A>
struct ElementOp {
  using Extra = typename A::TensorScalars;
  typename A::Hyper hyper;

  struct Element {
    typename A::Hyper h;
    Extra s;
#if defined(__CUDACC__)
    __device__ __forceinline__ ElementFlags operator()(float& p, float g, float& m,
                                                       float& v) const {
      return A::element(p, g, m, v, h, s);
    }
#endif
  };
#if defined(__CUDACC__)
  __device__ __forceinline__ Element element(const Extra& e) const { return Element{hyper, e}; }
#endif
};

// ------------------------------------------------------------------ Stable-SPAM update
// Per-tensor state of a Stable-SPAM step in device scratch (layout in stable_spam_step.cu):
// its phases 2 and 4 write the scalars that the update (AdamOp) reads.
struct alignas(16) TensorState {
  StableTensorScalars scalars;  // written by phase 2 (clip) and phase 4 (norm)
  double sum_sq;                // unclipped sum of squares, from phase 2
  int32_t clips;                // stable_clips(): phase 3 needs the clipped sum
  float max_ema;                // this call's M from phase 2; phase 4 stores it in grad_stats
};
static_assert(sizeof(TensorState) == 32, "scratch layout");

struct AdamExtra {
  AdamBiasCorrection adam;  // step_size, sqrt_bc2
  int32_t tensor;           // TensorState index
};

// Stable-SPAM's update (stable_spam_element) with the scalars its phases left in `state`.
struct AdamOp {
  using Extra = AdamExtra;
  AdamHyper hyper;
  const TensorState* state;

  struct Element {
    AdamHyper h;
    AdamBiasCorrection t;
    StableTensorScalars s;
#if defined(__CUDACC__)
    __device__ __forceinline__ ElementFlags operator()(float& p, float g, float& m,
                                                       float& v) const {
      return stable_spam_element(p, g, m, v, h, t, s);
    }
#endif
  };
#if defined(__CUDACC__)
  __device__ __forceinline__ Element element(const Extra& e) const {
    return Element{hyper, e.adam, state[e.tensor].scalars};
  }
#endif
};

}  // namespace spam::cuda
