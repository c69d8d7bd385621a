"""Behavioural contracts run against more than one implementation."""

import pytest

# the checks live outside test modules: let pytest explain their failed asserts too
pytest.register_assert_rewrite("tests.contracts.source_contract")
