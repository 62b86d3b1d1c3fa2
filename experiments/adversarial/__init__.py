"""The adversarial-training study: attacks, the sparse-feature task drawn as images, the sweep."""
