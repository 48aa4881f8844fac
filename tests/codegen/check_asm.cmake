# SPDX-License-Identifier: Apache-2.0
# cmake -DCOMPILER=<c++> -DINCLUDE_DIR=<dir> -DSOURCE=<file.cpp> -P check_asm.cmake
#
# A codegen check: compiles SOURCE to assembly (C++20, -O3 -DNDEBUG, as the Release build) and
# counts an instruction in it. SOURCE's first line says which and how many at least:
# `// expect: <mnemonic> >= <count>`. For what no unit test can see, because results do not
# change: a kernel's software prefetches, deleted by the compiler, only cost speed.
cmake_minimum_required(VERSION 3.25)

foreach(_var IN ITEMS COMPILER INCLUDE_DIR SOURCE)
  if(NOT DEFINED ${_var} OR "${${_var}}" STREQUAL "")
    message(FATAL_ERROR "check_asm.cmake: -D${_var}=... is required")
  endif()
endforeach()
file(STRINGS "${SOURCE}" _first_line LIMIT_COUNT 1)
if(NOT _first_line MATCHES "^//[ \t]*expect:[ \t]*([a-z0-9]+)[ \t]*>=[ \t]*([0-9]+)[ \t]*$")
  message(FATAL_ERROR "${SOURCE}: the first line must be `// expect: <mnemonic> >= <count>`")
endif()
set(_mnemonic "${CMAKE_MATCH_1}")
set(_min "${CMAKE_MATCH_2}")

set(_command "${COMPILER}" -std=c++20 -O3 -DNDEBUG "-I${INCLUDE_DIR}" -S -o - "${SOURCE}")
list(JOIN _command " " _command_text)
execute_process(COMMAND ${_command} RESULT_VARIABLE _rc OUTPUT_VARIABLE _asm ERROR_VARIABLE _err)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "FAIL: ${SOURCE} did not compile.\nCommand: ${_command_text}\n${_err}")
endif()
# One instruction per line: a tab, the mnemonic, then whitespace.
string(REGEX MATCHALL "\t${_mnemonic}[ \t]" _hits "${_asm}")
list(LENGTH _hits _count)
if(_count LESS _min)
  message(FATAL_ERROR "FAIL: ${SOURCE} compiles to ${_count} ${_mnemonic} instructions, expected "
                      "at least ${_min}.\nCommand: ${_command_text}")
endif()
message(STATUS "ok: ${_count} ${_mnemonic} instructions (at least ${_min}) in ${SOURCE}")
