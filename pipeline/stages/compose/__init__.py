"""Compose: the three passes become one grounded paragraph (wording, grounding, the stage; the LLM composer is a strategy)."""
