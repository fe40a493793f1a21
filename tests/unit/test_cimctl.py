"""cimctl, run in-process through main(argv) with a temporary config and fake stdin."""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass

from twisted.trial.unittest import TestCase

from cim.accounts.store import BlockingAccountStore
from cim.config import load_config
from cim.scripts import cimctl
from cim.storage.database import create_engine_for, current_revision, head_revision
from tests.fakes.operators import OPS1_TOKEN, OPS2_TOKEN, write_tokens

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
        return BlockingAccountStore(engine, config.accounts, clock=time.time)

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

    def test_check_config_echoes_the_value_as_typed(self) -> None:
        path = self.write_config("[node]\nid = t1\n[im]\nheartbeat_timeout = 1s\n", "hb.ini")
        outcome = self.cimctl("check-config", config=path)
        self.assertOneLineError(outcome, 2, "[im] heartbeat_timeout = '1s': must be longer")
        self.assertNotIn("1.0", outcome.err)

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

    def test_version(self) -> None:
        from cim.version import version_string

        outcome = self.cimctl("--version")
        self.assertEqual((outcome.status, outcome.out), (0, f"cimctl {version_string()}\n"))

    def test_a_router_that_is_not_running_is_status_3(self) -> None:
        from tests.integration.support.services import free_port

        port = free_port()
        tokens = os.path.join(self.dir, "tokens")
        write_tokens(tokens, {"ops1": OPS1_TOKEN})
        path = self.write_config(
            f"[node]\nid = t1\n[router]\nlisten = tcp:{port}:interface=127.0.0.1\n"
            f"[admin]\ntoken_file = {tokens}\n",
            "r.ini",
        )
        for command in (["online", "--json"], ["kick", "bob"]):
            outcome = self.cimctl(*command, config=path)
            self.assertOneLineError(
                outcome, 3, f"cannot reach the router at http://127.0.0.1:{port}"
            )

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
        rows = json.loads(outcome.out)["items"]
        self.assertEqual(
            [(r["name"], r["kind"]) for r in rows], [("bob", "person"), ("watch1", "device")]
        )
        self.assertRegex(rows[0]["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
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

    def test_reserved_names_are_refused(self) -> None:
        """Issue 17, acceptance 5: system, admin, @x cannot be created with cimctl."""
        path = self.write_config(
            f"[node]\nid = t1\ndata_dir = {self.data_dir}\n"
            "[accounts]\nscrypt_n = 1024\nreserved_names = support, Helpdesk\n",
            "reserved.ini",
        )
        for name in ("system", "admin", "root", "Admin", "ROOT", "support", "helpdesk"):
            outcome = self.cimctl(
                "user", "add", name, stdin=io.StringIO(PASSWORD + "\n"), config=path
            )
            self.assertOneLineError(outcome, 2, f"the user name {name!r} is reserved")
        self.assertOneLineError(self.add("@x"), 2, "the user name '@x' is reserved")
        self.assertOneLineError(self.add("@system"), 2, "is reserved")
        self.assertEqual(self.cimctl("user", "list", config=path).out, "")
        self.assertEqual(self.add("administrator").status, 0)  # only the names themselves

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


class GroupAndKeyTests(CimctlTests):
    """cimctl group list|show and keygen, in-process on a temporary node."""

    def make_groups(self) -> None:
        from cim.storage.database import upgrade
        from cim.storage.groups import create_group_txn
        from tests.fakes.contacts import befriend_txn

        for name in ("alice", "bob", "carol"):
            self.assertEqual(self.add(name).status, 0)
        config = load_config(self.config_path)
        upgrade(config.database_url)
        engine = create_engine_for(config.database_url)
        self.addCleanup(engine.dispose)
        with engine.begin() as connection:
            befriend_txn(connection, "alice", "bob", "carol")  # so members are added at once
            create_group_txn(connection, "g1", "team", "alice", ["bob"], 1000.0, 500)
            create_group_txn(connection, "g2", "club", "bob", ["alice", "carol"], 2000.0, 500)
            create_group_txn(connection, "g3", "club", "carol", [], 3000.0, 500)

    def test_group_list_table_and_json(self) -> None:
        self.make_groups()
        listed = self.cimctl("group", "list")
        self.assertEqual(listed.status, 0, listed)
        lines = listed.out.splitlines()
        self.assertEqual(lines[0].split(), ["ID", "NAME", "OWNER", "MEMBERS", "CREATED"])
        self.assertEqual(
            [line.split()[:4] for line in lines[1:]],
            [
                ["g2", "club", "bob", "3"],
                ["g3", "club", "carol", "1"],
                ["g1", "team", "alice", "2"],
            ],
        )
        rows = json.loads(self.cimctl("group", "list", "--json").out)["items"]
        self.assertEqual([(r["id"], r["members"]) for r in rows], [("g2", 3), ("g3", 1), ("g1", 2)])
        self.assertEqual(rows[2]["owner"], "alice")
        self.assertEqual(rows[2]["created_at"], "1970-01-01T00:16:40.000Z")  # 1000.0

    def test_group_show(self) -> None:
        self.make_groups()
        shown = self.cimctl("group", "show", "team")
        self.assertEqual(shown.status, 0, shown)
        self.assertIn("group g1: team", shown.out)
        detail = json.loads(self.cimctl("group", "show", "g2", "--json").out)
        self.assertEqual(
            [(m["user"], m["role"]) for m in detail["members"]],
            [("bob", "owner"), ("alice", "member"), ("carol", "member")],
        )
        self.assertOneLineError(self.cimctl("group", "show", "club"), 1, "g2", "g3", "group id")
        self.assertOneLineError(self.cimctl("group", "show", "nope"), 1, "no such group")

    def test_group_list_empty(self) -> None:
        self.assertEqual(self.cimctl("db", "upgrade").status, 0)
        self.assertEqual(json.loads(self.cimctl("group", "list", "--json").out), {"items": []})

    def test_keygen_rotates_and_keeps_the_previous_key(self) -> None:
        from cim.protocols.crypto import NodeKey

        path = os.path.join(self.data_dir, "node_key.pem")
        first = self.cimctl("keygen", "--json")
        self.assertEqual(first.status, 0, first)
        made = json.loads(first.out)
        self.assertEqual(made["path"], path)
        self.assertNotIn("previous", made)  # no key before: left out, not null
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        old = NodeKey.load_or_create(path)
        self.assertEqual(old.fingerprint.hex(), made["fingerprint"])

        second = self.cimctl("keygen")
        self.assertEqual(second.status, 0, second)
        new = NodeKey.load_or_create(path)
        self.assertNotEqual(new.fingerprint, old.fingerprint)
        self.assertIn(new.fingerprint.hex(), second.out)
        self.assertIn("next login", second.out)
        previous = path + ".previous"
        self.assertEqual(os.stat(previous).st_mode & 0o777, 0o600)
        self.assertEqual(NodeKey.load_or_create(previous).fingerprint, old.fingerprint)
        self.assertEqual([n for n in os.listdir(self.data_dir) if n.endswith(".tmp")], [])

    def admin_token_file(self) -> str:
        return os.path.join(self.data_dir, "admin_token")

    def test_keygen_admin_writes_an_operators_token_mode_0600(self) -> None:
        from cim.http.operators import read_tokens

        first = self.cimctl("keygen", "--admin")
        self.assertEqual(first.status, 0, first)
        path = self.admin_token_file()
        self.assertIn(f"new admin token for operator admin in {path} (mode 0600)", first.out)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        tokens = read_tokens(path)
        self.assertEqual(list(tokens), ["admin"])
        self.assertRegex(tokens["admin"], r"^[A-Za-z0-9_-]{43}$")
        self.assertNotIn(tokens["admin"], first.out)  # never printed

        second = self.cimctl("keygen", "--admin", "--name", "ops1", "--json")
        self.assertEqual(
            json.loads(second.out), {"path": path, "operator": "ops1", "replaced": False}
        )
        again = self.cimctl("keygen", "--admin", "--name", "ops1", "--json")
        self.assertTrue(json.loads(again.out)["replaced"])
        after = read_tokens(path)
        self.assertEqual(list(after), ["admin", "ops1"])
        self.assertEqual(after["admin"], tokens["admin"])
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual([n for n in os.listdir(self.data_dir) if n.endswith(".tmp")], [])
        with open(os.path.join(self.data_dir, "operations.log"), encoding="utf-8") as log:
            events = [json.loads(line) for line in log]
        self.assertEqual(
            [e["detail"] for e in events],
            [{"action": "admin.keygen", "target": name} for name in ("admin", "ops1", "ops1")],
        )
        for event in events:
            for token in after.values():
                self.assertNotIn(token, json.dumps(event))

    def test_keygen_admin_usage_errors(self) -> None:
        self.assertOneLineError(self.cimctl("keygen", "--admin", "--bits", "2048"), 2, "--bits")
        self.assertOneLineError(self.cimctl("keygen", "--name", "ops1"), 2, "--name goes with")
        self.assertOneLineError(self.cimctl("keygen", "--admin", "--name", "a b"), 2, "--name")
        os.makedirs(self.data_dir)
        with open(self.admin_token_file(), "w", encoding="utf-8") as handle:
            handle.write("not a token line\n")
        self.assertOneLineError(self.cimctl("keygen", "--admin"), 1, "line 1", "fix it first")

    def test_online_and_kick_need_a_token_to_send(self) -> None:
        for command in (["online"], ["kick", "bob"]):
            self.assertOneLineError(
                self.cimctl(*command), 2, "no admin token", "cimctl keygen --admin"
            )
        os.makedirs(self.data_dir)
        write_tokens(self.admin_token_file(), {"ops1": OPS1_TOKEN, "ops2": OPS2_TOKEN})
        self.assertOneLineError(self.cimctl("online"), 2, "ops1, ops2: choose one with --operator")
        self.assertOneLineError(
            self.cimctl("--operator", "ops3", "online"), 2, "has no token for 'ops3'"
        )

    def test_keygen_refuses_a_short_key(self) -> None:
        self.assertOneLineError(self.cimctl("keygen", "--bits", "512"), 2, "at least")
