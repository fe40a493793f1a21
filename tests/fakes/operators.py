"""Operators' admin tokens for the sites that ask for them (cim.http.operators)."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from cim.http.operators import OperatorTokens, with_token

OPS1_TOKEN = "ops1-" + "a" * 38
OPS2_TOKEN = "ops2-" + "b" * 38


def token_file(test: SynchronousTestCase, tokens: dict[str, str] | None = None) -> str:
    """A token file (mode 0600) in the test's directory: ops1's token unless told."""
    directory = os.path.abspath(test.mktemp())
    os.makedirs(directory)
    path = os.path.join(directory, "admin_token")
    write_tokens(path, {"ops1": OPS1_TOKEN} if tokens is None else tokens)
    return path


def write_tokens(path: str, tokens: dict[str, str]) -> None:
    text = ""
    for name, token in tokens.items():
        text = with_token(text, name, token)
    temporary = path + ".tmp"
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        handle.write(text)
    os.replace(temporary, path)  # a new inode: the daemon sees the change at once


def operator_tokens(
    test: SynchronousTestCase, tokens: dict[str, str] | None = None
) -> OperatorTokens:
    return OperatorTokens(token_file(test, tokens))


def bearer(token: str = OPS1_TOKEN) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")
