"""File and upload ids never begin with '-' (a command line would take them for an
option), keep their 22 characters, and ids made before, which may, still work on the
command line after '--'."""

from __future__ import annotations

import argparse
import base64
import contextlib
import inspect
import io
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from cim.files.blobs import is_server_id
from cim.files.ids import (
    ID_BYTES,
    ID_LENGTH,
    MAX_DRAWS,
    RandomSourceStuck,
    new_file_id,
)
from cim.files.store import FileStore
from cim.scripts import client as cli
from cim.scripts.file_commands import DASH_ID_HINT

DASH_FIRST = b"\xf8" + bytes(range(1, ID_BYTES))
"""0xf8's first six bits are 62, base64url's '-': this draw encodes as '-AEC...'."""
DOUBLE_DASH = b"\xfb\xe0" + bytes(ID_BYTES - 2)
"""Twelve bits of 62, 62: '--AAA...', a word argparse reads as a long option."""
PLAIN = bytes(range(100, 100 + ID_BYTES))
OLD_ID = "-AECAwQFBgcICQoLDA0ODw"
"""What an older server made from DASH_FIRST: an id that begins with '-'."""


def encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def source(*draws: bytes) -> tuple[Callable[[int], bytes], list[int]]:
    """A random source yielding ``draws`` in order, and the sizes it was asked for."""
    asked: list[int] = []
    queue = list(draws)

    def random_bytes(size: int) -> bytes:
        asked.append(size)
        return queue.pop(0)

    return random_bytes, asked


class NewFileIdTests(SynchronousTestCase):
    def test_the_stub_draws_are_what_they_claim(self) -> None:
        """The fixtures themselves: otherwise the tests below could pass vacuously."""
        self.assertEqual(encode(DASH_FIRST), OLD_ID)
        self.assertTrue(encode(DOUBLE_DASH).startswith("--"))
        self.assertFalse(encode(PLAIN).startswith("-"))

    def test_a_draw_that_begins_with_a_dash_is_drawn_again(self) -> None:
        random_bytes, asked = source(DASH_FIRST, PLAIN)
        made = new_file_id(random_bytes)
        self.assertEqual(made, encode(PLAIN))
        self.assertEqual(asked, [ID_BYTES, ID_BYTES])

    def test_draws_again_as_often_as_needed(self) -> None:
        random_bytes, asked = source(DASH_FIRST, DOUBLE_DASH, DASH_FIRST, PLAIN)
        self.assertEqual(new_file_id(random_bytes), encode(PLAIN))
        self.assertEqual(len(asked), 4)

    def test_a_good_first_draw_is_kept_as_it_is(self) -> None:
        """One draw, encoded plainly: the id is the same base64url as before."""
        random_bytes, asked = source(PLAIN)
        self.assertEqual(new_file_id(random_bytes), encode(PLAIN))
        self.assertEqual(asked, [ID_BYTES])

    def test_every_first_byte(self) -> None:
        """All 256 first bytes: the 4 whose encoding begins with '-' (0xf8-0xfb) are
        drawn again, the other 252 are kept: a uniform choice among ids without '-'."""
        redrawn = []
        for first in range(256):
            drawn = bytes([first]) + bytes(ID_BYTES - 1)
            random_bytes, asked = source(drawn, PLAIN)
            made = new_file_id(random_bytes)
            self.assertFalse(made.startswith("-"), made)
            self.assertEqual(len(made), ID_LENGTH)
            if len(asked) == 2:
                redrawn.append(first)
                self.assertEqual(made, encode(PLAIN))
            else:
                self.assertEqual(made, encode(drawn))
        self.assertEqual(redrawn, [0xF8, 0xF9, 0xFA, 0xFB])

    def test_a_stuck_source_fails_instead_of_looping(self) -> None:
        random_bytes, asked = source(*[DASH_FIRST] * MAX_DRAWS)
        self.assertRaises(RandomSourceStuck, new_file_id, random_bytes)
        self.assertEqual(len(asked), MAX_DRAWS)

    def test_a_short_draw_is_refused(self) -> None:
        random_bytes, _ = source(bytes(ID_BYTES - 1))
        self.assertRaises(ValueError, new_file_id, random_bytes)

    def test_many_real_ids(self) -> None:
        """With the real source: 4096 ids, none beginning with '-'. The plain encoding
        would pass this with probability (63/64)**4096, below 10**-27."""
        made = [new_file_id() for _ in range(4096)]
        self.assertEqual([name for name in made if name.startswith("-")], [])
        self.assertEqual([name for name in made if not is_server_id(name)], [])
        self.assertEqual({len(name) for name in made}, {ID_LENGTH})
        self.assertEqual(len(set(made)), len(made))
        # The other 63 first characters all occur (each misses with (62/63)**4096).
        self.assertEqual(len({name[0] for name in made}), 63)

    def test_the_file_store_makes_its_ids_so(self) -> None:
        default = inspect.signature(FileStore).parameters["new_id"].default
        self.assertIs(default, new_file_id)

    def test_older_ids_stay_valid(self) -> None:
        self.assertTrue(is_server_id(OLD_ID))
        self.assertTrue(is_server_id("--" + OLD_ID[2:]))


class CommandLineTests(SynchronousTestCase):
    def parse(self, *words: str) -> argparse.Namespace:
        return cli.build_parser().parse_args(["--user", "bob", *words])

    def refused(self, *words: str) -> str:
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors), self.assertRaises(SystemExit) as raised:
            self.parse(*words)
        self.assertEqual(raised.exception.code, 2)
        return errors.getvalue()

    def test_delete_file_takes_an_old_id_after_double_dash(self) -> None:
        for old in (OLD_ID, "--" + OLD_ID[2:], "-h" + OLD_ID[2:]):
            options = self.parse("delete-file", "--", old)
            self.assertEqual(options.file_id, old)

    def test_delete_file_takes_a_new_id_either_way(self) -> None:
        made = new_file_id()
        self.assertEqual(self.parse("delete-file", made).file_id, made)
        self.assertEqual(self.parse("delete-file", "--", made).file_id, made)

    def test_an_old_id_without_double_dash_is_refused_with_the_way_out(self) -> None:
        for old in (OLD_ID, "--" + OLD_ID[2:], "-h" + OLD_ID[2:]):
            message = self.refused("delete-file", old)
            self.assertIn(DASH_ID_HINT, message)
            self.assertEqual(message.count("\n"), 1)  # still one line

    def test_the_help_says_so(self) -> None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit):
            self.parse("delete-file", "--help")
        self.assertIn("'--'", out.getvalue())

    def test_other_subcommands_keep_their_one_line_errors(self) -> None:
        message = self.refused("send", "alice")
        self.assertNotIn(DASH_ID_HINT, message)
        self.assertIn("cim-client send:", message)

    def test_commands_taking_ids_take_them_after_double_dash(self) -> None:
        cases = [
            (("recall", "--", "7"), "msg_id", 7),
            (("edit", "--", "7", "new text"), "msg_id", 7),
            (("group", "members", "--", "-team"), "group", "-team"),
            (("group", "send", "--", "-team", "hi"), "group", "-team"),
            (("sos", "show", "--", "3"), "id", 3),
            (("post", "del", "--", "3"), "id", 3),
            (("like", "--", "3"), "post", 3),
        ]
        for words, field, expected in cases:
            self.assertEqual(getattr(self.parse(*words), field), expected, words)
