"""Pictures of a run and of a backbone's features, as PNG files.

- ``curves``: training curves from a run's ``metrics.jsonl`` (one panel per metric family, runs overlaid);
- ``embedding``: a 2-D map (t-SNE or PCA) of backbone features, coloured by label;
- ``neighbors``: retrieval grids, each query followed by its nearest images in a bank by cosine similarity.

matplotlib and scikit-learn are imported inside the functions that need them, so ``ssl`` starts as fast as before.
"""
