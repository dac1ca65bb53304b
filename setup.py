"""Thin setup: the top-level kernels/ and export/ folders install inside the
package as rematch_fast.kernels and rematch_fast.export (never as top-level
`kernels` / `export`, which would clash with other packages)."""
from setuptools import setup

setup(
    packages=["rematch_fast", "rematch_fast.backends", "rematch_fast.model", "rematch_fast.kernels", "rematch_fast.export"],
    package_dir={"rematch_fast": "rematch_fast", "rematch_fast.kernels": "kernels", "rematch_fast.export": "export"},
)
