"""The package version: a leaf, so that modules recording provenance need not import the package's face."""

__version__ = "0.1.0"
