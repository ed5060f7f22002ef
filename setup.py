"""Build the C extensions (metadata lives in pyproject.toml). The chunk decoder links the system
libzstd (Debian/Ubuntu: libzstd-dev), so decoding runs with the GIL released from end to end."""

from setuptools import Extension, setup

FLAGS = ["-O3", "-std=c11", "-D_GNU_SOURCE"]

setup(ext_modules=[
    Extension("zipfs.codec._planes", ["zipfs/codec/_planes.c"], libraries=["zstd"],
              extra_compile_args=FLAGS),
    Extension("zipfs.read._slots", ["zipfs/read/_slots.c"], extra_compile_args=FLAGS),
])
