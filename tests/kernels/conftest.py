"""Run the kernels through Triton's CPU interpreter (fp32/fp16 only: bf16 math is wrong there).

Triton reads TRITON_INTERPRET when it is imported (its own `tl.*` helpers are jitted then), so
this is set at conftest import, before any test module here imports `kernels`.
"""

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True, scope="session")
def triton_interpreter_on() -> None:
    """Fail with the cause rather than with a pointer error deep inside a launch."""
    try:
        import triton.language as tl
    except ImportError:
        return  # the Triton tests fail on their own; the torch paths still run
    if type(tl.zeros).__name__ != "InterpretedFunction":
        pytest.fail(
            "triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1 "
            "(some earlier test module imports it); run with TRITON_INTERPRET=1 in the environment"
        )
