# The CMake package of the installed core, for C++ programs embedding the runtime:
#
#   find_package(edgesmith 0.1 CONFIG REQUIRED)   # CMAKE_PREFIX_PATH=<install prefix>
#   target_link_libraries(app PRIVATE edgesmith::core)
#
# Installs <prefix>/lib/cmake/edgesmith/{edgesmithConfig,edgesmithConfigVersion,edgesmithTargets}.cmake
# next to the static library and headers that csrc/CMakeLists.txt installs.
include(CMakePackageConfigHelpers)

set(EDGESMITH_CMAKE_INSTALL_DIR "${CMAKE_INSTALL_LIBDIR}/cmake/edgesmith")
install(EXPORT edgesmithTargets NAMESPACE edgesmith:: DESTINATION "${EDGESMITH_CMAKE_INSTALL_DIR}"
        COMPONENT development)
configure_package_config_file("${CMAKE_CURRENT_LIST_DIR}/edgesmithConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/edgesmithConfig.cmake" INSTALL_DESTINATION "${EDGESMITH_CMAKE_INSTALL_DIR}")
# 0.x releases may break the API between minor versions.
write_basic_package_version_file("${PROJECT_BINARY_DIR}/edgesmithConfigVersion.cmake"
  VERSION "${PROJECT_VERSION}" COMPATIBILITY SameMinorVersion)
install(FILES "${PROJECT_BINARY_DIR}/edgesmithConfig.cmake" "${PROJECT_BINARY_DIR}/edgesmithConfigVersion.cmake"
        DESTINATION "${EDGESMITH_CMAKE_INSTALL_DIR}" COMPONENT development)
