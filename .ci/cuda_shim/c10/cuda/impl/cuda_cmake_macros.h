#pragma once
// Stand-in for the header a CUDA build of torch generates; only for compile checks.
#define C10_CUDA_BUILD_SHARED_LIBS
