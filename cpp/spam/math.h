// math.h — the scalar update rules of SPAM and Stable-SPAM, shared by the CPU loops
// (cpp/spam/*.cpp) and the CUDA kernels (cuda/*.cu). One definition, so CPU and GPU
// can only differ by reduction order.
//
// Everything is fp32 arithmetic on values loaded from storage. Constants that depend
// only on step counts (bias corrections, warmup factor, 1-beta) are computed by the
// Python layer in float64 and arrive here as fp32, exactly as torch.optim passes its
// python-float hyper-parameters to its kernels.
//
// Specification: docs/algorithms.md §2.4 (SPAM) and §4.4 (Stable-SPAM), papers
// arXiv 2501.06842 (SPAM, Alg. 1) and 2502.17055 (Stable-SPAM, Alg. 1).
#pragma once

#include <cmath>

#include "common.h"

namespace spam {

// How a momentum reset (SPAM §2.4 step 3, Stable-SPAM §4.4 step 5) treats this call.
enum class MomentReset : int {
  kNone = 0,
  kBeforeUpdate = 1,  // m, v read as zero, then updated with g   (SPAM; Stable-SPAM clean mode)
  kAfterUpdate = 2,   // update uses the old m, v; zeros are stored (Stable-SPAM as implemented,
                      // §4.5a)
};

// Policy for a gradient entry that is NaN or +-Inf.
//   skip: the entry is treated as absent this step: p, m, v keep their values (a reset still
//         zeroes m and v), it is left out of every reduction, and it is counted.
//   propagate: arithmetic as written (the authors' code); NaN reaches m, v and p.
struct NonFinite {
  bool skip;
};

// A per-call constant's complement, 1 - beta, formed in double from the value Python gave and
// rounded to fp32 once (docs/design.md §3 rule 4).
inline float complement(double beta) { return static_cast<float>(1.0 - beta); }

SPAM_HD bool is_finite(float x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// --------------------------------------------------------------------------- SPAM
// Per-call scalars, identical for every tensor of a group (§2.4).
struct SpamHyper {
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float eps;                 // added to sqrt(v) before bias correction (HF-AdamW style, §2.1)
  float clip_threshold;      // theta; 0 means "no spike clipping this call" (off, or inside the
                             // holdoff)
  float weight_decay_scale;  // lr * wd, applied after the update: p <- p - lr*wd*p (§2.4 step 8)
  MomentReset reset;         // kBeforeUpdate on reset calls (n % dT == 0)
  NonFinite nonfinite;
};

// Outcome flags of one element, summed by the callers into the spike telemetry.
struct ElementFlags {
  bool clipped;
  bool nonfinite;
};

// SPAM's spike test (§2.4 step 5) against the previous, not bias-corrected v: g^2 > theta * v,
// with v read as 0 on reset calls. A NaN g never counts as a spike. theta = 0 turns it off.
SPAM_HD bool spam_spikes(float g, float v, const SpamHyper& h) {
  const float v_prev = h.reset == MomentReset::kBeforeUpdate ? 0.0f : v;
  return static_cast<bool>((h.clip_threshold > 0.0f) & (g * g > h.clip_threshold * v_prev));
}

// One SPAM element. update_scale = lr * s * sqrt(1 - beta2^t) / (1 - beta1^t), with s the
// post-reset cosine warmup factor (§2.3), computed per tensor on the host.
//
// kMayClip = false is for callers that have checked spam_spikes() is false for this element
// (the CPU loops test a whole block first): it drops the clip's sqrt, which a vectorised loop
// would otherwise evaluate for every lane and which costs as much as the rest of the update.
// The result is the same either way.
template <bool kMayClip = true>
SPAM_HD ElementFlags spam_element(float& p, float g, float& m, float& v, const SpamHyper& h,
                                  float update_scale) {
  // Written branch-free (selects, not early returns) so the CPU loop auto-vectorises.
  const bool zero = h.reset == MomentReset::kBeforeUpdate;
  const float m_prev = zero ? 0.0f : m;
  const float v_prev = zero ? 0.0f : v;
  const bool finite = is_finite(g);
  const bool drop = static_cast<bool>(!finite & h.nonfinite.skip);  // bitwise &: no branch
  // Clipped gradient: sign(g) * sqrt(theta * v). Bitwise &, and both select arms computed
  // up front: a short-circuit or a product inside the arm keeps GCC from vectorising the loop.
  const bool spike = static_cast<bool>(kMayClip & spam_spikes(g, v, h));
  const float clipped = copysignf(sqrtf(h.clip_threshold * v_prev), g);
  const float g_used = spike ? clipped : g;
  const float m_new = h.beta1 * m_prev + h.one_minus_beta1 * g_used;
  const float v_new = h.beta2 * v_prev + h.one_minus_beta2 * (g_used * g_used);
  const float u = m_new / (sqrtf(v_new) + h.eps);
  const float p_stepped = p - update_scale * u;
  const float p_new = p_stepped - h.weight_decay_scale * p_stepped;
  p = drop ? p : p_new;
  m = drop ? m_prev : m_new;
  v = drop ? v_prev : v_new;
  return ElementFlags{spike, !finite};
}

// --------------------------------------------------------------------- Stable-SPAM
// Running per-tensor statistics, stored as a float32 tensor of 3 entries:
//   [0] M   EMA of max|g|           (AdaClip, gamma3)
//   [1] mu  EMA of ||g||            (AdaGN, gamma1 * sc)
//   [2] nu  EMA of ||g||^2          (AdaGN, gamma2)
struct GradStatsIndex {
  enum : int { kMaxEma = 0, kNormEma = 1, kNormSqEma = 2, kCount = 3 };
};

// Per-tensor inputs of the statistics update; the bias corrections use the statistics'
// step count k (which the as-implemented code resets together with the moments, §4.5b).
struct StableStatHyper {
  float gamma1, one_minus_gamma1;  // gamma1 * sc (cosine-decayed, §4.3)
  float gamma2, one_minus_gamma2;
  float gamma3, one_minus_gamma3;
  float bias_correction1;  // 1 - (gamma1*sc)^k
  float bias_correction2;  // 1 - gamma2^k
  float bias_correction3;  // 1 - gamma3^k
  float eps;
};

// What the element pass needs from the statistics, per tensor.
struct StableTensorScalars {
  float clip_threshold;  // M_hat; entries with |g| > M_hat are scaled by clip_scale
  float clip_scale;      // M_hat / max|g|
  float grad_norm;       // ||clipped g||; 0 disables the normalisation (the 2025-03-03 guard)
  float norm_target;     // c = mu_hat / (sqrt(nu_hat) + eps)
};

// The identity scalars: no clip (threshold +inf, scale 1), no normalisation (||g|| 0). With
// them stable_spam_element is plain AdamW (AdamWAlgorithm, algorithms.h).
SPAM_HD StableTensorScalars no_clip() { return StableTensorScalars{INFINITY, 1.0f, 0.0f, 0.0f}; }

// AdaClip, first half (§4.4 step 3): fold the current max into M and derive the threshold.
// The current max enters the EMA before the threshold is taken, so at k = 1 nothing clips.
SPAM_HD void stable_adaclip(float* stats, float grad_max, const StableStatHyper& h,
                            StableTensorScalars& out) {
  const float M = h.gamma3 * stats[GradStatsIndex::kMaxEma] + h.one_minus_gamma3 * grad_max;
  stats[GradStatsIndex::kMaxEma] = M;
  out.clip_threshold = M / h.bias_correction3;
  out.clip_scale = grad_max > 0.0f ? out.clip_threshold / grad_max : 1.0f;
}

SPAM_HD bool stable_clips(const StableTensorScalars& s, float grad_max) {
  return grad_max > s.clip_threshold;
}

// The clipped gradient entry; the largest entry maps exactly onto M_hat.
SPAM_HD float stable_clip(float g, const StableTensorScalars& s) {
  return fabsf(g) > s.clip_threshold ? g * s.clip_scale : g;
}

// AdaGN (§4.4 step 4): EMAs of the norm and squared norm, then the target norm c.
SPAM_HD void stable_adagn(float* stats, float grad_norm, const StableStatHyper& h,
                          StableTensorScalars& out) {
  const float mu = h.gamma1 * stats[GradStatsIndex::kNormEma] + h.one_minus_gamma1 * grad_norm;
  const float nu =
      h.gamma2 * stats[GradStatsIndex::kNormSqEma] + h.one_minus_gamma2 * (grad_norm * grad_norm);
  stats[GradStatsIndex::kNormEma] = mu;
  stats[GradStatsIndex::kNormSqEma] = nu;
  const float mu_hat = mu / h.bias_correction1;
  const float nu_hat = nu / h.bias_correction2;
  out.grad_norm = grad_norm;
  out.norm_target = mu_hat / (sqrtf(nu_hat) + h.eps);
}

// Per-call scalars of the Adam element update shared by AdamW and Stable-SPAM (§4.4 step 6;
// for Stable-SPAM beta1 is already multiplied by sc, for AdamW it is the group's beta1).
struct AdamHyper {
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float eps;          // added after bias correction (torch convention)
  float weight_keep;  // 1 - lr*wd, applied first (§4.4 step 1)
  MomentReset reset;
  NonFinite nonfinite;
};

// Per-tensor Adam bias corrections (the Adam count k differs per tensor only if a tensor
// skipped calls without a gradient).
struct AdamBiasCorrection {
  float step_size;  // lr / (1 - beta1'^k)
  float sqrt_bc2;   // sqrt(1 - beta2^k)
};

SPAM_HD ElementFlags stable_spam_element(float& p, float g, float& m, float& v, const AdamHyper& h,
                                         const AdamBiasCorrection& t,
                                         const StableTensorScalars& s) {
  const bool zero_before = h.reset == MomentReset::kBeforeUpdate;
  const bool zero_after = h.reset == MomentReset::kAfterUpdate;
  const float m_prev = zero_before ? 0.0f : m;
  const float v_prev = zero_before ? 0.0f : v;
  const bool finite = is_finite(g);
  const bool drop = static_cast<bool>(!finite & h.nonfinite.skip);  // bitwise &: no branch
  const bool spike = fabsf(g) > s.clip_threshold;                   // AdaClip (§4.4 step 3)
  // Both sides of each select are computed unconditionally so the loop vectorises.
  const float g_clipped = g * s.clip_scale;
  const float gc = spike ? g_clipped : g;
  const float g_normed = gc / s.grad_norm * s.norm_target;
  const float gn = s.grad_norm > 0.0f ? g_normed : gc;  // AdaGN (the > 0 guard of 2025-03-03)
  const float m_new = h.beta1 * m_prev + h.one_minus_beta1 * gn;
  const float v_new = h.beta2 * v_prev + h.one_minus_beta2 * (gn * gn);
  const float denom = sqrtf(v_new) / t.sqrt_bc2 + h.eps;
  const float p_decayed = p * h.weight_keep;  // decoupled weight decay comes first (§4.4 step 1)
  const float p_new = p_decayed - t.step_size * (m_new / denom);
  p = drop ? p : p_new;
  const float m_kept = drop ? m_prev : m_new;
  const float v_kept = drop ? v_prev : v_new;
  // As implemented (§4.5a) the reset call still steps with the old moments, then stores zeros.
  m = zero_after ? 0.0f : m_kept;
  v = zero_after ? 0.0f : v_kept;
  return ElementFlags{static_cast<bool>(spike & finite), !finite};
}

}  // namespace spam
