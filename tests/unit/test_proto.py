"""The committed generated module must match cim.proto (run `make proto` when it fails)."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from cim.protocols import cim_pb2

PROTOCOLS = os.path.dirname(os.path.abspath(cim_pb2.__file__))


class GeneratedModuleTests(SynchronousTestCase):
    def test_committed_module_is_current(self) -> None:
        from grpc_tools import protoc

        out = os.path.abspath(self.mktemp())
        os.makedirs(out)
        status = protoc.main(
            [
                "protoc",
                f"-I{PROTOCOLS}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                os.path.join(PROTOCOLS, "cim.proto"),
            ]
        )
        self.assertEqual(status, 0)
        for name in ("cim_pb2.py", "cim_pb2.pyi"):
            with (
                open(os.path.join(out, name), encoding="utf-8") as fresh,
                open(os.path.join(PROTOCOLS, name), encoding="utf-8") as committed,
            ):
                self.assertEqual(
                    committed.read(), fresh.read(), f"{name} is stale: run `make proto`"
                )

    def test_frame_types_fit_one_byte(self) -> None:
        """The wire format spends one byte on the frame type."""
        for name, number in cim_pb2.FrameType.items():
            self.assertLess(number, 256, name)
