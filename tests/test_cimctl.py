"""cimctl, run in-process through main(argv) with a temporary config and fake stdin."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

from twisted.trial.unittest import TestCase

from cim.accounts import BlockingAccountStore
from cim.config import load_config
from cim.scripts import cimctl
from cim.storage.database import create_engine_for, current_revision, head_revision

PASSWORD = "correct horse"


class TerminalInput(io.StringIO):
    """A stdin that claims to be a terminal, so cimctl prompts with getpass."""

    def isatty(self) -> bool:
        return True


@dataclass
class Outcome:
    status: int
    out: str
    err: str


class CimctlTests(TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.data_dir = os.path.join(self.dir, "data")
        self.config_path = self.write_config(
            f"[node]\nid = t1\ndata_dir = {self.data_dir}\n[accounts]\nscrypt_n = 1024\n"
        )

    def write_config(self, text: str, name: str = "cim.ini") -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    def cimctl(
        self, *argv: str, stdin: io.StringIO | None = None, config: str | None = None
    ) -> Outcome:
        out, err = io.StringIO(), io.StringIO()
        status = cimctl.main(
            ["--config", config or self.config_path, *argv],
            stdin=stdin if stdin is not None else io.StringIO(""),
            stdout=out,
            stderr=err,
        )
        outcome = Outcome(status, out.getvalue(), err.getvalue())
        self.assertNotIn("Traceback", outcome.err)
        return outcome

    def add(self, name: str, password: str = PASSWORD, *extra: str) -> Outcome:
        return self.cimctl("user", "add", name, *extra, stdin=io.StringIO(password + "\n"))

    def accounts(self) -> BlockingAccountStore:
        config = load_config(self.config_path)
        engine = create_engine_for(config.database_url)
        self.addCleanup(engine.dispose)
        return BlockingAccountStore(engine, config.accounts)

    def assertOneLineError(self, outcome: Outcome, status: int, *fragments: str) -> None:
        self.assertEqual(outcome.status, status, outcome)
        self.assertEqual(outcome.out, "")
        self.assertEqual(outcome.err.count("\n"), 1, outcome.err)
        for fragment in fragments:
            self.assertIn(fragment, outcome.err)

    # --- check-config ---------------------------------------------------------------

    def test_check_config_ok(self) -> None:
        outcome = self.cimctl("check-config")
        self.assertEqual((outcome.status, outcome.out), (0, f"config ok: {self.config_path}\n"))

    def test_check_config_bad_value(self) -> None:
        path = self.write_config("[node]\nid = t1\n[accounts]\nscrypt_n = 3000\n", "bad.ini")
        outcome = self.cimctl("check-config", config=path)
        self.assertOneLineError(outcome, 2, "[accounts] scrypt_n = '3000'", "power of 2")

    def test_check_config_unknown_key(self) -> None:
        path = self.write_config("[node]\nid = t1\nda_dir = x\n", "typo.ini")
        outcome = self.cimctl("check-config", config=path)
        self.assertOneLineError(outcome, 2, "[node] da_dir = 'x'", "unknown key")

    def test_check_config_missing_key(self) -> None:
        path = self.write_config("[node]\ndata_dir = x\n", "missing.ini")
        self.assertOneLineError(self.cimctl("check-config", config=path), 2, "[node] id")

    def test_check_config_missing_file(self) -> None:
        outcome = self.cimctl("check-config", config=os.path.join(self.dir, "absent.ini"))
        self.assertOneLineError(outcome, 2, "absent.ini")

    def test_bad_config_stops_user_commands_too(self) -> None:
        path = self.write_config("[node]\nid = t1\n[accounts]\nscrypt_n = 1000\n", "bad.ini")
        self.assertOneLineError(self.cimctl("user", "list", config=path), 2, "scrypt_n")

    # --- usage ----------------------------------------------------------------------

    def test_usage_errors_exit_2(self) -> None:
        outcome = self.cimctl("user")
        self.assertEqual(outcome.status, 2)
        self.assertIn("usage: cimctl user", outcome.err)
        self.assertEqual(self.cimctl("frobnicate").status, 2)
        self.assertEqual(self.cimctl("user", "add", "x", "--kind", "robot").status, 2)

    def test_help_exits_0(self) -> None:
        outcome = self.cimctl("--help")
        self.assertEqual(outcome.status, 0)
        for name in ["check-config", "db", "user"]:
            self.assertIn(name, outcome.out)

    def test_default_config_path(self) -> None:
        self.assertIn(cimctl.default_config_path(), (cimctl.LOCAL_CONFIG, cimctl.SYSTEM_CONFIG))

    # --- db upgrade -----------------------------------------------------------------

    def test_db_upgrade_on_sqlite(self) -> None:
        head = head_revision()
        outcome = self.cimctl("db", "upgrade")
        self.assertEqual(outcome.status, 0, outcome)
        self.assertIn(f"upgraded from revision none to {head}", outcome.out)
        url = load_config(self.config_path).database_url
        self.assertEqual(current_revision(url), head)
        self.assertTrue(os.path.exists(os.path.join(self.data_dir, "cim.db")))
        again = self.cimctl("db", "upgrade")
        self.assertEqual(again.status, 0)
        self.assertIn(f"already at revision {head}", again.out)

    # --- users ----------------------------------------------------------------------

    def test_user_lifecycle(self) -> None:
        outcome = self.add("alice")
        self.assertEqual((outcome.status, outcome.out), (0, "added user alice (person)\n"))
        self.assertTrue(os.path.exists(os.path.join(self.data_dir, "cim.db")))
        self.assertTrue(self.accounts().check_password("alice", PASSWORD))
        self.assertEqual(self.cimctl("user", "list").out, "alice\n")

        passwd = self.cimctl("user", "passwd", "alice", stdin=io.StringIO("new password\n"))
        self.assertEqual(passwd.status, 0, passwd)
        self.assertTrue(self.accounts().check_password("alice", "new password"))
        self.assertFalse(self.accounts().check_password("alice", PASSWORD))

        deleted = self.cimctl("user", "del", "alice")
        self.assertEqual((deleted.status, deleted.out), (0, "deleted user alice\n"))
        self.assertEqual(self.cimctl("user", "list").out, "")

    def test_user_add_existing_is_refused(self) -> None:
        self.add("alice")
        self.assertOneLineError(self.add("alice", "other password"), 1, "already exists")
        self.assertTrue(self.accounts().check_password("alice", PASSWORD))

    def test_user_add_device_and_list_json(self) -> None:
        self.add("bob")
        self.add("watch1", PASSWORD, "--kind", "device")
        outcome = self.cimctl("user", "list", "--json")
        self.assertEqual(outcome.status, 0)
        rows = json.loads(outcome.out)
        self.assertEqual(
            [(r["name"], r["kind"]) for r in rows], [("bob", "person"), ("watch1", "device")]
        )
        self.assertIsInstance(rows[0]["created_at"], float)
        self.assertNotIn("password", outcome.out)

    def test_password_is_the_first_line_without_newline(self) -> None:
        self.cimctl("user", "add", "alice", stdin=io.StringIO(" spaced out \r\nsecond line\n"))
        self.assertTrue(self.accounts().check_password("alice", " spaced out "))

    def test_password_without_trailing_newline(self) -> None:
        self.cimctl("user", "add", "alice", stdin=io.StringIO(PASSWORD))
        self.assertTrue(self.accounts().check_password("alice", PASSWORD))

    def test_no_password_on_stdin(self) -> None:
        self.assertOneLineError(self.cimctl("user", "add", "alice"), 2, "no password")

    def test_weak_password_refused(self) -> None:
        outcome = self.add("alice", "Qz7#")
        self.assertOneLineError(outcome, 1, "at least 8")
        self.assertNotIn("Qz7#", outcome.err)
        self.assertEqual(self.cimctl("user", "list").out, "")

    def test_invalid_name(self) -> None:
        self.assertOneLineError(self.add(".alice"), 2, "invalid user name '.alice'")

    def test_missing_users(self) -> None:
        self.assertOneLineError(self.cimctl("user", "del", "ghost"), 1, "no such user: 'ghost'")
        passwd = self.cimctl("user", "passwd", "ghost", stdin=io.StringIO(PASSWORD + "\n"))
        self.assertOneLineError(passwd, 1, "no such user")

    def test_prompts_twice_on_a_terminal(self) -> None:
        answers = [PASSWORD, PASSWORD]
        prompts: list[str] = []

        def fake_getpass(prompt: str) -> str:
            prompts.append(prompt)
            return answers.pop(0)

        self.patch(cimctl, "getpass", fake_getpass)
        outcome = self.cimctl("user", "add", "alice", stdin=TerminalInput())
        self.assertEqual(outcome.status, 0, outcome)
        self.assertEqual(len(prompts), 2)
        self.assertTrue(self.accounts().check_password("alice", PASSWORD))

    def test_prompted_passwords_must_match(self) -> None:
        answers = [PASSWORD, PASSWORD + "!"]
        self.patch(cimctl, "getpass", lambda prompt: answers.pop(0))
        outcome = self.cimctl("user", "add", "alice", stdin=TerminalInput())
        self.assertOneLineError(outcome, 1, "do not match")
        self.assertEqual(self.cimctl("user", "list").out, "")

    def test_existing_user_refused_before_prompting(self) -> None:
        self.add("alice")

        def no_prompt(prompt: str) -> str:
            raise AssertionError("prompted for a password that would be thrown away")

        self.patch(cimctl, "getpass", no_prompt)
        outcome = self.cimctl("user", "add", "alice", stdin=TerminalInput())
        self.assertOneLineError(outcome, 1, "already exists")
