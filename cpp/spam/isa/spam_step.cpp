// isa/spam_step.cpp — CPU SPAM step: one fused pass per element (spike test against the
// previous v, clip, moment update, bias-corrected step scaled by the warmup factor,
// weight decay), OpenMP over chunks of all tensors of a group.
#include "../cpu_chunks.h"
#include "../cpu_isa.h"
#include "../half.h"
#include "../math.h"

namespace spam {
namespace SPAM_CPU_ISA {
namespace {

template <typename T>
void spam_chunk(const SpamTensor& t, int64_t begin, int64_t end, const SpamHyper& h,
                int64_t& clipped, int64_t& nonfinite) {
  T* __restrict p = static_cast<T*>(t.param.data);
  const T* __restrict g = static_cast<const T*>(t.grad.data);
  T* __restrict m = static_cast<T*>(t.exp_avg.data);
  T* __restrict v = static_cast<T*>(t.exp_avg_sq.data);
  const float scale = t.update_scale;
  int64_t n_clip = 0, n_bad = 0;
  for (int64_t i = begin; i < end; ++i) {
    float pi = Storage<T>::load(p, i), mi = Storage<T>::load(m, i), vi = Storage<T>::load(v, i);
    const ElementFlags f = spam_element(pi, Storage<T>::load(g, i), mi, vi, h, scale);
    Storage<T>::store(p, i, pi);
    Storage<T>::store(m, i, mi);
    Storage<T>::store(v, i, vi);
    n_clip += f.clipped;
    n_bad += f.nonfinite;
  }
  clipped += n_clip;
  nonfinite += n_bad;
}

}  // namespace

void cpu_spam_step(const std::vector<SpamTensor>& tensors, const SpamHyper& hyper,
                   int64_t* counters) {
  std::vector<int64_t> numels;
  numels.reserve(tensors.size());
  for (const auto& t : tensors) numels.push_back(t.param.numel);
  const ChunkPlan plan = make_chunks(numels);
  const std::vector<Chunk>& chunks = plan.chunks;
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  int64_t clipped = 0, nonfinite = 0;
#pragma omp parallel for schedule(static) reduction(+ : clipped, nonfinite) if (plan.parallel)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = chunks[c];
    const SpamTensor& t = tensors[ch.tensor];
    dispatch_dtype(t.param.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      spam_chunk<T>(t, ch.begin, ch.end, hyper, clipped, nonfinite);
    });
  }
  counters[Counters::kClipped] += clipped;
  counters[Counters::kNonFinite] += nonfinite;
}


}  // namespace SPAM_CPU_ISA
}  // namespace spam
