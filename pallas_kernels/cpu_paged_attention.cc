// Ragged paged attention for XLA CPU, an XLA FFI custom call: the new tokens of each sequence
// attend to its KV pages read in place. XLA's gather + batched small dots ran this at 2-8 GB/s on
// a 2-core CPU; here each (sequence, KV head, tile of kRowTile query rows) walks the sequence's
// pages once with an online softmax, the tile's rows (tokens of a prefill chunk, heads of the
// group) sharing each K/V page while it is in L1.
//
// Same contract as ragged_paged_attention.ragged_paged_attention_reference (float32 or bfloat16 q
// and pages): q [T, Hq, D], k/v pages [Hkv, N, P, D], query_start_loc [S+1] int32, context_lens
// [S] int32, block_tables [S, W] int32, sinks [Hq] float32 (-inf: no sink), attributes scale and
// sliding_window (0: none). Sequence s owns rows query_start_loc[s] .. query_start_loc[s+1] - 1;
// its row i sits at position context_lens[s] - q_len_s + i and sees the keys at positions <= its
// own (and > position - sliding_window). Rows that see nothing, and the padding rows at or past
// query_start_loc[S], give zeros. The padded contract (q [B, Q, Hq, D]) is the special case
// query_start_loc = b * Q (cpu_paged_attention.paged_attention_cpu).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float ToFloat(float x) { return x; }
inline float ToFloat(uint16_t bf16) {
  uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline void FromFloat(float x, float* out) { *out = x; }
inline void FromFloat(float x, uint16_t* out) {  // round to nearest even, as XLA converts
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if (std::isnan(x)) {
    *out = 0x7fc0;
    return;
  }
  *out = static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// Into L2 (locality 2): prefetching into L1 measured 30-40% slower, its fill buffers saturating.
template <typename T>
inline void Prefetch(const T* data, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(data);
  for (int64_t offset = 0; offset < count * static_cast<int64_t>(sizeof(T)); offset += 64) {
    __builtin_prefetch(bytes + offset, 0, 2);
  }
}

// 16 floats: one AVX-512 register (two AVX2 ones); head_dim must be a multiple of kLanes.
constexpr int64_t kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

// exp(x) for x <= 0 to ~2 ulp (Cephes expf) in vector arithmetic, since a libm call per lane
// would not vectorize; exactly 0 below -87 (and for -inf).
inline Vec Exp(Vec x) {
  const Vec clamped = x < -87.0f ? Vec{} - 87.0f : x;
  const Vec n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const Vec r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  Vec y = 1.9875691500e-4f * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const Vec scale = (Vec)((__builtin_convertvector(n, IVec) + 127) << 23);
  return x < -87.0f ? Vec{} : y * scale;
}
inline float Exp(float x) { return Exp(Vec{} + x)[0]; }

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }
inline float Sum(Vec v) {  // a shuffle tree: a scalar loop would chain 16 dependent adds
  typedef float V8 __attribute__((vector_size(8 * sizeof(float))));
  typedef float V4 __attribute__((vector_size(4 * sizeof(float))));
  V8 h8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
          __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  V4 h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
  return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

// A page of K or V as float32: the page itself, or `buffer` holding its bfloat16 values widened.
inline const float* AsFloat(const float* page, int64_t, float*) { return page; }
inline const float* AsFloat(const uint16_t* page, int64_t count, float* buffer) {
  for (int64_t x = 0; x < count; ++x) buffer[x] = ToFloat(page[x]);
  return buffer;
}

struct Shapes {
  int64_t num_tokens, num_heads, head_dim, num_kv_heads, num_pages, page_size, table_width;
};

// A sequence's query rows in q: q_len rows from `first`, the last of them at position len - 1.
struct SeqRows {
  int64_t seq, first, q_len, len;
};

// One query row's running softmax: max m, denominator l and the unnormalised output acc [D].
struct RowState {
  float* acc;
  float m, l;
};

// Online-softmax update of one query row with one page (keys at positions [lo, hi) visible):
// scores, rescale, accumulate P.V. scores and probs hold p rounded up to kLanes; scores' tail
// stays -inf.
inline void AttendPage(const float* qr, const float* k, const float* v, int64_t d, int64_t p, int64_t first_pos,
                       int64_t lo, int64_t hi, float* scores, float* probs, RowState& row) {
  float block_max = kNegInf;
  for (int64_t t = 0; t < p; ++t) {
    Vec a = Load(qr) * Load(k + t * d);
    for (int64_t c = kLanes; c < d; c += kLanes) a += Load(qr + c) * Load(k + t * d + c);
    const int64_t pos = first_pos + t;
    scores[t] = pos >= lo && pos < hi ? Sum(a) : kNegInf;
    block_max = std::max(block_max, scores[t]);
  }
  if (block_max == kNegInf) return;
  const float m_new = std::max(row.m, block_max);
  const float alpha = Exp(row.m - m_new);  // 0 while m is -inf
  Vec sums{};
  for (int64_t t = 0; t < p; t += kLanes) {
    const Vec e = Exp(Load(scores + t) - m_new);
    Store(probs + t, e);
    sums += e;
  }
  const float sum = Sum(sums);
  for (int64_t c = 0; c < d; c += kLanes) {
    Vec o = Load(row.acc + c) * alpha;
    for (int64_t t = 0; t < p; ++t) o += probs[t] * Load(v + t * d + c);
    Store(row.acc + c, o);
  }
  row.l = row.l * alpha + sum;
  row.m = m_new;
}

// One (sequence, KV head): its q_len x G query rows against the sequence's visible pages.
template <typename T>
void AttendOne(const Shapes& s, const T* q, const T* k_pages, const T* v_pages, const int32_t* tables,
               const float* sinks, float scale, int64_t window, const SeqRows& seq, int64_t h, T* out) {
  const int64_t d = s.head_dim, p = s.page_size, g = s.num_heads / s.num_kv_heads, rows = seq.q_len * g;
  const int64_t len = seq.len;
  const int32_t* table = tables + seq.seq * s.table_width;
  const int64_t padded = (p + kLanes - 1) / kLanes * kLanes;
  std::vector<float> qf(rows * d), acc(rows * d, 0.0f), kf(p * d), vf(p * d), scores(padded, kNegInf), probs(padded);
  std::vector<RowState> state(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = q + ((seq.first + r / g) * s.num_heads + h * g + r % g) * d;
    for (int64_t x = 0; x < d; ++x) qf[r * d + x] = ToFloat(src[x]) * scale;
    state[r] = {&acc[r * d], kNegInf, 0.0f};
  }
  const int64_t first = window > 0 ? std::max<int64_t>(0, len - seq.q_len - window + 1) : 0;
  const int64_t num_blocks = std::min<int64_t>((len + p - 1) / p, s.table_width);
  for (int64_t blk = first / p; blk < num_blocks; ++blk) {
    // Clamped like XLA's gather: a bad page id reads a wrong page, never outside the pool.
    const int64_t page = std::clamp<int64_t>(table[blk], 0, s.num_pages - 1);
    if (blk + 1 < num_blocks) {  // pages are scattered: the hardware prefetcher cannot guess the next one
      const int64_t next = std::clamp<int64_t>(table[blk + 1], 0, s.num_pages - 1);
      Prefetch(k_pages + (h * s.num_pages + next) * p * d, p * d);
      Prefetch(v_pages + (h * s.num_pages + next) * p * d, p * d);
    }
    const float* k = AsFloat(k_pages + (h * s.num_pages + page) * p * d, p * d, kf.data());
    const float* v = AsFloat(v_pages + (h * s.num_pages + page) * p * d, p * d, vf.data());
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t q_pos = len - seq.q_len + r / g;  // sees keys in [q_pos - window + 1, q_pos]
      const int64_t lo = window > 0 ? q_pos - window + 1 : 0;
      if (q_pos < blk * p || lo >= (blk + 1) * p) continue;
      AttendPage(&qf[r * d], k, v, d, p, blk * p, lo, q_pos + 1, scores.data(), probs.data(), state[r]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float sink = sinks[h * g + r % g];
    float rescale = 1.0f, denom = state[r].l;
    if (sink != kNegInf) {  // the sink joins the denominator only
      const float m_fin = std::max(state[r].m, sink);
      rescale = Exp(state[r].m - m_fin);
      denom = state[r].l * rescale + Exp(sink - m_fin);
    }
    const float inv = state[r].l > 0.0f ? rescale / denom : 0.0f;
    T* dst = out + ((seq.first + r / g) * s.num_heads + h * g + r % g) * d;
    for (int64_t x = 0; x < d; ++x) FromFloat(acc[r * d + x] * inv, &dst[x]);
  }
}

// Runs fn(0..items-1) on the caller and the intra-op pool. The caller waits only for workers that
// started (the shared state outlives it), so a busy pool can never deadlock it.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t items, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> active{0};
  };
  auto state = std::make_shared<State>();
  auto* fn_ptr = &fn;
  auto drain = [state, items](Fn* f) {
    for (int64_t i = state->next.fetch_add(1); i < items; i = state->next.fetch_add(1)) (*f)(i);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([state, items, fn_ptr, drain] {
      state->active.fetch_add(1);
      if (state->next.load() < items) drain(fn_ptr);
      state->active.fetch_sub(1);
    });
  }
  drain(fn_ptr);
  while (state->active.load() > 0) std::this_thread::yield();
}

// Query rows per work item. A whole 512-token chunk in one item streams its 1536 row states
// (q and acc, 786 KB at G=3, D=64) through L2 for every page and leaves 2 cores 3 items; tiles
// of kRowTile rows keep them in L1 and balance the pool, at the price of re-reading the pages
// (from L2: 256 KB per head at context 512) once per tile, each only up to its last row. On
// scripts/bench_ragged_attention.py (2 cores) 32 rows took prefill_512 from 0.85x to 0.81x of
// padded XLA and mixed from 1.13x to 1.00x; 16, 64 and 128 were no better.
constexpr int64_t kRowTile = 32;

// The work: each sequence's rows cut into tiles of up to kRowTile rows, a tile seeing the context
// up to its last row. The engine pads S to max_num_seqs with zero-length sequences; they give no
// tiles, so the pool never wakes for them. Each sequence starts where the previous one ended (the
// contract's offsets from 0) and its end is clamped into [start, T], so a malformed
// query_start_loc cannot make two items write one row or write outside out.
std::vector<SeqRows> RowTiles(const int32_t* starts, const int32_t* lens, int64_t num_seqs, int64_t num_tokens) {
  std::vector<SeqRows> tiles;
  int64_t end = 0;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t first = end;
    end = std::clamp<int64_t>(starts[b + 1], first, num_tokens);
    for (int64_t row = first; row < end; row += kRowTile) {
      const int64_t q_len = std::min(kRowTile, end - row);
      tiles.push_back({b, row, q_len, lens[b] - (end - row - q_len)});
    }
  }
  return tiles;
}

