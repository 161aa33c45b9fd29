// Low-rank updates of rows under different LoRA adapters, on the CPU (gllm/lora/grouped.py, MixedRows).
//
// The rows come grouped by adapter: group g is rows[starts[g]] .. rows[starts[g + 1] - 1] of the batch, under
// the adapter at place g of the step's stacks (a: [adapters, in, R]; each output part's b: [adapters, w, out]).
// Two passes, like the Triton kernels of gllm/lora/triton_lora.py:
//   lora_shrink: u[i, :] = x[rows[i], :] @ a[g]                       (float32 u, summed in float32)
//   lora_expand: y[rows[i], out0 + n] += u[i, col0 + :w] @ b[g][:, n]  (summed in float32, one rounding)
// Each adapter's matrices are read in place, once for every ROW_BLOCK rows of its group: no padding to the
// busiest adapter, no gathered copies, and one adapter's many decode rows read it about once. OpenMP
// across groups, row blocks (and column tiles).

#include <algorithm>
#include <cstdint>
#include <vector>

using bf16 = uint16_t;

namespace {

constexpr int64_t COLUMN_TILE = 256;  // output columns one task of lora_expand sums
constexpr int64_t ROW_BLOCK = 8;      // rows of one group that share each read of the adapter
constexpr int MAX_RANK = 256;         // total rank of a site that lora_shrink takes (the caller checks)

inline float load(float x) { return x; }
inline float load(bf16 x) { return __builtin_bit_cast(float, uint32_t(x) << 16); }
inline void store(float* p, float x) { *p = x; }
inline void store(bf16* p, float x) {  // round to nearest even, as torch does; NaN stays NaN
    uint32_t u = __builtin_bit_cast(uint32_t, x);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    *p = bf16((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

struct Block {  // up to ROW_BLOCK rows of one group: rows list [first, first + count), adapter g
    int64_t g, first, count;
};

std::vector<Block> blocks(const int32_t* starts, int64_t groups) {
    std::vector<Block> out;
    for (int64_t g = 0; g < groups; ++g)
        for (int64_t first = starts[g]; first < starts[g + 1]; first += ROW_BLOCK)
            out.push_back({g, first, std::min<int64_t>(ROW_BLOCK, starts[g + 1] - first)});
    return out;
}

template <typename T>
void shrink(const T* x, int64_t sx, const int32_t* rows, const int32_t* starts, int64_t groups, const T* a,
            int64_t d_in, int64_t rank, float* u, int threads) {
    const std::vector<Block> work = blocks(starts, groups);
    const int64_t tasks = int64_t(work.size());
#pragma omp parallel for num_threads(threads) if (tasks > 1)
    for (int64_t t = 0; t < tasks; ++t) {
        const Block b = work[t];
        const T* ag = a + b.g * d_in * rank;
        float acc[ROW_BLOCK][MAX_RANK] = {};
        for (int64_t j = 0; j < d_in; ++j) {
            const T* aj = ag + j * rank;
            for (int64_t i = 0; i < b.count; ++i) {
                const float xj = load(x[int64_t(rows[b.first + i]) * sx + j]);
                float* acc_i = acc[i];
#pragma omp simd
                for (int64_t r = 0; r < rank; ++r) acc_i[r] += xj * load(aj[r]);
            }
        }
        for (int64_t i = 0; i < b.count; ++i) std::copy(acc[i], acc[i] + rank, u + (b.first + i) * rank);
    }
}

template <typename T>
void expand(const float* u, int64_t rank, int64_t col0, int64_t width, const int32_t* rows, const int32_t* starts,
            int64_t groups, const T* b, int64_t out_cols, T* y, int64_t sy, int64_t out0, int threads) {
    const std::vector<Block> work = blocks(starts, groups);
    const int64_t tiles = (out_cols + COLUMN_TILE - 1) / COLUMN_TILE, tasks = int64_t(work.size()) * tiles;
#pragma omp parallel for num_threads(threads) if (tasks > 1)
    for (int64_t t = 0; t < tasks; ++t) {
        const Block blk = work[t / tiles];
        const int64_t start = (t % tiles) * COLUMN_TILE, n = std::min(out_cols, start + COLUMN_TILE) - start;
        const T* bg = b + blk.g * width * out_cols + start;
        float acc[ROW_BLOCK][COLUMN_TILE] = {};
        for (int64_t w = 0; w < width; ++w) {
            const T* bw = bg + w * out_cols;
            for (int64_t i = 0; i < blk.count; ++i) {
                const float uw = u[(blk.first + i) * rank + col0 + w];
                float* acc_i = acc[i];
#pragma omp simd
                for (int64_t c = 0; c < n; ++c) acc_i[c] += uw * load(bw[c]);
            }
        }
        for (int64_t i = 0; i < blk.count; ++i) {
            T* yi = y + int64_t(rows[blk.first + i]) * sy + out0 + start;
            for (int64_t c = 0; c < n; ++c) store(yi + c, load(yi[c]) + acc[i][c]);
        }
    }
}

}  // namespace

#define LORA_KERNELS(T, suffix)                                                                                 \
    extern "C" int lora_shrink_##suffix(const T* x, int64_t sx, const int32_t* rows, const int32_t* starts,     \
                                        int64_t groups, const T* a, int64_t d_in, int64_t rank, float* u,       \
                                        int threads) {                                                          \
        if (rank > MAX_RANK) return 1;                                                                          \
        shrink<T>(x, sx, rows, starts, groups, a, d_in, rank, u, threads);                                      \
        return 0;                                                                                               \
    }                                                                                                           \
    extern "C" void lora_expand_##suffix(const float* u, int64_t rank, int64_t col0, int64_t width,            \
                                         const int32_t* rows, const int32_t* starts, int64_t groups, const T* b, \
                                         int64_t out_cols, T* y, int64_t sy, int64_t out0, int threads) {       \
        expand<T>(u, rank, col0, width, rows, starts, groups, b, out_cols, y, sy, out0, threads);               \
    }

LORA_KERNELS(float, f32)
LORA_KERNELS(bf16, bf16)
