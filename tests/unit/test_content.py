"""cim.content: the text and URLs a client may hand to other people."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cim.content import MAX_URL_LENGTH, MediaUrls, control_characters_in


class ControlCharacterTests(SynchronousTestCase):
    def test_control_characters_but_newline_and_tab_are_found(self) -> None:
        for text in (
            "\x1b[2J\x1b[31mfake system notice",  # ESC: an ANSI sequence
            "hi\x00",
            "safe\rEVIL",  # a carriage return hides what came before it
            "\x07bell",
            "\x7f",
            "\x9b31m",  # C1 CSI: an ANSI sequence in one character
            "\x85",
            "a\x0bb",
            "a\x0cb",
        ):
            self.assertTrue(control_characters_in(text), repr(text))

    def test_everything_else_is_text(self) -> None:
        for text in (
            "",
            "line one\nline two\tcolumn",
            "emoji 👨‍👩‍👧 with zero-width joiners",
            "中文 العربية עברית",
            "\u00a0non-breaking\u00a0space",
        ):
            self.assertFalse(control_characters_in(text), repr(text))


class MediaUrlTests(SynchronousTestCase):
    def test_https_anywhere(self) -> None:
        urls = MediaUrls()
        for url in (
            "https://cdn.example.com/a.jpg",
            "HTTPS://cdn.example.com/a.jpg",
            "https://[2001:db8::1]:8443/f?x=1#y",
        ):
            self.assertTrue(urls.accepts(url), url)

    def test_other_schemes_and_broken_urls_are_refused(self) -> None:
        urls = MediaUrls(["http://127.0.0.1:8082"])
        for url in (
            "javascript:alert(1)",
            "JavaScript:alert(document.cookie)",
            "data:text/html;base64,PHNjcmlwdD4=",
            "file:///etc/passwd",
            "ftp://files.example/f",
            "http://cdn.example.com/a.jpg",  # plain http elsewhere
            "http://127.0.0.1:8083/files/x",  # another port
            "https://bank.example@evil.example/login",
            "https://user:pw@cdn.example.com/a",
            "https://cdn.example.com/a b",
            "https://cdn.example.com/a\n",
            "https://cdn.example.com/\x1b[2J",
            "https://cdn.example.com:99999/a",
            "https:///nohost",
            "http://[",
            "//cdn.example.com/a",
            "https://" + "a" * MAX_URL_LENGTH,
            "",
        ):
            self.assertFalse(urls.accepts(url), url)

    def test_this_nodes_file_service_whatever_its_scheme(self) -> None:
        urls = MediaUrls()
        own = "http://127.0.0.1:8082/files/f1?expires=1&sig=x"
        self.assertFalse(urls.accepts(own))
        urls.trust("http://127.0.0.1:8082")
        self.assertTrue(urls.accepts(own))
        self.assertTrue(urls.accepts("HTTP://127.0.0.1:8082/files/f1"))
        self.assertFalse(urls.accepts("http://127.0.0.1:8082@evil.example/files/f1"))
        urls.trust("http://files.internal/cim/")
        self.assertTrue(urls.accepts("http://files.internal/cim/files/f2"))
        self.assertFalse(urls.accepts("http://files.internal/other/f2"))
        self.assertFalse(urls.accepts("http://files.internal/cimx/f2"))
        self.assertRaises(ValueError, urls.trust, "not a url")
