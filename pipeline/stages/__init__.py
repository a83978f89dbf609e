"""The DVC stages, in graph order: prepare, plan, annotate, compose, review, export, qa (and annotate for new imagery)."""
