"""Encoders, decoders and their building blocks."""
