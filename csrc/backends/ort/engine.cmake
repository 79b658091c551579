# Locate ONNX Runtime for the ort backend plugin: the library from the unpacked onnxruntime wheel,
# the C/C++ API headers kept in third_party/onnxruntime (the wheel ships none).
#
#   EDGESMITH_ORT_ROOT         a directory holding the unpacked onnxruntime wheel
#                              (`onnxruntime/capi/libonnxruntime.so.<version>`); defaults to the
#                              site-packages of EDGESMITH_PYTHON (host builds only).
#   EDGESMITH_ORT_INCLUDE_DIR  a directory holding onnxruntime_c_api.h and onnxruntime_cxx_api.h;
#                              default: third_party/onnxruntime/include/onnxruntime, the headers of
#                              Debian trixie's libonnxruntime-dev 1.21.0+dfsg-1 (ORT API 21, MIT),
#                              vendored so a build needs no network (third_party/onnxruntime/README.md).
#
# Defines EDGESMITH_ORT_FOUND, EDGESMITH_ORT_VERSION, EDGESMITH_ORT_LIBRARY_NAME (the wheel's file
# name of the library, libonnxruntime.so.<version>), EDGESMITH_ORT_LIBRARY_DIRS and
# EDGESMITH_ORT_INCLUDE_DIRS.
include_guard(GLOBAL)
include(EdgesmithPythonPackages)

set(EDGESMITH_ORT_ROOT "" CACHE PATH "Directory with the unpacked onnxruntime wheel")
set(EDGESMITH_ORT_INCLUDE_DIR "" CACHE PATH "Directory holding the ONNX Runtime C/C++ API headers")

set(EDGESMITH_ORT_FOUND OFF)
edgesmith_wheel_root(onnxruntime "${EDGESMITH_ORT_ROOT}" _edgesmith_ort_root)

set(_edgesmith_ort_library "")
if(_edgesmith_ort_root)
  # The wheel holds libonnxruntime.so.<version> only (no unversioned link), which is its SONAME.
  file(GLOB _edgesmith_ort_libraries "${_edgesmith_ort_root}/onnxruntime/capi/libonnxruntime.so.*")
  if(_edgesmith_ort_libraries)
    list(SORT _edgesmith_ort_libraries)
    list(GET _edgesmith_ort_libraries -1 _edgesmith_ort_library)
  endif()
endif()

if(_edgesmith_ort_library)
  set(_edgesmith_ort_include "${EDGESMITH_ORT_INCLUDE_DIR}")
  if(NOT _edgesmith_ort_include)
    set(_edgesmith_ort_include "${PROJECT_SOURCE_DIR}/third_party/onnxruntime/include/onnxruntime")
  endif()
  if(_edgesmith_ort_include AND EXISTS "${_edgesmith_ort_include}/onnxruntime_c_api.h")
    set(EDGESMITH_ORT_FOUND ON)
    get_filename_component(EDGESMITH_ORT_LIBRARY_NAME "${_edgesmith_ort_library}" NAME)
    string(REGEX REPLACE "^libonnxruntime\\.so\\." "" EDGESMITH_ORT_VERSION "${EDGESMITH_ORT_LIBRARY_NAME}")
    get_filename_component(EDGESMITH_ORT_LIBRARY_DIRS "${_edgesmith_ort_library}" DIRECTORY)
    set(EDGESMITH_ORT_INCLUDE_DIRS "${_edgesmith_ort_include}")
    message(STATUS "edgesmith: ONNX Runtime ${EDGESMITH_ORT_VERSION} from ${_edgesmith_ort_root}, headers from ${_edgesmith_ort_include}")
  endif()
endif()
