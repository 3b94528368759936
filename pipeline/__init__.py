"""Offline preprocessing: dataset adapters, decoding, encoding and the parallel shard build."""
