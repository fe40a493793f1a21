"""The IM node's domain: who is connected here and how a message travels.

The rooms deal in sessions (anything with ``deliver`` and ``kick``), never in
sockets, so the whole message flow is testable without a transport. ``ImNode``
(cim.im.node) builds them and merges the frame types each answers into the table the
connection protocol (cim.protocols.im) dispatches through.
"""
