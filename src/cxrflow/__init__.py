"""cxrflow: chest radiograph archives to per-pathology classifiers, one stage per module."""

__version__ = "0.1.0"
