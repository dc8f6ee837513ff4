"""Builds the native AES-XTS helper (cryptfs/engines/_xts.c) against the
system's libcrypto; everything else is declared in pyproject.toml.

The extension is optional: without a C compiler, Python headers or
libssl-dev the install still succeeds (with a warning) and the userspace
engine uses its pure ``cryptography`` path.  scripts/setup installs the
build dependencies and checks that the helper imports.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cryptfs.engines._xts",
            sources=["cryptfs/engines/_xts.c"],
            libraries=["crypto"],
            extra_compile_args=["-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ],
)
