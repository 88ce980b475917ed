"""Integrations: the command line, transformers and LangChain.

Each integration is its own module and imports its optional dependencies
itself; importing this package imports none of them.
"""
