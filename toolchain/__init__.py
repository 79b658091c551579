"""edgesmith.toolchain: everything that runs centrally (export, compile, package, deploy, watch)."""
