// SPDX-License-Identifier: Apache-2.0
// The Catch2 main shared by dms_tests and dms_gpu_tests.
//
// dms_gpu_tests compiles this file with DMS_TESTS_REQUIRE_CUDA_DEVICE: on a machine without a CUDA
// device it prints a notice and exits with status 77, which CTest reports as "skipped"
// (SKIP_RETURN_CODE) rather than failed. Listing the tests (used by catch_discover_tests at build
// time) never touches the device.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#if defined(DMS_TESTS_REQUIRE_CUDA_DEVICE)
#include <cuda_runtime_api.h>

#include <cstdio>
#endif

int main(int argc, char* argv[]) {
  Catch::Session session;
  if (const int rc = session.applyCommandLine(argc, argv); rc != 0) return rc;

#if defined(DMS_TESTS_REQUIRE_CUDA_DEVICE)
  const auto& cfg = session.configData();
  const bool listing =
      cfg.listTests || cfg.listTestNamesOnly || cfg.listTags || cfg.listReporters || cfg.showHelp;
  if (!listing) {
    int devices = 0;
    const cudaError_t status = cudaGetDeviceCount(&devices);
    if (status != cudaSuccess || devices == 0) {
      std::printf("dms_gpu_tests: no usable CUDA device (%s); skipping\n",
                  status != cudaSuccess ? cudaGetErrorString(status) : "0 devices");
      return 77;
    }
  }
#endif

  return session.run();
}
