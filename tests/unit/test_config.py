"""Config validation: every error is one line naming section, key and value."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from cim.config import ConfigError, load_config, parse_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MINIMAL = "[node]\nid = n1\n"


class ShippedConfigTests(SynchronousTestCase):
    def test_shipped_config_is_valid_and_documents_every_key(self) -> None:
        """etc/cim.ini parses, and names every key each section class knows."""
        import dataclasses

        from cim.config import SECTIONS

        path = os.path.join(ROOT, "etc", "cim.ini")
        config = load_config(path)
        self.assertEqual(config.node.id, "node1")
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        for cls in SECTIONS:
            self.assertIn(f"[{cls.section}]", text)
            for spec in dataclasses.fields(cls):
                self.assertRegex(text, rf"(?m)^{spec.name} =", f"[{cls.section}] {spec.name}")

    def test_defaults(self) -> None:
        config = parse_config(MINIMAL)
        self.assertEqual(config.router.listen, "tcp:8080:interface=127.0.0.1")
        self.assertEqual(config.im.listen, "tcp:9000:interface=127.0.0.1")
        self.assertEqual(config.admin.listen, "tcp:9100:interface=127.0.0.1")
        self.assertEqual(config.logic.listen, "tcp:8081:interface=127.0.0.1")
        self.assertEqual(config.files.listen, "tcp:8082:interface=127.0.0.1")
        self.assertEqual(config.im.max_frame_size, 65536)
        self.assertEqual(config.im.handshake_timeout, 10.0)
        self.assertEqual(config.im.heartbeat_interval, 30.0)
        self.assertEqual(config.im.effective_heartbeat_timeout, 90.0)
        self.assertEqual(config.router.duplicate_login, "kick_old")
        self.assertEqual(config.im.cipher_suites[0], "chacha20-poly1305")
        self.assertEqual(config.database_url, "sqlite:///data/cim.db")

    def test_units(self) -> None:
        config = parse_config(
            MINIMAL + "[im]\nmax_frame_size = 1MiB\nheartbeat_interval = 2m\n"
            "handshake_timeout = 500ms\n"
        )
        self.assertEqual(config.im.max_frame_size, 1 << 20)
        self.assertEqual(config.im.heartbeat_interval, 120.0)
        self.assertEqual(config.im.handshake_timeout, 0.5)


class ConfigErrorTests(SynchronousTestCase):
    def assertConfigError(self, text: str, expected: str) -> ConfigError:
        with self.assertRaises(ConfigError) as caught:
            parse_config(text)
        message = str(caught.exception)
        self.assertEqual(message, expected)
        self.assertNotIn("\n", message)
        return caught.exception

    def test_bad_value(self) -> None:
        error = self.assertConfigError(
            MINIMAL + "[im]\nheartbeat_interval = often\n",
            "config error: [im] heartbeat_interval = 'often': "
            "expected a duration such as 30, 30s, 5m, 2h or 7d",
        )
        self.assertEqual(
            (error.section, error.key, error.value), ("im", "heartbeat_interval", "often")
        )

    def test_bad_choice(self) -> None:
        self.assertConfigError(
            MINIMAL + "[router]\nduplicate_login = both\n",
            "config error: [router] duplicate_login = 'both': "
            "expected one of: kick_old, refuse_new",
        )

    def test_missing_required_key(self) -> None:
        self.assertConfigError(
            "[node]\ndata_dir = /tmp\n", "config error: [node] id: required key is missing"
        )

    def test_missing_section_means_missing_required_key(self) -> None:
        self.assertConfigError("[im]\n", "config error: [node] id: required key is missing")

    def test_unknown_key(self) -> None:
        error = self.assertConfigError(
            MINIMAL + "[im]\nheartbeat_intervall = 30\n",
            "config error: [im] heartbeat_intervall = '30': unknown key (known keys: "
            "advertise, background_heartbeat_interval, cipher_suites, default_group_adds, "
            "default_message_policy, edit_window, enabled, "
            "handshake_replay_window, handshake_timeout, "
            "heartbeat_interval, heartbeat_timeout, listen, max_bad_frames, "
            "max_connections_per_address, max_devices_per_user, max_frame_size, "
            "max_pending_work, max_queued_bytes, max_text_length, outbound_budget, "
            "recall_window, resume_window, rsa_key, "
            "rsa_key_bits, slow_reader_timeout)",
        )
        self.assertEqual(error.key, "heartbeat_intervall")

    def test_max_devices_per_user_is_bounded(self) -> None:
        self.assertConfigError(
            MINIMAL + "[im]\nmax_devices_per_user = 0\n",
            "config error: [im] max_devices_per_user = '0': must be at least 1",
        )

    def test_unknown_section(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config(MINIMAL + "[imm]\nenabled = true\n")
        self.assertIn("[imm]: unknown section", str(caught.exception))

    def test_bad_port(self) -> None:
        self.assertConfigError(
            MINIMAL + "[router]\nlisten = tcp:70000:interface=127.0.0.1\n",
            "config error: [router] listen = 'tcp:70000:interface=127.0.0.1': "
            "port must be between 0 and 65535",
        )

    def test_port_not_a_number(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config(MINIMAL + "[admin]\nlisten = tcp:http\n")
        self.assertTrue(
            str(caught.exception).startswith(
                "config error: [admin] listen = 'tcp:http': not a valid endpoint description"
            )
        )

    def test_bad_advertise_port(self) -> None:
        self.assertConfigError(
            MINIMAL + "[im]\nadvertise = chat.example.com:0\n",
            "config error: [im] advertise = 'chat.example.com:0': port must be between 1 and 65535",
        )

    def test_below_minimum(self) -> None:
        self.assertConfigError(
            MINIMAL + "[im]\nmax_frame_size = 10\n",
            "config error: [im] max_frame_size = '10': must be at least 1024",
        )

    def test_unknown_cipher_suite(self) -> None:
        self.assertConfigError(
            MINIMAL + "[im]\ncipher_suites = aes-gcm\n",
            "config error: [im] cipher_suites = 'aes-gcm': unknown suite 'aes-gcm'; "
            "known: chacha20-poly1305, rc4-hmac-sha256",
        )

    def test_a_rule_across_keys_echoes_the_value_as_typed(self) -> None:
        """Not the parsed 1.0: the operator looks for "1s" in the file."""
        error = self.assertConfigError(
            MINIMAL + "[im]\nheartbeat_timeout = 1s\n",
            "config error: [im] heartbeat_timeout = '1s': "
            "must be longer than heartbeat_interval (30 s)",
        )
        self.assertEqual(error.value, "1s")
        self.assertConfigError(
            MINIMAL + "[accounts]\nscrypt_n = 3_000\n",
            "config error: [accounts] scrypt_n = '3_000': must be a power of 2",
        )

    def test_a_url_as_typed_still_hides_its_password(self) -> None:
        self.assertConfigError(
            MINIMAL + "[database]\nurl = mysql://cim:s3cret@db/cim\n",
            "config error: [database] url = 'mysql://cim:***@db/cim': "
            "expected a sqlite:// or postgresql:// URL",
        )

    def test_key_given_twice(self) -> None:
        self.assertConfigError(
            MINIMAL + "[im]\nenabled = true\nenabled = false\n",
            "config error: [im] enabled: key given twice",
        )

    def test_unreadable_file(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_config(os.path.join(self.mktemp(), "absent.ini"))
        self.assertIn("cannot read", str(caught.exception))


class LogicConfigTests(SynchronousTestCase):
    def test_logic_keys(self) -> None:
        config = parse_config(
            MINIMAL + "[logic]\nenabled = true\nfence_margin = 12.5\nbinding_code_ttl = 5m\n"
        )
        self.assertTrue(config.logic.enabled)
        self.assertEqual((config.logic.fence_margin, config.logic.binding_code_ttl), (12.5, 300.0))

    def test_bad_name_pattern_names_section_key_and_value(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config(MINIMAL + "[logic]\nname_pattern = [a-z\n")
        message = str(caught.exception)
        self.assertTrue(
            message.startswith("config error: [logic] name_pattern = '[a-z': not a regular"),
            message,
        )

    def test_fence_margin_must_be_a_finite_number(self) -> None:
        for value in ("nan", "inf", "wide"):
            with self.assertRaises(ConfigError) as caught:
                parse_config(MINIMAL + f"[logic]\nfence_margin = {value}\n")
            self.assertIn("[logic] fence_margin", str(caught.exception))
