"""GeoPixelD builder: stages as pure functions on shards, the CLI and the dask runner."""

__version__ = "0.1.0"
