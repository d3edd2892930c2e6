"""The fake host and service of the UI tests, shared with the host tests."""

from tests.ui.conftest import FakeHost, fake_methods, finished_result, host  # noqa: F401
