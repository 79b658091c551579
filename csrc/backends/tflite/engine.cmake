# Locate LiteRT for the tflite backend plugin: libLiteRt.so from the unpacked ai-edge-litert wheel,
# the LiteRt C API headers kept in third_party/litert (the wheel ships none).
#
#   EDGESMITH_LITERT_ROOT         a directory holding the unpacked ai-edge-litert wheel
#                                 (`ai_edge_litert/libLiteRt.so`); defaults to the site-packages of
#                                 EDGESMITH_PYTHON (host builds only).
#   EDGESMITH_LITERT_INCLUDE_DIR  a directory holding litert/c/litert_compiled_model.h; default:
#                                 third_party/litert/include, vendored from google-ai-edge/LiteRT
#                                 (third_party/litert/README.md).
#
# Defines EDGESMITH_LITERT_FOUND, EDGESMITH_LITERT_VERSION (the wheel's version, from its
# dist-info, or "unknown"), EDGESMITH_LITERT_LIBRARY, EDGESMITH_LITERT_LIBRARY_DIRS and
# EDGESMITH_LITERT_INCLUDE_DIRS.
include_guard(GLOBAL)
include(EdgesmithPythonPackages)

set(EDGESMITH_LITERT_ROOT "" CACHE PATH "Directory with the unpacked ai-edge-litert wheel")
set(EDGESMITH_LITERT_INCLUDE_DIR "" CACHE PATH "Directory holding the LiteRt C API headers (litert/c/)")

set(EDGESMITH_LITERT_FOUND OFF)
edgesmith_wheel_root(ai_edge_litert "${EDGESMITH_LITERT_ROOT}" _edgesmith_litert_root)

if(_edgesmith_litert_root AND EXISTS "${_edgesmith_litert_root}/ai_edge_litert/libLiteRt.so")
  set(_edgesmith_litert_include "${EDGESMITH_LITERT_INCLUDE_DIR}")
  if(NOT _edgesmith_litert_include)
    set(_edgesmith_litert_include "${PROJECT_SOURCE_DIR}/third_party/litert/include")
  endif()
  if(EXISTS "${_edgesmith_litert_include}/litert/c/litert_compiled_model.h")
    set(EDGESMITH_LITERT_FOUND ON)
    set(EDGESMITH_LITERT_LIBRARY "${_edgesmith_litert_root}/ai_edge_litert/libLiteRt.so")
    set(EDGESMITH_LITERT_LIBRARY_DIRS "${_edgesmith_litert_root}/ai_edge_litert")
    # TFLite's flatbuffer schema (the plugin verifies model.tflite before LiteRT parses it) and the
    # flatbuffers headers it needs are vendored beside the C API headers.
    set(EDGESMITH_LITERT_INCLUDE_DIRS "${_edgesmith_litert_include}" "${PROJECT_SOURCE_DIR}/third_party/litert/include"
        "${PROJECT_SOURCE_DIR}/third_party/flatbuffers/include")
    list(REMOVE_DUPLICATES EDGESMITH_LITERT_INCLUDE_DIRS)
    # The C API exports no version function: the wheel's dist-info names it.
    # (next to the package as installed: a site-packages may link the package from another one)
    get_filename_component(_edgesmith_litert_real "${_edgesmith_litert_root}/ai_edge_litert" REALPATH)
    get_filename_component(_edgesmith_litert_real "${_edgesmith_litert_real}" DIRECTORY)
    file(GLOB _edgesmith_litert_dist "${_edgesmith_litert_root}/ai_edge_litert-*.dist-info"
                                     "${_edgesmith_litert_real}/ai_edge_litert-*.dist-info")
    set(EDGESMITH_LITERT_VERSION "unknown")
    if(_edgesmith_litert_dist)
      list(GET _edgesmith_litert_dist 0 _edgesmith_litert_dist)
      get_filename_component(_edgesmith_litert_dist "${_edgesmith_litert_dist}" NAME)
      string(REGEX REPLACE "^ai_edge_litert-(.*)\\.dist-info$" "\\1" EDGESMITH_LITERT_VERSION "${_edgesmith_litert_dist}")
    endif()
    message(STATUS "edgesmith: LiteRT ${EDGESMITH_LITERT_VERSION} from ${_edgesmith_litert_root}, headers from ${_edgesmith_litert_include}")
  endif()
endif()
