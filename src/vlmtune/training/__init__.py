"""Training: `run.train` reads top to bottom (preflight checks, the model, the data, the loop, the adapter).

- `preflight`: every check the options and the model's config allow, before any weights load
- `pipeline`: the splits read and checked, the feature cache filled, the loaders (map-style or a stream)
- `cache`: image features computed once (in memory, spilled to disk, or kept in a directory across runs)
- `loop`: the steps, with logging, samples, validation and checkpoints on the way
- `evaluation`: validation loss and caption metrics during training
- `checkpoint`: checkpoints that a resumed run continues bit for bit

(The package is `training`, not `train`: `vlmtune.train` is the public function.)
"""
