"""GeoPixel-style fine-tuning and RS-GCG evaluation (needs the `[train]` extra)."""
