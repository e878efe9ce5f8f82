"""Serving hogwild-ray over HTTP: an OpenAI-compatible endpoint on Ray Serve."""
