"""The logic service's HTTP face: each feature's declared endpoints, and their wiring.

The features (``cim.logic.accounts``...) know nothing of HTTP: they take plain values
and raise ``cim.logic.errors``. Here each one's operations are declared with their
JSON schemas (``accounts``, ``bindings``, ``sos``, ``fences``, ``posts``), and ``api``
turns callers' tokens into a ``Caller``, refusals into statuses, and the declarations
into one resource and its OpenAPI document. Only this package imports ``cim.http``.
"""
