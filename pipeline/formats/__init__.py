"""Output formats: the GeoPixel training layout and the HTML report."""
