#!/usr/bin/env bash
# Installs what taming-wgpu needs on a fresh Debian/Ubuntu machine: a Rust
# toolchain check and, when no Vulkan device is usable, Mesa's software
# Vulkan driver (lavapipe), so everything runs without a GPU.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust from https://rustup.rs first" >&2
  exit 1
fi

if command -v vulkaninfo >/dev/null 2>&1 && vulkaninfo --summary 2>/dev/null | grep -q "deviceName"; then
  echo "setup: Vulkan device present"
else
  echo "setup: installing the software Vulkan driver (mesa-vulkan-drivers, libvulkan1, vulkan-tools)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mesa-vulkan-drivers libvulkan1 vulkan-tools >/dev/null
  vulkaninfo --summary 2>/dev/null | grep -m1 "deviceName" || { echo "setup: no Vulkan device after install" >&2; exit 1; }
fi

# Mesa's OpenGL device (llvmpipe through EGL): a second backend the tests check the kernels on.
if ! ldconfig -p 2>/dev/null | grep -q 'libEGL_mesa.so' || ! ls /usr/lib/*/dri/swrast_dri.so >/dev/null 2>&1; then
  echo "setup: installing Mesa's OpenGL driver (libegl1, libegl-mesa0, libgl1-mesa-dri) for the GL backend"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libegl1 libegl-mesa0 libgl1-mesa-dri >/dev/null; } \
    || echo "setup: NOTE: no OpenGL driver; the GL backend tests will be SKIPPED"
fi

# `--mpi`: what the `mpi` cargo feature builds against (Open MPI, and libclang for rsmpi's bindings).
if [ "${1:-}" = "--mpi" ]; then
  if ! command -v mpirun >/dev/null 2>&1 || ! ldconfig -p 2>/dev/null | grep -q libclang; then
    echo "setup: installing Open MPI and libclang (libopenmpi-dev, openmpi-bin, libclang-dev) for --features mpi"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenmpi-dev openmpi-bin libclang-dev >/dev/null
  fi
fi

# `taming serve`'s page is tested in a real browser: Debian's headless Chromium and its WebDriver.
if ! command -v chromedriver >/dev/null 2>&1 || ! [ -x /usr/bin/chromium ]; then
  echo "setup: installing Chromium and chromedriver (chromium, chromium-driver) for the web page's browser test"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

# tools/convert_taming.py reads the reference YAML configs with PyYAML.
if ! python3 -c "import yaml" 2>/dev/null; then
  echo "setup: installing PyYAML for tools/convert_taming.py"
  python3 -m pip install --quiet pyyaml 2>/dev/null || { $SUDO apt-get install -y -qq python3-yaml >/dev/null; }
fi

# The parity tests compare against fixtures made by the PyTorch reference.
fixtures="${TAMING_FIXTURES:-../shared/fixtures}"
if [ -d "$fixtures/vqgan" ]; then
  echo "setup: parity fixtures at $fixtures"
else
  echo "setup: NOTE: no parity fixtures at $fixtures (set TAMING_FIXTURES); the fixture tests will be SKIPPED"
fi
