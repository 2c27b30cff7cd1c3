"""Data pipelines: text corpora (data.text), image datasets (data.images), downloads (data.download)."""
