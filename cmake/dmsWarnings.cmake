# SPDX-License-Identifier: Apache-2.0
# dms_enable_warnings(<target>)
#
# The warning set for dms's own tests and examples (never exported to consumers): -Wall -Wextra
# -Wpedantic for GCC/Clang, /W4 for MSVC, plus -Werror (/WX) when DMS_WARNINGS_AS_ERRORS is ON.
# CUDA sources get the host compiler's -Wall -Wextra only: nvcc's generated host code is not
# -Wpedantic clean, so it is neither pedantic nor fatal there.
function(dms_enable_warnings target)
  set(_gnu "$<COMPILE_LANG_AND_ID:CXX,GNU,Clang,AppleClang>")
  set(_msvc "$<COMPILE_LANG_AND_ID:CXX,MSVC>")
  target_compile_options(${target} PRIVATE
    "$<${_gnu}:-Wall;-Wextra;-Wpedantic>"
    "$<${_msvc}:/W4>"
    "$<$<COMPILE_LANG_AND_ID:CUDA,NVIDIA>:-Xcompiler=-Wall,-Wextra>")
  if(DMS_WARNINGS_AS_ERRORS)
    target_compile_options(${target} PRIVATE "$<${_gnu}:-Werror>" "$<${_msvc}:/WX>")
  endif()
endfunction()
