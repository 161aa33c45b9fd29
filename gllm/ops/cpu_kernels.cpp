// gLLM's CPU kernels: decode attention that reads the paged KV cache in place (with a layer's sliding
// window and score soft-cap), the fused element-wise steps of a layer (add + RMSNorm, RoPE + KV write,
// SiLU * up, tanh-GELU * up), and the sampler's argmax and log-sum-exp. Plain C++ that the compiler vectorizes (-O3 -march=native), OpenMP across rows or
// (sequence, KV head) pairs. Built and loaded by gllm/ops/cpu_kernels.py, which states each contract.
//
// The layer kernels exist for float32 (suffix _f32) and bfloat16 (suffix _bf16, raw uint16 bits). Math
// is in float32; where the torch reference rounds after each op in bfloat16, these round at the same
// points. Plain float expressions may be fused into multiply-adds (the compiler's default), so float32
// results can differ from torch's in the last bit.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "bf16.h"
#include <limits>
#include <tuple>

namespace {

constexpr int TILE = 32;         // cached tokens scored at a time by decode attention
constexpr int64_t PARALLEL_MIN = 1 << 13;  // element-wise work below this many values stays on one thread

template <typename T>
inline float round_to(float x) {  // x as a T would hold it
    T t;
    store(&t, x);
    return load(t);
}

// e^x for float32 to about 1 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^7.
// Branch-free, and rounding by adding 1.5 * 2^23 rather than calling floor, so that loops calling it
// vectorize with every compiler.
inline float exp_approx(float x) {
    constexpr float shift = 12582912.0f;
    x = std::min(std::max(x, -87.0f), 88.0f);
    float t = x * 1.44269504088896341f + shift;
    float n = t - shift;
    int32_t whole = __builtin_bit_cast(int32_t, t) - __builtin_bit_cast(int32_t, shift);
    float r = x - n * 0.693145751953125f - n * 1.42860682030941723e-6f;
    float p = 1.984126984e-4f;
    p = p * r + 1.388888889e-3f;
    p = p * r + 8.333333333e-3f;
    p = p * r + 4.166666667e-2f;
    p = p * r + 1.666666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * __builtin_bit_cast(float, (whole + 127) << 23);
}

template <typename T>
void add_rms_norm(const T* x, T* res, const T* weight, T* out, int64_t rows, int64_t dim, int64_t sx,
                  int64_t sr, int64_t so, int add, float eps, int threads) {
#pragma omp parallel for num_threads(threads) if (rows * dim >= PARALLEL_MIN)
    for (int64_t t = 0; t < rows; ++t) {
        const T* xr = x + t * sx;
        T* rr = res + t * sr;
        T* o = out + t * so;
        float squares = 0.0f;
        if (add) {
#pragma omp simd reduction(+ : squares)
            for (int64_t d = 0; d < dim; ++d) {
                float v = round_to<T>(load(rr[d]) + load(xr[d]));
                store(rr + d, v);
                squares += v * v;
            }
        } else {
#pragma omp simd reduction(+ : squares)
            for (int64_t d = 0; d < dim; ++d) squares += load(rr[d]) * load(rr[d]);
        }
        float inv = 1.0f / std::sqrt(squares / float(dim) + eps);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) store(o + d, load(weight[d]) * round_to<T>(load(rr[d]) * inv));
    }
}

// gate * sigmoid(k * gate) * up, the shape of both gates: SiLU (k = 1) and GELU's tanh approximation
// (0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2 / pi) (x + 0.044715 x^3)).
template <typename T, bool GELU>
void gate_mul(const T* gate_up, T* out, int64_t rows, int64_t inter, int64_t sg, int64_t so, int threads) {
#pragma omp parallel for num_threads(threads) if (rows * inter >= PARALLEL_MIN)
    for (int64_t t = 0; t < rows; ++t) {
        const T* g = gate_up + t * sg;
        const T* u = g + inter;
        T* o = out + t * so;
#pragma omp simd
        for (int64_t i = 0; i < inter; ++i) {
            float gate = load(g[i]);
            float z = GELU ? 1.5957691216057308f * (gate + 0.044715f * gate * gate * gate) : gate;
            store(o + i, round_to<T>(gate / (1.0f + exp_approx(-z))) * load(u[i]));
        }
    }
}

