# SPDX-License-Identifier: Apache-2.0
# dms_require_cuda_std_20(<interface target>)
#
# Requires C++20 for CUDA sources of everything that links <target>. CMake learned that nvcc >= 12
# supports C++20 only in a later release than the 3.25 this project accepts, so on such a CMake the
# compile feature is unknown and requesting it is a hard error; fall back to passing the flag.
function(dms_require_cuda_std_20 target)
  if("cuda_std_20" IN_LIST CMAKE_CUDA_COMPILE_FEATURES)
    target_compile_features(${target} INTERFACE cuda_std_20)
  elseif(CMAKE_CUDA_COMPILER_ID STREQUAL "NVIDIA" AND CMAKE_CUDA_COMPILER_VERSION VERSION_LESS 12.0)
    message(FATAL_ERROR "dms: C++20 device code needs nvcc 12.0 or newer "
                        "(found ${CMAKE_CUDA_COMPILER_VERSION})")
  else()
    target_compile_options(${target} INTERFACE
      "$<$<COMPILE_LANG_AND_ID:CUDA,NVIDIA>:-std=c++20>"
      "$<$<COMPILE_LANG_AND_ID:CUDA,Clang>:-std=c++20>")
  endif()
endfunction()
