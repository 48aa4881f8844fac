# SPDX-License-Identifier: Apache-2.0
# Consumer-test driver: builds and runs a tiny program that uses dms the way a user would.
#
#   cmake -DMODE=<mode> -DDMS_SOURCE_DIR=... -DDMS_BINARY_DIR=... -DWORK_DIR=...
#         -DEXPECTED_VERSION=x.y.z -DCXX_COMPILER=... [-DGENERATOR=... -DCONFIG=...
#         -DEXPECT_CUDA=ON|OFF ...] -P driver.cmake
#
# Modes:
#   install           cmake --install <dms build> --prefix <work>/prefix, then find_package/ with
#                     CMAKE_PREFIX_PATH=<work>/prefix
#   install_cpu_only  the same, but the consumer cannot find the CUDA toolkit: dms::dms only
#   build_tree        find_package/ with dms_DIR=<dms build> (the build tree's export)
#   add_subdirectory  add_subdirectory/ with add_subdirectory(<dms source> dms)
#   add_subdirectory_cpu  the same without DMS_ENABLE_CUDA: from a CPU-only parent, dms must
#                     default to OFF and not look for a CUDA compiler
#   copy_in           copy include/dms into <work>/include and compile main.cpp with a plain -I
#
# Everything happens under WORK_DIR, which is wiped first; nothing touches the network.
cmake_minimum_required(VERSION 3.25)

foreach(_var IN ITEMS MODE DMS_SOURCE_DIR DMS_BINARY_DIR WORK_DIR EXPECTED_VERSION CXX_COMPILER)
  if(NOT DEFINED ${_var} OR "${${_var}}" STREQUAL "")
    message(FATAL_ERROR "driver.cmake: -D${_var}=... is required")
  endif()
endforeach()
if(NOT CONFIG)
  set(CONFIG Release)
endif()
if(NOT DEFINED EXPECT_CUDA OR "${EXPECT_CUDA}" STREQUAL "")
  set(EXPECT_CUDA OFF)
endif()

set(_consumer_dir "${CMAKE_CURRENT_LIST_DIR}")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

# run(<description> <command>...): runs a command, echoing it and its output; fails the test if it
# fails. The output is left in RUN_OUTPUT.
function(run what)
  list(JOIN ARGN " " _text)
  message(STATUS "[${MODE}] ${what}: ${_text}")
  execute_process(COMMAND ${ARGN}
    RESULT_VARIABLE _rc
    OUTPUT_VARIABLE _out
    ERROR_VARIABLE _out
    ECHO_OUTPUT_VARIABLE
    ECHO_ERROR_VARIABLE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "[${MODE}] ${what} failed (${_rc}): ${_text}")
  endif()
  set(RUN_OUTPUT "${_out}" PARENT_SCOPE)
endfunction()

# run_program(<path>): the consumer must run and report the expected version.
function(run_program program)
  foreach(_candidate IN ITEMS "${program}" "${program}.exe")
    if(EXISTS "${_candidate}")
      run("run" "${_candidate}")
      if(NOT RUN_OUTPUT MATCHES "dms ${EXPECTED_VERSION} ")
        message(FATAL_ERROR "[${MODE}] ${_candidate} did not report dms ${EXPECTED_VERSION}")
      endif()
      return()
    endif()
  endforeach()
  message(FATAL_ERROR "[${MODE}] ${program} was not built")
endfunction()

