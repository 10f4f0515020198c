"""Loading and exporting trained tokenizers."""
