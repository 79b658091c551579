# Third-party libraries of the core. Both come from the system (Debian: libsodium-dev,
# nlohmann-json3-dev) or, when cross-compiling, from the target sysroot.
#   libsodium   SHA-256 and Ed25519 (the same primitives PyNaCl wraps on the central side)
#   nlohmann    JSON parsing of manifest.json / manifest.sig (header-only)
# cmake/edgesmithConfig.cmake.in finds the same two for users of the installed core.
if(SKBUILD)
  set(_edgesmith_sodium_static ON)
else()
  set(_edgesmith_sodium_static OFF)
endif()
# A wheel is installed on machines without libsodium: its binaries carry their own copy.
option(EDGESMITH_SODIUM_STATIC "Link libsodium statically into the Python module, plugins and tools"
       ${_edgesmith_sodium_static})

find_package(PkgConfig REQUIRED)
if(EDGESMITH_SODIUM_STATIC)
  set(_edgesmith_suffixes "${CMAKE_FIND_LIBRARY_SUFFIXES}")
  set(CMAKE_FIND_LIBRARY_SUFFIXES "${CMAKE_STATIC_LIBRARY_SUFFIX}")
  pkg_check_modules(EDGESMITH_SODIUM REQUIRED IMPORTED_TARGET libsodium>=1.0.18)
  set(CMAKE_FIND_LIBRARY_SUFFIXES "${_edgesmith_suffixes}")
  # Keep the copy private to each shared object: no interposing on another libsodium in the
  # process, and Debian's libsodium.a (not built for shared objects throughout) links only when
  # its symbols are local.
  set_property(TARGET PkgConfig::EDGESMITH_SODIUM APPEND PROPERTY
               INTERFACE_LINK_OPTIONS "LINKER:--exclude-libs,libsodium.a")
else()
  pkg_check_modules(EDGESMITH_SODIUM REQUIRED IMPORTED_TARGET libsodium>=1.0.18)
endif()
find_package(nlohmann_json 3.11 REQUIRED)
