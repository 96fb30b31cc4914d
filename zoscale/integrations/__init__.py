"""Integrations with the training frameworks people already use (imported on demand)."""
