"""Helpers for the integration tests: real services, daemon processes, clusters."""
