"""Corpora (loading, templating, tokenising) and the Ray actors that run models and write hidden states."""
