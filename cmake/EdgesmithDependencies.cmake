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

# Telemetry (csrc/telemetry/, csrc/agent/, the Python publisher): the device reports over MQTT.
#   paho-mqtt3as  Eclipse Paho MQTT C, asynchronous API with TLS (Debian libpaho-mqtt-dev)
#   SQLite3       the on-disk store-and-forward spool (Debian libsqlite3-dev)
#   OpenSSL       paho's TLS (Debian libssl-dev)
#   cpp-httplib   the agent's loopback HTTP API only (Debian libcpp-httplib-dev). Debian builds it
#                 as a shared library (libcpp-httplib.so.0.11, which needs libssl3, zlib and
#                 brotli): an installed edgesmith-agent needs that package, or the copies the
#                 aarch64 bundle carries.
#   toml++        the agent's device.toml, header-only (Debian libtomlplusplus-dev)
option(EDGESMITH_BUILD_TELEMETRY "Build the MQTT telemetry publisher, edgesmith-agent and their bindings" ON)
# Like libsodium: a wheel's _core must not need Paho, SQLite or OpenSSL on the machine; their
# copies are kept private (--exclude-libs) so nothing interposes on Python's own sqlite3 / ssl.
option(EDGESMITH_TELEMETRY_STATIC "Link Paho, SQLite and OpenSSL statically" ${_edgesmith_sodium_static})
if(EDGESMITH_BUILD_TELEMETRY)
  find_package(Threads REQUIRED)
  set(_edgesmith_suffixes "${CMAKE_FIND_LIBRARY_SUFFIXES}")
  if(EDGESMITH_TELEMETRY_STATIC)
    set(CMAKE_FIND_LIBRARY_SUFFIXES "${CMAKE_STATIC_LIBRARY_SUFFIX}")
    set(OPENSSL_USE_STATIC_LIBS TRUE)
  endif()
  find_package(OpenSSL 1.1.1 REQUIRED)
  find_package(SQLite3 REQUIRED)
  # Paho's own CMake config names the shared libraries only; find_library honours the suffixes.
  find_path(EDGESMITH_PAHO_INCLUDE_DIR MQTTAsync.h REQUIRED)
  find_library(EDGESMITH_PAHO_LIBRARY NAMES paho-mqtt3as REQUIRED)
  set(CMAKE_FIND_LIBRARY_SUFFIXES "${_edgesmith_suffixes}")
  add_library(edgesmith_paho INTERFACE)
  target_include_directories(edgesmith_paho SYSTEM INTERFACE "${EDGESMITH_PAHO_INCLUDE_DIR}")
  target_link_libraries(edgesmith_paho INTERFACE "${EDGESMITH_PAHO_LIBRARY}" OpenSSL::SSL OpenSSL::Crypto
                        Threads::Threads ${CMAKE_DL_LIBS} rt anl)
  foreach(_lib IN ITEMS "${EDGESMITH_PAHO_LIBRARY}" "${SQLite3_LIBRARY}" "${OPENSSL_SSL_LIBRARY}" "${OPENSSL_CRYPTO_LIBRARY}")
    if(_lib MATCHES "\\.a$")
      get_filename_component(_name "${_lib}" NAME)
      target_link_options(edgesmith_paho INTERFACE "LINKER:--exclude-libs,${_name}")
    endif()
  endforeach()
  pkg_check_modules(EDGESMITH_HTTPLIB REQUIRED IMPORTED_TARGET cpp-httplib>=0.10)
  find_path(EDGESMITH_TOMLPP_INCLUDE_DIR toml++/toml.h REQUIRED)
endif()
