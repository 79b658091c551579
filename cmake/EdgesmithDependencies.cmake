# Third-party libraries of the core. Both come from the system (Debian: libsodium-dev,
# nlohmann-json3-dev) or, when cross-compiling, from the target sysroot.
#   libsodium   SHA-256 and Ed25519 (the same primitives PyNaCl wraps on the central side)
#   nlohmann    JSON parsing of manifest.json / manifest.sig
find_package(PkgConfig REQUIRED)
pkg_check_modules(EDGESMITH_SODIUM REQUIRED IMPORTED_TARGET libsodium>=1.0.18)
find_package(nlohmann_json 3.11 REQUIRED)
