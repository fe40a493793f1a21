"""Importing cim costs nothing it does not use: no reactor, no backend library.

Library code is given its reactor (``cim.reactor``), so importing a module must not
install Twisted's default one: twistd installs the reactor its options name, and a
module that imported ``twisted.internet.reactor`` first would make that fail. And a
node whose config uses the embedded backends must not carry pika, kazoo or
txredisapi: a backend library is imported only by that backend's own module, which
the backend factories (``make_bus``, ``make_registry``, ``make_state_store``) import
when the config asks for it.

The imports run in a fresh interpreter (``python -c``), since this test process has
long since imported all of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BACKEND_LIBRARIES = {
    "pika": ("rabbitmq", "amqp"),
    "kazoo": ("zookeeper",),
    "txredisapi": ("redis",),
}
"""Each backend library, and the words in the names of the only modules that may import it.

Those modules are imported only when the config names their backend, by which time
twistd has installed its reactor; pika's Twisted adapter and txredisapi install the
default reactor when imported, so they are left out of the reactor check too."""
BACKEND_WORDS = sorted(word for words in BACKEND_LIBRARIES.values() for word in words)

IMPORT_EVERYTHING = """
import importlib, json, os, pkgutil, sys
import cim

SCRIPTS = {"cim.storage.migrations.env"}  # Alembic's, run only inside Alembic
libraries, skipped_words = json.loads(sys.argv[1]), json.loads(sys.argv[2])
def walk(path, prefix):
    # pkgutil.walk_packages imports every package to recurse into it, which would
    # import a backend package's library before the loop below could see who did.
    for info in pkgutil.iter_modules(path, prefix):
        yield info.name
        if info.ispkg:
            yield from walk([os.path.join(path[0], info.name.rpartition(".")[2])], info.name + ".")

modules = sorted(
    name
    for name in walk(cim.__path__, "cim.")
    if not any(word in name for word in skipped_words) and name not in SCRIPTS
)
report = {"modules": len(modules), "reactor": [], "libraries": {}}
for name in modules:
    importlib.import_module(name)
    if "twisted.internet.reactor" in sys.modules:
        report["reactor"].append(name)
        # Forget it, so the next module that installs one is caught too.
        import twisted.internet
        del sys.modules["twisted.internet.reactor"]
        del twisted.internet.reactor
    for library in libraries:
        if library in sys.modules and library not in report["libraries"]:
            report["libraries"][library] = name
print(json.dumps(report))
"""


def import_in_a_fresh_interpreter(skipping: list[str]) -> dict[str, Any]:
    """Import every cim module (but those whose name has a word of ``skipping``) in
    a new interpreter; report the modules whose import installed the reactor and the
    first that brought each backend library."""
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            IMPORT_EVERYTHING,
            json.dumps(sorted(BACKEND_LIBRARIES)),
            json.dumps(skipping),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=path),
    )
    if result.returncode != 0:
        raise AssertionError(f"importing cim failed:\n{result.stderr}")
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


class ImportTests(SynchronousTestCase):
    def test_no_module_installs_the_reactor(self) -> None:
        report = import_in_a_fresh_interpreter(BACKEND_WORDS)
        self.assertGreater(report["modules"], 50)
        self.assertEqual(
            report["reactor"],
            [],
            "modules whose import installed the global reactor: " + ", ".join(report["reactor"]),
        )

    def test_no_backend_library_outside_its_backend_module(self) -> None:
        report = import_in_a_fresh_interpreter(BACKEND_WORDS)
        offenders = report["libraries"]
        self.assertEqual(
            offenders,
            {},
            "backend libraries imported by modules that are not their backend's "
            "(library: the first module whose import brought it): "
            + ", ".join(f"{library}: {module}" for library, module in sorted(offenders.items())),
        )