template <typename T>
void rope_write_kv(const T* qkv, const T* cos, const T* sin, T* q, T* cache_k, T* cache_v, const int64_t* slots,
                   int64_t tokens, int heads, int kv_heads, int dim, int64_t s_qkv, int64_t s_cos, int64_t s_sin,
                   int64_t s_slot, int threads) {
    const int half = dim / 2;
#pragma omp parallel for num_threads(threads) if (tokens * (heads + 2 * kv_heads) * dim >= PARALLEL_MIN)
    for (int64_t t = 0; t < tokens; ++t) {
        const T* c = cos + t * s_cos;
        const T* s = sin + t * s_sin;
        for (int h = 0; h < heads + 2 * kv_heads; ++h) {
            const T* src = qkv + t * s_qkv + int64_t(h) * dim;  // query, key and value heads in a row
            if (h >= heads + kv_heads) {
                T* dst = cache_v + slots[t] * s_slot + int64_t(h - heads - kv_heads) * dim;
                for (int d = 0; d < dim; ++d) dst[d] = src[d];
                continue;
            }
            T* dst = h < heads ? q + (t * heads + h) * dim : cache_k + slots[t] * s_slot + int64_t(h - heads) * dim;
#pragma omp simd
            for (int i = 0; i < half; ++i) {
                float x1 = load(src[i]), x2 = load(src[i + half]), ci = load(c[i]), si = load(s[i]);
                store(dst + i, round_to<T>(x1 * ci) - round_to<T>(x2 * si));
                store(dst + i + half, round_to<T>(x2 * ci) + round_to<T>(x1 * si));
            }
        }
    }
}

// Decode attention works on 16-float vectors (GCC / clang vector extensions: one AVX-512 register, two
// AVX2 or four NEON ones) so that a chunk of query heads keeps its query and running output in registers.
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

inline f32x16 load16(const float* p) {
    f32x16 v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}
inline f32x16 load16(const bf16* p) {
    u16x16 h;
    __builtin_memcpy(&h, p, sizeof h);
    return (f32x16)(__builtin_convertvector(h, u32x16) << 16);
}

