"""Prompt sources: a generated verifiable task (the offline default)."""
