# edgesmith_python_package_dir(<package> <out-var>): the directory of an installed Python package,
# asked of EDGESMITH_PYTHON (the interpreter whose wheels the backends link), or empty. Never used
# when cross-compiling: the host's wheels hold host binaries.
include_guard(GLOBAL)

if(NOT CMAKE_CROSSCOMPILING AND NOT EDGESMITH_PYTHON)
  # scikit-build-core and `cmake -DPython_EXECUTABLE=...` name the interpreter; else the active venv.
  if(Python_EXECUTABLE)
    set(_edgesmith_python "${Python_EXECUTABLE}")
  else()
    find_program(_edgesmith_python NAMES python3 python HINTS "$ENV{VIRTUAL_ENV}/bin" NO_CACHE)
  endif()
  set(EDGESMITH_PYTHON "${_edgesmith_python}" CACHE FILEPATH
      "Python interpreter whose site-packages hold the tvm / openvino wheels")
endif()

function(edgesmith_python_package_dir package out_var)
  set(${out_var} "" PARENT_SCOPE)
  if(CMAKE_CROSSCOMPILING OR NOT EDGESMITH_PYTHON)
    return()
  endif()
  # find_spec does not import the package (importing openvino takes seconds).
  execute_process(
    COMMAND "${EDGESMITH_PYTHON}" -c
            "import importlib.util, os; s = importlib.util.find_spec('${package}'); print(os.path.dirname(s.origin) if s and s.origin else '')"
    OUTPUT_VARIABLE _dir OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
  if(_rc EQUAL 0 AND _dir)
    set(${out_var} "${_dir}" PARENT_SCOPE)
  endif()
endfunction()

# edgesmith_wheel_root(<package> <given> <out-var>): the directory an engine's wheel is unpacked in
# (the site-packages holding <package>): <given> when set (a cross build's unpacked target wheel),
# else where EDGESMITH_PYTHON has <package> installed, else empty.
function(edgesmith_wheel_root package given out_var)
  set(_root "${given}")
  if(NOT _root)
    edgesmith_python_package_dir(${package} _pkg)
    if(_pkg)
      get_filename_component(_root "${_pkg}" DIRECTORY)
    endif()
  endif()
  set(${out_var} "${_root}" PARENT_SCOPE)
endfunction()
