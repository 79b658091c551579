# Locate OpenVINO for the OpenVINO backend plugin, from the unpacked openvino wheel.
#
#   EDGESMITH_OPENVINO_ROOT  a directory holding the unpacked openvino wheel (`openvino/cmake`,
#                            `openvino/include`, `openvino/libs`); defaults to the site-packages of
#                            EDGESMITH_PYTHON (host builds only).
#
# Defines EDGESMITH_OPENVINO_FOUND, EDGESMITH_OPENVINO_VERSION, EDGESMITH_OPENVINO_LIBRARY_DIRS and
# the target openvino::runtime (from the wheel's OpenVINOConfig.cmake).
include_guard(GLOBAL)
include(EdgesmithPythonPackages)

set(EDGESMITH_OPENVINO_ROOT "" CACHE PATH "Directory with the unpacked openvino wheel")

set(EDGESMITH_OPENVINO_FOUND OFF)
edgesmith_wheel_root(openvino "${EDGESMITH_OPENVINO_ROOT}" _edgesmith_ov_root)

if(_edgesmith_ov_root AND EXISTS "${_edgesmith_ov_root}/openvino/cmake/OpenVINOConfig.cmake")
  # The wheel's config resolves everything relative to itself, so it also serves cross builds
  # (the target sysroot mode must not re-root its paths).
  find_package(OpenVINO CONFIG QUIET COMPONENTS Runtime
               PATHS "${_edgesmith_ov_root}/openvino/cmake" NO_DEFAULT_PATH NO_CMAKE_FIND_ROOT_PATH)
endif()

if(OpenVINO_FOUND AND TARGET openvino::runtime)
  set(EDGESMITH_OPENVINO_FOUND ON)
  set(EDGESMITH_OPENVINO_VERSION "${OpenVINO_VERSION}")
  set(EDGESMITH_OPENVINO_LIBRARY_DIRS "${_edgesmith_ov_root}/openvino/libs")
  message(STATUS "edgesmith: OpenVINO ${OpenVINO_VERSION} from ${_edgesmith_ov_root}")
endif()
