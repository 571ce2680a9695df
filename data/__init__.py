"""Tokenizing, corpus recipes, sharding and loading (installed as `gpt.data`)."""