template <typename T>
void Run(ffi::ThreadPool& pool, const Shapes& s, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
         const int32_t* starts, const int32_t* lens, int64_t num_seqs, const int32_t* tables, const float* sinks,
         float scale, int64_t window, ffi::Result<ffi::AnyBuffer>& out) {
  const T* qp = static_cast<const T*>(q.untyped_data());
  const T* kp = static_cast<const T*>(k.untyped_data());
  const T* vp = static_cast<const T*>(v.untyped_data());
  T* op = static_cast<T*>(out->untyped_data());
  const std::vector<SeqRows> tiles = RowTiles(starts, lens, num_seqs, s.num_tokens);
  const int64_t hkv = s.num_kv_heads;
  ParallelFor(pool, static_cast<int64_t>(tiles.size()) * hkv, [&](int64_t i) {
    AttendOne<T>(s, qp, kp, vp, tables, sinks, scale, window, tiles[i / hkv], i % hkv, op);
  });
  // XLA does not zero the output buffer: the padding rows after the last sequence's are ours to clear.
  const int64_t owned = tiles.empty() ? 0 : tiles.back().first + tiles.back().q_len;
  const int64_t row_size = s.num_heads * s.head_dim;
  std::memset(op + owned * row_size, 0, (s.num_tokens - owned) * row_size * sizeof(T));
}

