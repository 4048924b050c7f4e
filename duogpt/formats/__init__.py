"""Weight formats: the bitmap-compressed representation of a pruned linear weight."""

from duogpt.formats.bitmap import FORMAT_VERSION, BitmapWeight

__all__ = ["FORMAT_VERSION", "BitmapWeight"]
