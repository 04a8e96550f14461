"""The package version, at the bottom of the house so that any stage can record it without importing the
package (which would pull every stage in)."""

__version__ = "0.1.0"
