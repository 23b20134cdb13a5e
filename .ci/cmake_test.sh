#!/usr/bin/env bash
# Configure, build and test the CMake (libtorch) build of lorm_ext against the torch of a Python environment.
#   .ci/cmake_test.sh [PYTHON]     PYTHON defaults to .venv/bin/python
# Out of source, in build/cmake (git-ignored); re-runs are incremental. LORM_EXT_WITH_CUDA=ON adds the .cu files.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${1:-.venv/bin/python}"
build_dir=build/cmake
torch_prefix="$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"

cmake -S . -B "$build_dir" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$torch_prefix" \
  -DLORM_EXT_WITH_CUDA="${LORM_EXT_WITH_CUDA:-OFF}"
cmake --build "$build_dir" -j 2
ctest --test-dir "$build_dir" --output-on-failure
