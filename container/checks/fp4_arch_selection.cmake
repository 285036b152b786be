# Evaluate the pinned vLLM's own CUDA arch selection for the SM12x NVFP4 kernels, without a GPU or a
# configure run:
#
#   cmake -DVLLM_SRC=<sdist dir> -DTORCH_CUDA_ARCH_LIST=12.1a [-DCUDA_VERSION=13.0] -P fp4_arch_selection.cmake
#
# Steps, in the order vLLM's CMakeLists.txt runs them:
#  1. TORCH_CUDA_ARCH_LIST -> `-gencode` flags the way torch's CMake writes them (12.1a ->
#     arch=compute_121a,code=sm_121a);
#  2. vLLM's clear_cuda_arches / extract_unique_cuda_archs_ascending -> CUDA_ARCHS;
#  3. vLLM's cuda_archs_loose_intersection with the CUDA_SUPPORTED_ARCHS that CMakeLists.txt sets for
#     this CUDA version;
#  4. vLLM's cuda_archs_loose_intersection with the FP4_SM120 source arch list of CMakeLists.txt.
# The functions come from the sdist's cmake/utils.cmake; the two arch lists are read out of its
# CMakeLists.txt, so a change upstream shows up here. Prints `FP4_SM120_ARCHS=<list>` last.
cmake_minimum_required(VERSION 3.20)
if(NOT VLLM_SRC OR NOT TORCH_CUDA_ARCH_LIST)
  message(FATAL_ERROR "pass -DVLLM_SRC=<vllm sdist dir> -DTORCH_CUDA_ARCH_LIST=<archs>")
endif()
if(NOT CUDA_VERSION)
  set(CUDA_VERSION 13.0)
endif()
set(CMAKE_CUDA_COMPILER_VERSION ${CUDA_VERSION})
include(${VLLM_SRC}/cmake/utils.cmake)
file(READ ${VLLM_SRC}/CMakeLists.txt _lists)
# Arch lists hold ";", which would split CMake lists of matches: read them with "," instead.
string(REPLACE ";" "," _lists "${_lists}")

# 1. torch's gencode flags
set(CMAKE_CUDA_FLAGS "-Xfatbin -compress-all")
string(REPLACE " " ";" _requested "${TORCH_CUDA_ARCH_LIST}")
foreach(_a ${_requested})
  string(REPLACE "+PTX" "" _base "${_a}")
  string(REPLACE "." "" _num "${_base}")
  string(APPEND CMAKE_CUDA_FLAGS " -gencode arch=compute_${_num},code=sm_${_num}")
  if(_a MATCHES "\\+PTX$")
    string(APPEND CMAKE_CUDA_FLAGS " -gencode arch=compute_${_num},code=compute_${_num}")
  endif()
endforeach()
message(STATUS "torch gencode flags: ${CMAKE_CUDA_FLAGS}")

# 2. vLLM: target archs from the flags
clear_cuda_arches(CUDA_ARCH_FLAGS)
extract_unique_cuda_archs_ascending(CUDA_ARCHS "${CUDA_ARCH_FLAGS}")
message(STATUS "CUDA target architectures: ${CUDA_ARCHS}")

# 3. vLLM: filter by the supported archs for this CUDA version (first list of the >= 13.0 / >= 12.8
#    / else chain in CMakeLists.txt)
string(REGEX MATCHALL "set\\(CUDA_SUPPORTED_ARCHS \"[^\"]*\"\\)" _supported_sets "${_lists}")
list(LENGTH _supported_sets _n)
if(NOT _n EQUAL 3)
  message(FATAL_ERROR "expected 3 CUDA_SUPPORTED_ARCHS lists in CMakeLists.txt, found ${_n}")
endif()
if(CUDA_VERSION VERSION_GREATER_EQUAL 13.0)
  list(GET _supported_sets 0 _s)
elseif(CUDA_VERSION VERSION_GREATER_EQUAL 12.8)
  list(GET _supported_sets 1 _s)
else()
  list(GET _supported_sets 2 _s)
endif()
string(REGEX REPLACE "^set\\(CUDA_SUPPORTED_ARCHS \"([^\"]*)\"\\)$" "\\1" CUDA_SUPPORTED_ARCHS "${_s}")
string(REPLACE "," ";" CUDA_SUPPORTED_ARCHS "${CUDA_SUPPORTED_ARCHS}")
message(STATUS "CUDA supported archs (CUDA ${CUDA_VERSION}): ${CUDA_SUPPORTED_ARCHS}")
cuda_archs_loose_intersection(CUDA_ARCHS "${CUDA_SUPPORTED_ARCHS}" "${CUDA_ARCHS}")
message(STATUS "CUDA supported target architectures: ${CUDA_ARCHS}")

# 4. vLLM: the SM12x NVFP4 kernels' arch list (the >= 13.0 branch, else the older one)
string(REGEX MATCHALL "cuda_archs_loose_intersection\\(FP4_SM120_ARCHS \"[^\"]*\"" _fp4_sets "${_lists}")
list(LENGTH _fp4_sets _n)
if(NOT _n EQUAL 2)
  message(FATAL_ERROR "expected 2 FP4_SM120_ARCHS selections in CMakeLists.txt, found ${_n}")
endif()
if(CUDA_VERSION VERSION_GREATER_EQUAL 13.0)
  list(GET _fp4_sets 0 _s)
else()
  list(GET _fp4_sets 1 _s)
endif()
string(REGEX REPLACE "^.*\"([^\"]*)\"$" "\\1" _fp4_src "${_s}")
string(REPLACE "," ";" _fp4_src "${_fp4_src}")
cuda_archs_loose_intersection(FP4_SM120_ARCHS "${_fp4_src}" "${CUDA_ARCHS}")
message(STATUS "FP4 SM120 source archs: ${_fp4_src}")
message("FP4_SM120_ARCHS=${FP4_SM120_ARCHS}")
