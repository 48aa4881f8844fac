// SPDX-License-Identifier: Apache-2.0
// The program every consumer test builds: it only needs the umbrella header to compile and link.
#include <cstdio>

#include "dms/dms.hpp"

#if defined(DMS_CONSUMER_CUDA)
#include <cuda_runtime_api.h>
#endif

static_assert(DMS_VERSION ==
              DMS_VERSION_MAJOR * 10000 + DMS_VERSION_MINOR * 100 + DMS_VERSION_PATCH);

int main() {
  std::printf("dms %d.%d.%d (DMS_VERSION %d)\n", DMS_VERSION_MAJOR, DMS_VERSION_MINOR,
              DMS_VERSION_PATCH, DMS_VERSION);
#if defined(DMS_CONSUMER_CUDA)
  std::printf("built against CUDA runtime headers %d\n", CUDART_VERSION);
#endif
  return 0;
}
