"""Alembic migrations of refreshd's schema (applied by ``refreshd db upgrade`` and at start)."""
