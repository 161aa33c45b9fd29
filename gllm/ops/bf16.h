// bfloat16 as raw bits beside float32: load widens, store rounds to nearest even as torch does.
// Shared by the C++ kernels that take either dtype (cpu_kernels.cpp, lora_rows.cpp).
#pragma once

#include <cstdint>

using bf16 = uint16_t;

inline float load(float x) { return x; }
inline float load(bf16 x) { return __builtin_bit_cast(float, uint32_t(x) << 16); }

inline void store(float* p, float x) { *p = x; }
inline void store(bf16* p, float x) {  // NaN stays NaN
    uint32_t u = __builtin_bit_cast(uint32_t, x);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    *p = bf16((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}
