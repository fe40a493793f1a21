"""Issue 18, acceptance 3: the web app in a real browser against a real daemon.

The daemon serves the app (``[web]``, built from ``web/`` into this test's directory
so the test sees the sources as they are), the WebSocket gateway, and the router,
logic and file services with CORS for the app's origin. ``web/e2e/chat.mjs`` drives
Debian's headless Chromium through playwright-core: alice logs in, bob registers from
the page; alice sends a text and an image, bob sees both live with the thumbnail,
alice sees them read; bob sees alice typing, an edit and a recall; a file bob
downloads byte for byte; bob's page closes, alice sends three more, bob comes back to
an unread count of 3 and the three messages; alice, also logged in with cim-client
(``--device cli``) beside her page, sends bob a message there: her page shows it once
as hers (read by bob), bob's once as alice's; screenshots of both pages; a group
(create, invitation accepted, a post); a watch's SOS shown to its guardian carol and
acknowledged from her page; every control named and reachable; a second tab of
alice's (the same browser, so the same device) takes over and the first says so at its
login form, not reconnecting; no console errors; and
when the daemon stops, both pages say they are offline and reconnecting.

``make test`` builds the app's npm packages first (``make web``); without Node,
those packages or Chromium the test is skipped, or fails when CIM_REQUIRE_SERVICES
is set (as in .ci/run).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.integration.support.daemons import BIN, PASSWORD, ROOT, DaemonProcess, free_port

WEB = os.path.join(ROOT, "web")
CHROMIUM = "/usr/bin/chromium"
SCENARIO_TIMEOUT = 240
STEPS = (
    "alice logs in, bob registers and is logged in",
    "alice opens a chat with bob and sends a text with Enter",
    "bob sees the text live",
    "alice sends an image; the progress bar reaches 100%",
    "bob sees the image live with its thumbnail",
    "bob has the conversation open, so he has read both, alice sees them marked read",
    "alice types, bob sees that she is typing",
    "alice edits one message and recalls another, bob sees both changes",
    "alice sends a file, bob downloads the same bytes",
    "bob's page is closed; alice sends three more",
    "bob opens the page again, the conversation shows 3 unread and the three messages",
    "alice is also logged in from the Python CLI and her web page shows the message she sent there",
    "screenshots",
    "alice creates a group with bob and posts; bob sees it",
    "a watch raises an SOS, its guardian carol sees it on top and acknowledges it",
    "every control on the pages has a name, and the keyboard reaches it",
    "a second tab of alice's takes her device over, the first says so at its login form",
    "no console errors",
    "the daemon stops, the pages show that they are offline and reconnecting",
)


def missing_tools() -> str:
    """What this machine lacks for the browser test, or ''."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not os.path.isdir(os.path.join(WEB, "node_modules", "playwright-core")):
        return "web/node_modules is not installed (make web)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is not installed (.ci/tools.sh installs it)"
    return ""


def require_tools(test: SynchronousTestCase) -> None:
    missing = missing_tools()
    if missing:
        if os.environ.get("CIM_REQUIRE_SERVICES"):
            test.fail(f"the web app's tests cannot run: {missing}")
        raise SkipTest(missing)


class WebAppUnitTests(SynchronousTestCase):
    """The app's own node --test suite (web/test: the model, notices, addresses), so
    that its result counts in trial's."""

    def test_the_apps_unit_tests_pass(self) -> None:
        require_tools(self)
        run = subprocess.run(
            ["npm", "test", "--silent"], capture_output=True, text=True, timeout=180, cwd=WEB
        )
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
        self.assertRegex(run.stdout, r"(?m)^# fail 0$")
        self.assertRegex(run.stdout, r"(?m)^# pass [1-9]")


class WebAppInBrowserTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_tools(self)
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.app = os.path.join(self.workdir, "app")
        built = subprocess.run(
            ["node", os.path.join(WEB, "build.mjs"), "--out", self.app],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=WEB,
        )
        self.assertEqual(built.returncode, 0, built.stderr)
        self.web_port = free_port()
        self.ports = {name: free_port() for name in ("ws", "logic", "files")}
        origin = f"http://127.0.0.1:{self.web_port}"
        self.daemon = DaemonProcess(
            os.path.join(self.workdir, "node"),
            node_id="web1",
            extra=(
                f"[router]\ncors_origins = {origin}\n"
                f"[ws]\nenabled = true\nlisten = tcp:{self.ports['ws']}:interface=127.0.0.1\n"
                f"allowed_origins = {origin}\n"
                f"[logic]\nenabled = true\nlisten = tcp:{self.ports['logic']}:interface=127.0.0.1\n"
                f"cors_origins = {origin}\n"
                f"[files]\nenabled = true\nlisten = tcp:{self.ports['files']}:interface=127.0.0.1\n"
                f"storage_dir = {self.workdir}/storage\ncors_origins = {origin}\n"
                f"[web]\nenabled = true\nlisten = tcp:{self.web_port}:interface=127.0.0.1\n"
                f"root = {self.app}\n"
            ),
        )
        # bob registers from the page (the logic service's /register).
        added = self.daemon.cimctl("user", "add", "alice", stdin=PASSWORD + "\n")
        self.assertEqual(added.returncode, 0, added.stderr)
        self.daemon.start()
        self.addCleanup(self.daemon.stop)

    def test_two_people_chat_in_the_browser(self) -> None:
        shots = os.environ.get("CIM_SCREENSHOTS") or os.path.join(self.workdir, "screenshots")
        os.makedirs(shots, exist_ok=True)
        environment = dict(
            os.environ,
            CIM_WEB_URL=f"http://127.0.0.1:{self.web_port}",
            CIM_ROUTER=self.daemon.router_url,
            CIM_LOGIC=f"http://127.0.0.1:{self.ports['logic']}",
            CIM_FILES=f"http://127.0.0.1:{self.ports['files']}",
            CIM_PASSWORD=PASSWORD,
            CIM_SHOTS=shots,
            CIM_CHROMIUM=CHROMIUM,
            CIM_CLIENT=os.path.join(BIN, "cim-client"),
            CIM_DAEMON_PID=str(self.daemon.process.pid),
            PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD="1",
        )
        run = subprocess.run(
            ["node", os.path.join(WEB, "e2e", "chat.mjs")],
            capture_output=True,
            text=True,
            timeout=SCENARIO_TIMEOUT,
            cwd=WEB,
            env=environment,
        )
        report = run.stdout + run.stderr
        print(report)  # the steps and their figures, in the test log
        self.assertEqual(run.returncode, 0, f"{report}\n--- daemon log ---\n{self.daemon.log()}")
        lines = run.stdout.splitlines()
        done = [line[3:].split(": ")[0] for line in lines if line.startswith("ok ")]
        self.assertEqual(done, list(STEPS))
        for name in ("web-alice.png", "web-bob.png", "web-bob-unread.png"):
            with open(os.path.join(shots, name), "rb") as image:
                self.assertEqual(image.read(8), b"\x89PNG\r\n\x1a\n")
