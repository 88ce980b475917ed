"""How to install an optional integration's extra, said the same way everywhere.

crossguard is not on a package index: it installs from a checkout
(``pip install -e '.[gateway]'``) or from a wheel built from one
(``pip wheel --no-deps .``, then ``pip install 'crossguard-….whl[gateway]'``).
"""

from __future__ import annotations

__all__ = ["install_hint"]


def install_hint(extra: str) -> str:
    """The command that installs ``extra``, for an ImportError's message."""
    return f"pip install -e '.[{extra}]' in a crossguard checkout (or the wheel built from one, with [{extra}])"
