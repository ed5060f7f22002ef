"""Build the one C extension (metadata lives in pyproject.toml)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("zipfs.codec._planes", ["zipfs/codec/_planes.c"],
                             extra_compile_args=["-O3", "-std=c11"])])
