"""The operators' token file (cim.http.operators): its format, and the daemon's view."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from cim.http.operators import (
    OperatorTokens,
    TokenFileError,
    choose_token,
    new_token,
    parse_tokens,
    with_token,
)
from tests.fakes.operators import OPS1_TOKEN, OPS2_TOKEN, token_file, write_tokens


class TokenFileTests(SynchronousTestCase):
    def test_new_tokens_are_32_random_bytes_url_safe(self) -> None:
        tokens = {new_token() for _ in range(50)}
        self.assertEqual(len(tokens), 50)
        for token in tokens:
            self.assertEqual(len(token), 43)
            self.assertRegex(token, r"^[A-Za-z0-9_-]{43}$")
            self.assertEqual(parse_tokens(f"x:{token}\n", "f"), {"x": token})

    def test_lines_comments_and_blank_lines(self) -> None:
        text = f"# operators\n\nops1:{OPS1_TOKEN}\n  ops2 : {OPS2_TOKEN}  \n"
        self.assertEqual(parse_tokens(text, "f"), {"ops1": OPS1_TOKEN, "ops2": OPS2_TOKEN})

    def test_malformed_lines_name_the_line_never_the_token(self) -> None:
        for text, fragment in (
            (f"ops1 {OPS1_TOKEN}\n", "line 1: expected NAME:TOKEN"),
            (f"# c\n@ops:{OPS1_TOKEN}\n", "line 2: expected NAME:TOKEN"),
            ("ops1:short\n", "line 1: the token of 'ops1' must be 32 to 512"),
            (f"ops1:{OPS1_TOKEN}!\n", "line 1: the token of 'ops1'"),
            (f"ops1:{OPS1_TOKEN}\nops1:{OPS2_TOKEN}\n", "line 2: 'ops1' is named twice"),
            (f"ops1:{OPS1_TOKEN}\nops2:{OPS1_TOKEN}\n", "line 2: 'ops2' has another"),
        ):
            with self.assertRaises(TokenFileError) as caught:
                parse_tokens(text, "/etc/cim/admin_token")
            message = str(caught.exception)
            self.assertIn("/etc/cim/admin_token, " + fragment, message)
            self.assertNotIn(OPS1_TOKEN[5:], message)

    def test_with_token_replaces_one_line_and_keeps_the_rest(self) -> None:
        text = with_token("", "ops1", OPS1_TOKEN)
        self.assertTrue(text.startswith("# "))
        text = with_token(text + "# ops2 is the night shift\n", "ops2", OPS2_TOKEN)
        fresh = new_token()
        text = with_token(text, "ops1", fresh)
        self.assertEqual(parse_tokens(text, "f"), {"ops1": fresh, "ops2": OPS2_TOKEN})
        self.assertIn("# ops2 is the night shift\n", text)
        self.assertEqual(text.count("ops1:"), 1)

    def test_choose_token(self) -> None:
        one = {"ops1": OPS1_TOKEN}
        two = {"ops1": OPS1_TOKEN, "ops2": OPS2_TOKEN}
        self.assertEqual(choose_token(one, None, "f"), ("ops1", OPS1_TOKEN))
        self.assertEqual(choose_token(two, "ops2", "f"), ("ops2", OPS2_TOKEN))
        for tokens, name, fragment in (
            (two, None, "holds the tokens of ops1, ops2: choose one with --operator"),
            (two, "ops3", "has no token for 'ops3'"),
            ({}, None, "holds no token: cimctl keygen --admin writes one"),
        ):
            with self.assertRaises(TokenFileError) as caught:
                choose_token(tokens, name, "f")
            self.assertIn(fragment, str(caught.exception))


class OperatorTokensTests(SynchronousTestCase):
    def test_who_a_token_names(self) -> None:
        tokens = OperatorTokens(token_file(self, {"ops1": OPS1_TOKEN, "ops2": OPS2_TOKEN}))
        tokens.load()
        self.assertEqual(tokens.operator(OPS1_TOKEN), "ops1")
        self.assertEqual(tokens.operator(OPS2_TOKEN), "ops2")
        for wrong in ("", OPS1_TOKEN[:-1], OPS1_TOKEN + "a", "ops1", OPS1_TOKEN.upper()):
            self.assertIsNone(tokens.operator(wrong), wrong)

    def test_changes_to_the_file_are_seen_without_a_restart(self) -> None:
        path = token_file(self)
        tokens = OperatorTokens(path)
        tokens.load()
        self.assertIsNone(tokens.operator(OPS2_TOKEN))
        write_tokens(path, {"ops1": OPS1_TOKEN, "ops2": OPS2_TOKEN})
        self.assertEqual(tokens.operator(OPS2_TOKEN), "ops2")
        write_tokens(path, {"ops2": OPS2_TOKEN})
        self.assertIsNone(tokens.operator(OPS1_TOKEN))

    def test_a_missing_file_starts_and_refuses_everyone(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "admin_token")
        tokens = OperatorTokens(path)
        tokens.load()  # said in the log; the node starts
        self.assertIsNone(tokens.operator(OPS1_TOKEN))
        os.makedirs(os.path.dirname(path))
        write_tokens(path, {"ops1": OPS1_TOKEN})
        self.assertEqual(tokens.operator(OPS1_TOKEN), "ops1")

    def test_a_malformed_file_stops_the_start_and_later_fails_closed(self) -> None:
        path = token_file(self)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("broken line\n")
        with self.assertRaises(TokenFileError):
            OperatorTokens(path).load()
        write_tokens(path, {"ops1": OPS1_TOKEN})
        tokens = OperatorTokens(path)
        tokens.load()
        self.assertEqual(tokens.operator(OPS1_TOKEN), "ops1")
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("broken line\n")
        self.assertIsNone(tokens.operator(OPS1_TOKEN))
