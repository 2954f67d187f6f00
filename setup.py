# The one C extension: atomics, futexes and the hot buffer operations on shared memory.
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "multiqueue._native",
            sources=["src/multiqueue/_native.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
        )
    ]
)
