# edgesmith_target_warnings(<target>): the warning set every edgesmith target compiles with.
# The code is meant to build warning-free with these; EDGESMITH_WARNINGS_AS_ERRORS turns that into
# a hard check (CI).
option(EDGESMITH_WARNINGS_AS_ERRORS "Treat compiler warnings as errors" OFF)

function(edgesmith_target_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow -Wconversion
                                             -Wno-sign-conversion)
    if(EDGESMITH_WARNINGS_AS_ERRORS)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
  elseif(MSVC)
    target_compile_options(${target} PRIVATE /W4)
  endif()
endfunction()
