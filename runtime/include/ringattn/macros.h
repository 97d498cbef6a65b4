#pragma once
/// Portability macros shared by host (.cc) and device (.cu) code.

#if defined(__CUDACC__)
#define RINGATTN_HD __host__ __device__ __forceinline__
#else
#define RINGATTN_HD inline
#endif
