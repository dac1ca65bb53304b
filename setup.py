"""Thin setup: builds the C++ extension rematch_fast._C with CMake (CMakeLists.txt, csrc/), and maps
the top-level kernels/ and export/ folders inside the package as rematch_fast.kernels and
rematch_fast.export (never as top-level `kernels` / `export`, which would clash with other packages).

The extension is optional: without a C++ compiler, CMake or pybind11 (pip provides the last two in
its isolated build), the install goes on, says why, and images take the pure-Python path (same
output, slower; rematch_fast.native_available() tells which is active)."""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build = Path(self.build_temp).resolve() / "cmake"
        try:
            import pybind11

            cmake = _cmake()
            subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                            f"-DPython_EXECUTABLE={sys.executable}"], check=True)
            subprocess.run([cmake, "--build", str(build), "--parallel", str(os.cpu_count() or 1)], check=True)
        except (ImportError, OSError, subprocess.CalledProcessError) as e:
            print(f"rematch_fast: the C++ extension rematch_fast._C was not built ({e}); images will take the "
                  "pure-Python path (same output, slower)", file=sys.stderr)


def _cmake() -> str:
    """The cmake of pip's build environment (the `cmake` package), else the one on PATH."""
    try:
        import cmake

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        return "cmake"


setup(
    packages=["rematch_fast", "rematch_fast.backends", "rematch_fast.model", "rematch_fast.kernels", "rematch_fast.export"],
    package_dir={"rematch_fast": "rematch_fast", "rematch_fast.kernels": "kernels", "rematch_fast.export": "export"},
    ext_modules=[Extension("rematch_fast._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
