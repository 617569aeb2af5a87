"""Checks that effroll stays lossless: statistical tests, `effroll verify`, the online audit."""