ffi::Error RaggedPagedAttentionImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                                    ffi::Buffer<ffi::S32> starts, ffi::Buffer<ffi::S32> lens,
                                    ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::F32> sinks,
                                    ffi::Result<ffi::AnyBuffer> out, float scale, int64_t sliding_window) {
  auto qd = q.dimensions(), kd = k.dimensions(), td = tables.dimensions();
  const int64_t num_seqs = lens.element_count();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2) {
    return ffi::Error::InvalidArgument(
        "ragged_paged_attention_cpu: expected q [T,Hq,D], pages [Hkv,N,P,D], block_tables [S,W]");
  }
  if (starts.element_count() != num_seqs + 1 || td[0] != num_seqs) {
    return ffi::Error::InvalidArgument(
        "ragged_paged_attention_cpu: expected query_start_loc [S+1], context_lens [S], block_tables [S,W]");
  }
  if (q.element_type() != k.element_type() || k.element_type() != v.element_type()) {
    return ffi::Error::InvalidArgument("ragged_paged_attention_cpu: q, k and v pages must share a dtype");
  }
  Shapes s{qd[0], qd[1], qd[2], kd[0], kd[1], kd[2], td[1]};
  switch (q.element_type()) {
    case ffi::F32:
      Run<float>(pool, s, q, k, v, starts.typed_data(), lens.typed_data(), num_seqs, tables.typed_data(),
                 sinks.typed_data(), scale, sliding_window, out);
      return ffi::Error::Success();
    case ffi::BF16:
      Run<uint16_t>(pool, s, q, k, v, starts.typed_data(), lens.typed_data(), num_seqs, tables.typed_data(),
                    sinks.typed_data(), scale, sliding_window, out);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("ragged_paged_attention_cpu: dtype must be float32 or bfloat16");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RaggedPagedAttentionCpu, RaggedPagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("sliding_window"));
