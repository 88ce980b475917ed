"""The tests' OpenAI-compatible upstream: the tiny real generator behind
``crossguard serve --demo-upstream``, which lives in the package
(``integrations.demo_upstream``); its names are re-exported here for the
tests and benchmarks that import them from this module."""

from integrations import demo_upstream
from integrations.demo_upstream import *  # noqa: F403

__all__ = demo_upstream.__all__
