"""Geometry of tiles and objects: masks (RLE), measurements, priors, set-of-marks, categories, user geometry checks."""
