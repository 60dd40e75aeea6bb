"""Layer 3, the driver contract and the toolkit for driver authors (public).

TODO: the public toolkit.
"""
