"""Datasets: scan a folder, captions, validation, aspect buckets, latent/text caches."""
