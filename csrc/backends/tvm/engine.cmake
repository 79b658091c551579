# Locate the Apache TVM runtime for the TVM backend plugin, from unpacked wheels (no TVM build).
#
#   EDGESMITH_TVM_ROOT  a directory holding the unpacked apache-tvm and apache-tvm-ffi wheels
#                       (`tvm/lib/libtvm_runtime.so`, `tvm_ffi/include`, `tvm_ffi/lib/libtvm_ffi.so`);
#                       defaults to the site-packages of EDGESMITH_PYTHON (host builds only).
#
# Defines EDGESMITH_TVM_FOUND, EDGESMITH_TVM_VERSION, EDGESMITH_TVM_LIBRARY_DIRS and the imported
# targets edgesmith::tvm_ffi (headers + libtvm_ffi.so) and edgesmith::tvm_runtime. Only the tvm-ffi
# headers are used: the apache-tvm wheel's own headers include files the wheel does not ship.
include_guard(GLOBAL)
include(EdgesmithPythonPackages)

set(EDGESMITH_TVM_ROOT "" CACHE PATH "Directory with the unpacked apache-tvm and apache-tvm-ffi wheels")

set(EDGESMITH_TVM_FOUND OFF)
edgesmith_wheel_root(tvm_ffi "${EDGESMITH_TVM_ROOT}" _edgesmith_tvm_root)

if(_edgesmith_tvm_root)
  find_path(EDGESMITH_TVM_FFI_INCLUDE_DIR tvm/ffi/extra/module.h
            PATHS "${_edgesmith_tvm_root}/tvm_ffi/include" NO_DEFAULT_PATH NO_CMAKE_FIND_ROOT_PATH)
  find_path(EDGESMITH_DLPACK_INCLUDE_DIR dlpack/dlpack.h
            PATHS "${_edgesmith_tvm_root}/tvm_ffi/include" "${_edgesmith_tvm_root}/tvm_ffi/3rdparty/dlpack/include"
            NO_DEFAULT_PATH NO_CMAKE_FIND_ROOT_PATH)
  find_library(EDGESMITH_TVM_FFI_LIBRARY tvm_ffi PATHS "${_edgesmith_tvm_root}/tvm_ffi/lib"
               NO_DEFAULT_PATH NO_CMAKE_FIND_ROOT_PATH)
  find_library(EDGESMITH_TVM_RUNTIME_LIBRARY tvm_runtime PATHS "${_edgesmith_tvm_root}/tvm/lib"
               NO_DEFAULT_PATH NO_CMAKE_FIND_ROOT_PATH)
endif()

if(EDGESMITH_TVM_FFI_INCLUDE_DIR AND EDGESMITH_DLPACK_INCLUDE_DIR AND EDGESMITH_TVM_FFI_LIBRARY
   AND EDGESMITH_TVM_RUNTIME_LIBRARY)
  set(EDGESMITH_TVM_FOUND ON)
  # The version the plugin reports comes from the wheel's metadata directory name.
  file(GLOB _edgesmith_tvm_dist "${_edgesmith_tvm_root}/apache_tvm-*.dist-info")
  set(EDGESMITH_TVM_VERSION "unknown")
  if(_edgesmith_tvm_dist)
    list(GET _edgesmith_tvm_dist 0 _edgesmith_tvm_dist)
    string(REGEX REPLACE ".*/apache_tvm-(.*)\\.dist-info$" "\\1" EDGESMITH_TVM_VERSION "${_edgesmith_tvm_dist}")
  endif()
  get_filename_component(_edgesmith_tvm_ffi_dir "${EDGESMITH_TVM_FFI_LIBRARY}" DIRECTORY)
  get_filename_component(_edgesmith_tvm_runtime_dir "${EDGESMITH_TVM_RUNTIME_LIBRARY}" DIRECTORY)
  set(EDGESMITH_TVM_LIBRARY_DIRS "${_edgesmith_tvm_runtime_dir}" "${_edgesmith_tvm_ffi_dir}")

  if(NOT TARGET edgesmith::tvm_ffi)
    add_library(edgesmith::tvm_ffi SHARED IMPORTED)
    set_target_properties(edgesmith::tvm_ffi PROPERTIES
      IMPORTED_LOCATION "${EDGESMITH_TVM_FFI_LIBRARY}"
      IMPORTED_SONAME "libtvm_ffi.so"
      INTERFACE_INCLUDE_DIRECTORIES "${EDGESMITH_TVM_FFI_INCLUDE_DIR};${EDGESMITH_DLPACK_INCLUDE_DIR}")
    add_library(edgesmith::tvm_runtime SHARED IMPORTED)
    set_target_properties(edgesmith::tvm_runtime PROPERTIES
      IMPORTED_LOCATION "${EDGESMITH_TVM_RUNTIME_LIBRARY}"
      IMPORTED_SONAME "libtvm_runtime.so"
      INTERFACE_LINK_LIBRARIES edgesmith::tvm_ffi)
  endif()
  message(STATUS "edgesmith: TVM ${EDGESMITH_TVM_VERSION} runtime from ${_edgesmith_tvm_root}")
endif()