// Sixteen horizontal sums at once: lane l of the result is the sum of the lanes of v[bit_reverse(l)].
// Each level adds the two halves of every segment of two vectors and interleaves the results, halving
// the vectors and the segment width; after four levels lane l holds the 4-bit reversal of l.
#define GLLM_FOLD(x, y, ...) (__builtin_shufflevector(x, y, __VA_ARGS__))
inline f32x16 sum16x16(const f32x16* v) {
    f32x16 e[8], f[4], g[2];
    for (int i = 0; i < 8; ++i)
        e[i] = GLLM_FOLD(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               GLLM_FOLD(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; ++i)
        f[i] = GLLM_FOLD(e[2 * i], e[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
               GLLM_FOLD(e[2 * i], e[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int i = 0; i < 2; ++i)
        g[i] = GLLM_FOLD(f[2 * i], f[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
               GLLM_FOLD(f[2 * i], f[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    return GLLM_FOLD(g[0], g[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
           GLLM_FOLD(g[0], g[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
#undef GLLM_FOLD

constexpr int bit_reverse4(int i) { return ((i & 1) << 3) | ((i & 2) << 1) | ((i & 4) >> 1) | ((i & 8) >> 3); }

// One query token per sequence against its cached tokens, read block by block in place. G query heads
// that share KV head `kvh` are done together so each cached K/V row is read once for all of them (the
// dispatcher splits larger groups into such chunks). Online softmax in float32, TILE tokens at a time.
template <typename T, int DIM, int G>
void attend_heads(const T* q, const T* cache_k, const T* cache_v, const int64_t* table, int64_t len, T* out,
                  int kvh, int block_size, int64_t s_token, int64_t s_block, float scale, int64_t window,
                  float softcap) {
    constexpr int V = DIM / 16;
    f32x16 qv[G][V], acc[G][V], partial[G][TILE / 16][16];
    float scores[G][TILE], best[G], total[G];
    int64_t rows[TILE], next[TILE];
    for (int g = 0; g < G; ++g) {
        for (int c = 0; c < V; ++c) qv[g][c] = load16(q + g * DIM + c * 16) * scale, acc[g][c] = f32x16{};
        best[g] = -std::numeric_limits<float>::infinity();
        total[g] = 0.0f;
    }
    // A sliding-window layer sees the last `window` positions only: the blocks before them are not read.
    const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    int64_t block = first / block_size, offset = first % block_size;  // the cache position of the next row
    auto locate = [&](int64_t* out, int count) {  // the next rows, as offsets into either plane
        for (int j = 0; j < count; ++j) {
            out[j] = table[block] * s_block + offset * s_token + kvh * DIM;
            if (++offset == block_size) offset = 0, ++block;
        }
    };
    // The rows are scattered over blocks, which the hardware prefetcher cannot follow: ask for each
    // tile's keys and values one tile ahead of computing it (and for the first at once).
    auto prefetch = [&](const int64_t* offsets, int count) {
        for (int j = 0; j < count; ++j)
            for (int byte = 0; byte < int(DIM * sizeof(T)); byte += 64) {
                __builtin_prefetch(reinterpret_cast<const char*>(cache_k + offsets[j]) + byte);
                __builtin_prefetch(reinterpret_cast<const char*>(cache_v + offsets[j]) + byte);
            }
    };
    locate(next, int(std::min<int64_t>(TILE, len - first)));
    prefetch(next, int(std::min<int64_t>(TILE, len - first)));
    for (int64_t start = first; start < len; start += TILE) {
        const int n = int(std::min<int64_t>(TILE, len - start));
        std::copy(next, next + n, rows);
        const int ahead = int(std::clamp<int64_t>(len - start - TILE, 0, TILE));
        locate(next, ahead);
        prefetch(next, ahead);
        for (int j = 0; j < TILE; ++j) {  // per token and head: the 16 partial sums of q . k
            f32x16 k[V];
            for (int c = 0; c < V; ++c) k[c] = j < n ? load16(cache_k + rows[j] + c * 16) : f32x16{};
            for (int g = 0; g < G; ++g) {
                f32x16 dot = qv[g][0] * k[0];
                for (int c = 1; c < V; ++c) dot += qv[g][c] * k[c];
                partial[g][j / 16][bit_reverse4(j % 16)] = dot;
            }
        }
        for (int g = 0; g < G; ++g)
            for (int half = 0; half < TILE / 16; ++half) {
                f32x16 sums = sum16x16(partial[g][half]);
                __builtin_memcpy(scores[g] + 16 * half, &sums, sizeof sums);
            }
        if (softcap > 0.0f)  // Gemma 2: scores squashed into (-softcap, softcap)
            for (int g = 0; g < G; ++g)
                for (int j = 0; j < n; ++j) scores[g][j] = softcap * std::tanh(scores[g][j] / softcap);
        for (int g = 0; g < G; ++g) {
            float peak = best[g];
            for (int j = 0; j < n; ++j) peak = std::max(peak, scores[g][j]);
            float shrink = exp_approx(best[g] - peak), sum = 0.0f;
            for (int j = 0; j < n; ++j) {
                scores[g][j] = exp_approx(scores[g][j] - peak);
                sum += scores[g][j];
            }
            total[g] = total[g] * shrink + sum;
            best[g] = peak;
            for (int c = 0; c < V; ++c) acc[g][c] *= shrink;
        }
        for (int j = 0; j < n; ++j) {
            f32x16 v[V];
            for (int c = 0; c < V; ++c) v[c] = load16(cache_v + rows[j] + c * 16);
            for (int g = 0; g < G; ++g)
                for (int c = 0; c < V; ++c) acc[g][c] += scores[g][j] * v[c];
        }
    }
    for (int g = 0; g < G; ++g) {
        const float inv = total[g] > 0.0f ? 1.0f / total[g] : 0.0f;
        for (int c = 0; c < V; ++c)
            for (int l = 0; l < 16; ++l) store(out + g * DIM + c * 16 + l, acc[g][c][l] * inv);
    }
}

// A chunk of query heads: at most 4, and at most 256 / DIM (2 of head dimension 128, 1 of 256): what fits
// in registers.
constexpr int chunk_heads(int dim) { return std::max(1, std::min(4, 256 / dim)); }

template <typename T, int DIM>
void decode_attention(const T* q, const T* cache_k, const T* cache_v, const int64_t* tables, const int64_t* lens,
                      T* out, int batch, int heads, int kv_heads, int block_size, int64_t s_table,
                      int64_t s_block, float scale, int64_t window, float softcap, int threads) {
    const int group = heads / kv_heads, chunks = (group + chunk_heads(DIM) - 1) / chunk_heads(DIM);
    const int64_t s_token = int64_t(kv_heads) * DIM;
#pragma omp parallel for collapse(3) schedule(dynamic) num_threads(threads)
    for (int b = 0; b < batch; ++b) {
        for (int kvh = 0; kvh < kv_heads; ++kvh) {
            for (int chunk = 0; chunk < chunks; ++chunk) {
                const int first = chunk * chunk_heads(DIM), count = std::min(chunk_heads(DIM), group - first);
                const int64_t at = (int64_t(b) * heads + kvh * group + first) * DIM;
                const auto args = std::make_tuple(q + at, cache_k, cache_v, tables + b * s_table, lens[b], out + at,
                                                  kvh, block_size, s_token, s_block, scale, window, softcap);
                if (count == 1) std::apply(attend_heads<T, DIM, 1>, args);
                if constexpr (chunk_heads(DIM) >= 2)
                    if (count == 2) std::apply(attend_heads<T, DIM, 2>, args);
                if constexpr (chunk_heads(DIM) >= 4) {
                    if (count == 3) std::apply(attend_heads<T, DIM, 3>, args);
                    if (count == 4) std::apply(attend_heads<T, DIM, 4>, args);
                }
            }
        }
    }
}

// Per row of float32 logits: the first index of the largest value, and log(sum(exp(x))). Two passes over
// the row: the maximum with where it first occurs (per vector lane, then across lanes), then the sum of
// exp(x - max). A NaN makes the sum NaN.
typedef int32_t i32x16 __attribute__((vector_size(64)));

void argmax_logsumexp(const float* logits, int64_t rows, int64_t vocab, int64_t stride, int64_t* argmax,
                      float* lse, int threads) {
#pragma omp parallel for num_threads(threads) if (rows * vocab >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; ++r) {
        const float* x = logits + r * stride;
        const int32_t whole = int32_t(vocab / 16 * 16);
        f32x16 most = f32x16{} - std::numeric_limits<float>::infinity();
        i32x16 where = i32x16{}, at = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        for (int32_t i = 0; i < whole; i += 16, at += 16) {
            const f32x16 v = load16(x + i);
            const i32x16 larger = v > most;  // strictly: each lane keeps its first maximum
            most = larger ? v : most;
            where = larger ? at : where;
        }
        float peak = -std::numeric_limits<float>::infinity();
        int64_t first = 0;
        for (int l = 0; l < 16; ++l)
            if (most[l] > peak || (most[l] == peak && where[l] < first)) peak = most[l], first = where[l];
        for (int64_t i = whole; i < vocab; ++i)
            if (x[i] > peak) peak = x[i], first = i;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < vocab; ++i) sum += exp_approx(x[i] - peak);
        argmax[r] = first;
        lse[r] = peak + std::log(sum);
    }
}

}  // namespace

#define GLLM_ATTENTION_ARGS \
    q, ck, cv, tables, lens, out, batch, heads, kv_heads, block_size, s_table, s_block, scale, window, softcap, threads
#define GLLM_EXPORT(suffix, T)                                                                                 \
    extern "C" void add_rms_norm_##suffix(const T* x, T* res, const T* w, T* out, int64_t rows, int64_t dim,   \
                                          int64_t sx, int64_t sr, int64_t so, int add, float eps, int threads) { \
        add_rms_norm<T>(x, res, w, out, rows, dim, sx, sr, so, add, eps, threads);                           \
    }                                                                                                          \
    extern "C" void silu_mul_##suffix(const T* gu, T* out, int64_t rows, int64_t inter, int64_t sg, int64_t so, \
                                      int threads) {                                                           \
        gate_mul<T, false>(gu, out, rows, inter, sg, so, threads);                                             \
    }                                                                                                          \
    extern "C" void gelu_tanh_mul_##suffix(const T* gu, T* out, int64_t rows, int64_t inter, int64_t sg,       \
                                           int64_t so, int threads) {                                          \
        gate_mul<T, true>(gu, out, rows, inter, sg, so, threads);                                              \
    }                                                                                                          \
    extern "C" void rope_write_kv_##suffix(const T* qkv, const T* cos, const T* sin, T* q, T* ck, T* cv,       \
                                           const int64_t* slots, int64_t tokens, int heads, int kv_heads,      \
                                           int dim, int64_t s_qkv, int64_t s_cos, int64_t s_sin, int64_t s_slot, \
                                           int threads) {                                                      \
        rope_write_kv<T>(qkv, cos, sin, q, ck, cv, slots, tokens, heads, kv_heads, dim, s_qkv, s_cos, s_sin,   \
                         s_slot, threads);                                                                     \
    }                                                                                                          \
    extern "C" int decode_attention_##suffix(const T* q, const T* ck, const T* cv, const int64_t* tables,      \
                                             const int64_t* lens, T* out, int batch, int heads, int kv_heads,  \
                                             int dim, int block_size, int64_t s_table, int64_t s_block,        \
                                             float scale, int64_t window, float softcap, int threads) {        \
        switch (dim) {                                                                                         \
            case 16: decode_attention<T, 16>(GLLM_ATTENTION_ARGS); break;                                      \
            case 32: decode_attention<T, 32>(GLLM_ATTENTION_ARGS); break;                                      \
            case 64: decode_attention<T, 64>(GLLM_ATTENTION_ARGS); break;                                      \
            case 96: decode_attention<T, 96>(GLLM_ATTENTION_ARGS); break;                                      \
            case 128: decode_attention<T, 128>(GLLM_ATTENTION_ARGS); break;                                    \
            case 256: decode_attention<T, 256>(GLLM_ATTENTION_ARGS); break;                                    \
            default: return 0;                                                                                 \
        }                                                                                                      \
        return 1;                                                                                              \
    }

GLLM_EXPORT(f32, float)
GLLM_EXPORT(bf16, bf16)

extern "C" void argmax_logsumexp_f32(const float* logits, int64_t rows, int64_t vocab, int64_t stride,
                                     int64_t* argmax, float* lse, int threads) {
    argmax_logsumexp(logits, rows, vocab, stride, argmax, lse, threads);
}
