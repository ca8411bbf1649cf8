# Included after llama.cpp's project() when llama-cpp-python is built (the Makefile's
# LLAMA_CMAKE_ARGS: -DCMAKE_PROJECT_llama.cpp_INCLUDE=<this file>).
# llama-cpp-python forces llama.cpp's common library on (a cache variable set with FORCE), yet its
# Python package loads libllama and libggml only: this directory-scoped variable shadows the
# cache entry inside llama.cpp's tree, so common is neither built nor installed (about as much
# compiling as libllama itself).
set(LLAMA_BUILD_COMMON OFF)
