"""The chaos run (issue #14): real nodes and services, faults one at a time, and the count
of what applications were shown. ``run`` is the scenario, ``world`` the processes and
faults, ``ledger`` the counting, ``app`` the one adapter to the client library."""
