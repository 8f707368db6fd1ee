"""The one compiled part of etc-data: the run kernel of ``etc_data/schemes.py`` (plain C, the
buffer protocol only, no numpy headers). It is optional: on a machine without a C compiler the
install still succeeds and schemes.py uses its numpy gather instead (bit-identical, about 3x slower
at 224 px); ``etc_data.schemes.native_available()`` says which one runs. Everything else about
the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("etc_data._runs", ["etc_data/_runs.c"], optional=True,
                             extra_compile_args=["-O3"])])
