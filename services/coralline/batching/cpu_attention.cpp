// Attention of small items (decode steps, small trees) over the KV pool, on the CPU in fp32.
//
// What it computes is what forward._SharedAttention's masked SDPA computes, for each item b,
// query head h and query row i (a node of the item):
//
//   out[b, h, i] = sum_j p_j V[slot_b, h / G, j],   p = softmax_j(scale * q[b, h, i] . K[slot_b, h / G, j])
//
// over the keys j < lens[b] with mask[b, i, j] set (G = H / kv_heads: grouped-query attention).
// Keys at or past lens[b] are never read, so a slot needs no padding, no gather and no zeroing.
//
// Why: PyTorch's CPU flash attention runs one (item, head) at a time with small GEMMs, and for a
// one-row query that overhead, not the memory read, is most of its time (SmolLM2, 16 one-token
// sessions: ~19 ms of a ~90 ms forward here). This kernel reads each key and value row once for
// all query rows of its kv head. One task per (item, kv head), spread over the calling thread's
// intra-op threads (at::parallel_for); the GIL is released while it runs.
//
// Knows nothing about models, sessions or the pool's owner. Built by cpu_attention.py.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

torch::Tensor pooled_attention(const torch::Tensor& q,       // [k, H, n, hd] float32
                               const torch::Tensor& keys,    // [slots, kvH, S, hd] float32
                               const torch::Tensor& values,  // [slots, kvH, S, hd] float32
                               const torch::Tensor& slots,   // [k] int64
                               const torch::Tensor& lens,    // [k] int64, <= S
                               const torch::Tensor& mask,    // [k, n, >= max(lens)] bool
                               double scale) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.dim() == 4 && mask.dim() == 3,
              "pooled_attention: q [k, H, n, hd], keys / values [slots, kvH, S, hd], mask [k, n, L]");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && keys.scalar_type() == torch::kFloat &&
                  values.scalar_type() == torch::kFloat,
              "pooled_attention: float32 only");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && lens.scalar_type() == torch::kLong &&
                  mask.scalar_type() == torch::kBool,
              "pooled_attention: slots / lens int64, mask bool");
  TORCH_CHECK(q.is_contiguous() && keys.is_contiguous() && values.is_contiguous() &&
                  slots.is_contiguous() && lens.is_contiguous() && mask.is_contiguous(),
              "pooled_attention: contiguous tensors only");
  TORCH_CHECK(!q.is_cuda() && !keys.is_cuda(), "pooled_attention: CPU tensors only");
  const int64_t k = q.size(0), H = q.size(1), n = q.size(2), hd = q.size(3);
  const int64_t nslots = keys.size(0), kvH = keys.size(1), S = keys.size(2), lmax = mask.size(2);
  TORCH_CHECK(keys.sizes() == values.sizes(), "pooled_attention: keys and values differ in shape");
  TORCH_CHECK(keys.size(3) == hd && kvH > 0 && H % kvH == 0,
              "pooled_attention: head_dim or head counts do not match");
  TORCH_CHECK(slots.numel() == k && lens.numel() == k && mask.size(0) == k && mask.size(1) == n,
              "pooled_attention: slots / lens / mask do not match q's items");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < k; ++b) {
    TORCH_CHECK(sp[b] >= 0 && sp[b] < nslots, "pooled_attention: slot out of range");
    TORCH_CHECK(lp[b] >= 0 && lp[b] <= std::min(S, lmax), "pooled_attention: length out of range");
  }
  const int64_t G = H / kvH;
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const float NEG = -std::numeric_limits<float>::infinity();
  {
    pybind11::gil_scoped_release no_gil;
    at::parallel_for(0, k * kvH, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> s;            // [R, L] scores, then probabilities
      std::vector<const float*> qrow;  // [R] the query row behind each score row
      std::vector<float*> orow;        // [R] its output row
      std::vector<const bool*> mrow;   // [R] its mask row
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t b = t / kvH, g = t % kvH, L = lp[b], R = G * n;
        const float* K = kp + (sp[b] * kvH + g) * S * hd;
        const float* V = vp + (sp[b] * kvH + g) * S * hd;
        s.resize(R * L);
        qrow.resize(R);
        orow.resize(R);
        mrow.resize(R);
        for (int64_t r = 0; r < R; ++r) {  // r = (head in the group) * n + node
          const int64_t h = g * G + r / n, i = r % n;
          qrow[r] = qp + ((b * H + h) * n + i) * hd;
          orow[r] = op + ((b * H + h) * n + i) * hd;
          mrow[r] = mp + (b * n + i) * lmax;
        }
        for (int64_t j = 0; j < L; ++j) {  // scores: each key row read once for all R rows
          const float* kj = K + j * hd;
          for (int64_t r = 0; r < R; ++r) {
            if (!mrow[r][j]) {
              s[r * L + j] = NEG;
              continue;
            }
            const float* qr = qrow[r];
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < hd; ++d) acc += qr[d] * kj[d];
            s[r * L + j] = acc * sc;
          }
        }
        for (int64_t r = 0; r < R; ++r) {  // softmax per row (a row that sees nothing: zeros)
          float* row = s.data() + r * L;
          float m = NEG;
          for (int64_t j = 0; j < L; ++j) m = std::max(m, row[j]);
          if (m == NEG) m = 0.f;
          float z = 0.f;
          for (int64_t j = 0; j < L; ++j) {
            row[j] = std::exp(row[j] - m);
            z += row[j];
          }
          const float inv = z > 0.f ? 1.f / z : 0.f;
          for (int64_t j = 0; j < L; ++j) row[j] *= inv;
          std::fill(orow[r], orow[r] + hd, 0.f);
        }
        for (int64_t j = 0; j < L; ++j) {  // outputs: each value row read once for all R rows
          const float* vj = V + j * hd;
          for (int64_t r = 0; r < R; ++r) {
            const float p = s[r * L + j];
            if (p == 0.f) continue;
            float* o = orow[r];
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) o[d] += p * vj[d];
          }
        }
      }
    });
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pooled_attention", &pooled_attention,
        "attention of small items over a KV pool's slots (see cpu_attention.cpp)");
}
