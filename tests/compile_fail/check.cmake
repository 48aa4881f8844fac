# SPDX-License-Identifier: Apache-2.0
# cmake -DCOMPILER=<c++> -DINCLUDE_DIR=<dir> -DSOURCE=<file.cpp> [-DREGEX=<regex>] -P check.cmake
#
# A must-not-compile check: succeeds iff compiling SOURCE fails AND the diagnostics match REGEX.
# Without REGEX, the regex is read from SOURCE's first line, which must be `// expect: <regex>`.
# Matching the diagnostic (not just "it failed") keeps a typo or a broken header from passing as
# the expected rejection.
cmake_minimum_required(VERSION 3.25)

foreach(_var IN ITEMS COMPILER INCLUDE_DIR SOURCE)
  if(NOT DEFINED ${_var} OR "${${_var}}" STREQUAL "")
    message(FATAL_ERROR "check.cmake: -D${_var}=... is required")
  endif()
endforeach()
if(NOT EXISTS "${SOURCE}")
  message(FATAL_ERROR "check.cmake: ${SOURCE} does not exist")
endif()

if(NOT DEFINED REGEX OR "${REGEX}" STREQUAL "")
  file(STRINGS "${SOURCE}" _first_line LIMIT_COUNT 1)
  if(NOT _first_line MATCHES "^//[ \t]*expect:[ \t]*(.*[^ \t])[ \t]*$")
    message(FATAL_ERROR "${SOURCE}: the first line must be `// expect: <regex>` naming the "
                        "diagnostic the compiler has to produce")
  endif()
  set(REGEX "${CMAKE_MATCH_1}")
endif()

set(_command "${COMPILER}" -std=c++20 -fsyntax-only -fdiagnostics-color=never
             "-I${INCLUDE_DIR}" "${SOURCE}")
list(JOIN _command " " _command_text)
# LC_ALL=C: plain ASCII quotes in the diagnostics, whatever the caller's locale.
execute_process(
  COMMAND "${CMAKE_COMMAND}" -E env LC_ALL=C ${_command}
  RESULT_VARIABLE _rc
  OUTPUT_VARIABLE _output
  ERROR_VARIABLE _output)

if(_rc EQUAL 0)
  message(FATAL_ERROR "FAIL: ${SOURCE} compiled, but it must be rejected "
                      "(expected a diagnostic matching '${REGEX}').\nCommand: ${_command_text}")
endif()
if(NOT _output MATCHES "${REGEX}")
  message(FATAL_ERROR "FAIL: ${SOURCE} was rejected, but not with a diagnostic matching "
                      "'${REGEX}'.\nCommand: ${_command_text}\nCompiler output:\n${_output}")
endif()
message(STATUS "PASS: ${SOURCE} is rejected with a diagnostic matching '${REGEX}'")
