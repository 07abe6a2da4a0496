"""Integrations of the fabric with serving engines (vLLM)."""
