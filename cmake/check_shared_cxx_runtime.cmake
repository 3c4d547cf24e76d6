# Run after linking (cmake -DLIBRARY=... -DREADELF=... -DCOMPILER=... -P this file): fails the
# build when the library does not load the C++ runtime as a shared library. A toolchain that
# links libstdc++ statically (seen: GCC 13.3 in /opt/gcc on the GPU machines) gives lion_ops a
# private copy of the runtime next to torch's; the first TORCH_CHECK message it formats then
# crashes the process (its stream locale was never set up), so every bad-input error would be
# a segfault instead of an exception.
execute_process(COMMAND "${READELF}" -d "${LIBRARY}" OUTPUT_VARIABLE dynamic RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(WARNING "lion_ops: could not read the dynamic section of ${LIBRARY} with ${READELF}; "
                  "not checking how the C++ runtime is linked")
  return()
endif()
if(NOT dynamic MATCHES "libstdc\\+\\+\\.so|libc\\+\\+\\.so")
  message(FATAL_ERROR
    "lion_ops: ${LIBRARY} has the C++ runtime linked in statically (it does not need "
    "libstdc++.so): the C++ compiler ${COMPILER} links libstdc++ statically. Such a library "
    "crashes when it raises an error next to torch. Build with a compiler that links the shared "
    "libstdc++, for example: CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ "
    "pip install --no-build-isolation .")
endif()
