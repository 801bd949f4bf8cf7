"""Integrations with training frameworks; each lives in its own module and imports its
framework only when that module is imported (``shardckpt.integrations.lightning`` needs the
``lightning`` extra)."""

from __future__ import annotations