# build_consumer(<project dir> <cmake -D args>...): configure, build and run a consumer project.
function(build_consumer project_dir)
  set(_build "${WORK_DIR}/build")
  set(_args -S "${project_dir}" -B "${_build}"
      "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}"
      "-DCMAKE_BUILD_TYPE=${CONFIG}"
      "-DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF"
      "-DDMS_EXPECTED_VERSION=${EXPECTED_VERSION}"
      "-DDMS_EXPECT_CUDA=${EXPECT_CUDA}")
  if(GENERATOR)
    list(APPEND _args -G "${GENERATOR}")
  endif()
  if(GENERATOR_PLATFORM)
    list(APPEND _args -A "${GENERATOR_PLATFORM}")
  endif()
  if(GENERATOR_TOOLSET)
    list(APPEND _args -T "${GENERATOR_TOOLSET}")
  endif()
  if(MAKE_PROGRAM)
    list(APPEND _args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
  endif()
  if(CUDA_COMPILER AND EXPECT_CUDA)
    # Find the same toolkit as dms's own build did.
    get_filename_component(_cuda_root "${CUDA_COMPILER}" DIRECTORY)
    get_filename_component(_cuda_root "${_cuda_root}" DIRECTORY)
    list(APPEND _args "-DCUDAToolkit_ROOT=${_cuda_root}")
  endif()
  run("configure" "${CMAKE_COMMAND}" ${_args} ${ARGN})
  run("build" "${CMAKE_COMMAND}" --build "${_build}" --config "${CONFIG}")
  run_program("${_build}/bin/consumer")
  if(EXPECT_CUDA)
    run_program("${_build}/bin/consumer_cuda")
  endif()
  set(CONSUMER_BUILD_DIR "${_build}" PARENT_SCOPE)
endfunction()

# expect_dms_dir(<dir> [EXACT]): the consumer's find_package(dms) must have used the package under
# <dir> (with EXACT: the dmsConfig.cmake directly in <dir>).
function(expect_dms_dir dir)
  file(STRINGS "${CONSUMER_BUILD_DIR}/CMakeCache.txt" _line REGEX "^dms_DIR:")
  string(REGEX REPLACE "^dms_DIR:[A-Z]+=" "" _found "${_line}")
  file(REAL_PATH "${_found}" _found)
  file(REAL_PATH "${dir}" _dir)
  string(FIND "${_found}/" "${_dir}/" _pos)
  if(NOT _pos EQUAL 0 OR ("EXACT" IN_LIST ARGN AND NOT _found STREQUAL _dir))
    message(FATAL_ERROR "[${MODE}] find_package(dms) used ${_found}, not the package under ${_dir}")
  endif()
endfunction()

if(MODE STREQUAL "install" OR MODE STREQUAL "install_cpu_only")
  set(_prefix "${WORK_DIR}/prefix")
  run("install" "${CMAKE_COMMAND}" --install "${DMS_BINARY_DIR}" --prefix "${_prefix}"
      --config "${CONFIG}")
  file(GLOB_RECURSE _configs "${_prefix}/*/dmsConfig.cmake")
  foreach(_file IN ITEMS include/dms/dms.hpp include/dms/version.hpp)
    if(NOT EXISTS "${_prefix}/${_file}")
      message(FATAL_ERROR "[${MODE}] the install lacks ${_file}")
    endif()
  endforeach()
  if(NOT _configs)
    message(FATAL_ERROR "[${MODE}] the install lacks dmsConfig.cmake")
  endif()
  set(_extra "-DCMAKE_PREFIX_PATH=${_prefix}")
  if(MODE STREQUAL "install_cpu_only")
    list(APPEND _extra "-DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON")
  endif()
  build_consumer("${_consumer_dir}/find_package" ${_extra})
  expect_dms_dir("${_prefix}")

elseif(MODE STREQUAL "build_tree")
  # A prefix, not dms_DIR: the version-mismatch probe in find_package/ would reset dms_DIR.
  build_consumer("${_consumer_dir}/find_package" "-DCMAKE_PREFIX_PATH=${DMS_BINARY_DIR}")
  expect_dms_dir("${DMS_BINARY_DIR}" EXACT)

elseif(MODE STREQUAL "add_subdirectory")
  set(_extra "-DDMS_SOURCE_DIR=${DMS_SOURCE_DIR}")
  if(DEFINED DMS_ENABLE_CUDA AND NOT "${DMS_ENABLE_CUDA}" STREQUAL "")
    list(APPEND _extra "-DDMS_ENABLE_CUDA=${DMS_ENABLE_CUDA}")
  endif()
  if(EXPECT_CUDA)
    list(APPEND _extra "-DCMAKE_CUDA_COMPILER=${CUDA_COMPILER}"
                       "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}")
  endif()
  build_consumer("${_consumer_dir}/add_subdirectory" ${_extra})

elseif(MODE STREQUAL "add_subdirectory_cpu")
  build_consumer("${_consumer_dir}/add_subdirectory" "-DDMS_SOURCE_DIR=${DMS_SOURCE_DIR}"
                 "-DDMS_EXPECT_CUDA_DEFAULT_OFF=ON")

elseif(MODE STREQUAL "copy_in")
  file(COPY "${DMS_SOURCE_DIR}/include/dms" DESTINATION "${WORK_DIR}/include")
  set(_program "${WORK_DIR}/consumer")
  run("compile" "${CXX_COMPILER}" -std=c++20 -Wall -Wextra -Wpedantic -Werror
      "-I${WORK_DIR}/include" "${_consumer_dir}/main.cpp" -o "${_program}")
  run_program("${_program}")

else()
  message(FATAL_ERROR "driver.cmake: unknown MODE '${MODE}'")
endif()

message(STATUS "[${MODE}] PASS")
