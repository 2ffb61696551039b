// The AVX-512 path again, with AVX512-VNNI's vpdpwssd for the int16 multiply-adds
// (see kernels_avx512.cpp). ops.cpp selects it when the CPU has avx512vnni.
#define LLMB_AVX512_VNNI 1
#include "kernels_avx512.cpp"
