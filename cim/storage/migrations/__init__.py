"""Alembic migrations for cim's database, run programmatically by cim.storage.database."""
