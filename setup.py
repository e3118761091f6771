"""The optional C extension (``pseudonymise.core._native``); everything else is in pyproject.toml.

It links OpenSSL's libcrypto (Debian: libssl-dev). If it cannot be built, the package installs
without it and runs the pure-Python engine, which gives the same pseudonyms, more slowly.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pseudonymise.core._native",
            sources=["plugins/pseudonymise/core/_native.c"],
            libraries=["crypto"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
            optional=True,
        )
    ],
)
