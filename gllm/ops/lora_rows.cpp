// Low-rank updates of rows under different LoRA adapters, on the CPU (gllm/lora/grouped.py, MixedRows).
//
// Each row i of a step names a row of the batch (rows[i]) and its adapter's place in the step's stacks
// (slots[i]): a is [adapters, in, R], each output part's b is [adapters, w, out]. Two passes, like the
// Triton kernels of gllm/lora/triton_lora.py:
//   lora_shrink: u[i, :] = x[rows[i], :] @ a[slots[i]]            (float32 u, summed in float32)
//   lora_expand: y[rows[i], out0 + n] += u[i, col0 + :w] @ b[slots[i]][:, n]  (summed in float32, one rounding)
// Each adapter's matrices are read in place, once per row: no padding to the busiest adapter and no
// gathered copies, where torch's batched products need both. OpenMP across rows (and column tiles).

#include <algorithm>
#include <cstdint>

using bf16 = uint16_t;

namespace {

constexpr int64_t COLUMN_TILE = 512;  // output columns one task of lora_expand sums
constexpr int MAX_RANK = 256;         // total rank of a site that lora_shrink takes (the caller checks)

inline float load(float x) { return x; }
inline float load(bf16 x) { return __builtin_bit_cast(float, uint32_t(x) << 16); }
inline void store(float* p, float x) { *p = x; }
inline void store(bf16* p, float x) {  // round to nearest even, as torch does; NaN stays NaN
    uint32_t u = __builtin_bit_cast(uint32_t, x);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    *p = bf16((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

template <typename T>
void shrink(const T* x, int64_t sx, const int32_t* rows, const int32_t* slots, int64_t count, const T* a,
            int64_t d_in, int64_t rank, float* u, int threads) {
#pragma omp parallel for num_threads(threads) if (count > 1)
    for (int64_t i = 0; i < count; ++i) {
        const T* xi = x + int64_t(rows[i]) * sx;
        const T* ai = a + int64_t(slots[i]) * d_in * rank;
        float acc[MAX_RANK] = {};
        for (int64_t j = 0; j < d_in; ++j) {
            const float xj = load(xi[j]);
            const T* aj = ai + j * rank;
#pragma omp simd
            for (int64_t r = 0; r < rank; ++r) acc[r] += xj * load(aj[r]);
        }
        std::copy(acc, acc + rank, u + i * rank);
    }
}

template <typename T>
void expand(const float* u, int64_t rank, int64_t col0, int64_t width, const int32_t* rows, const int32_t* slots,
            int64_t count, const T* b, int64_t out_cols, T* y, int64_t sy, int64_t out0, int threads) {
    const int64_t tiles = (out_cols + COLUMN_TILE - 1) / COLUMN_TILE;
#pragma omp parallel for num_threads(threads) if (count * tiles > 1)
    for (int64_t task = 0; task < count * tiles; ++task) {
        const int64_t i = task / tiles, start = (task % tiles) * COLUMN_TILE;
        const int64_t stop = std::min(out_cols, start + COLUMN_TILE), n = stop - start;
        const float* ui = u + i * rank + col0;
        const T* bi = b + int64_t(slots[i]) * width * out_cols + start;
        float acc[COLUMN_TILE] = {};
        for (int64_t w = 0; w < width; ++w) {
            const float uw = ui[w];
            const T* bw = bi + w * out_cols;
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) acc[c] += uw * load(bw[c]);
        }
        T* yi = y + int64_t(rows[i]) * sy + out0 + start;
        for (int64_t c = 0; c < n; ++c) store(yi + c, load(yi[c]) + acc[c]);
    }
}

}  // namespace

#define LORA_KERNELS(T, suffix)                                                                                 \
    extern "C" int lora_shrink_##suffix(const T* x, int64_t sx, const int32_t* rows, const int32_t* slots,      \
                                        int64_t count, const T* a, int64_t d_in, int64_t rank, float* u,        \
                                        int threads) {                                                          \
        if (rank > MAX_RANK) return 1;                                                                          \
        shrink<T>(x, sx, rows, slots, count, a, d_in, rank, u, threads);                                        \
        return 0;                                                                                               \
    }                                                                                                           \
    extern "C" void lora_expand_##suffix(const float* u, int64_t rank, int64_t col0, int64_t width,            \
                                         const int32_t* rows, const int32_t* slots, int64_t count, const T* b,   \
                                         int64_t out_cols, T* y, int64_t sy, int64_t out0, int threads) {       \
        expand<T>(u, rank, col0, width, rows, slots, count, b, out_cols, y, sy, out0, threads);                 \
    }

LORA_KERNELS(float, f32)
LORA_KERNELS(bf16, bf16)
