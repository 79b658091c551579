# Cross-compile the core for 64-bit Arm Linux with Debian's cross toolchain
# (g++-aarch64-linux-gnu). Target libraries (libsodium) are looked up in the multiarch paths, so
# install them with `dpkg --add-architecture arm64 && apt-get install libsodium-dev:arm64`.
# Build the core alone: -DEDGESMITH_BUILD_PYTHON=OFF (the Python module is built on the device or
# in an aarch64 wheel build).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

set(CMAKE_LIBRARY_ARCHITECTURE aarch64-linux-gnu)
set(ENV{PKG_CONFIG_LIBDIR} "/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig")

set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
