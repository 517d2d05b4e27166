"""Integrations with other libraries (PEFT)."""
