"""Data: what a user's dataset is and how it becomes examples.

- `sources`: detecting and loading a dataset (hub id, `datasets` directory, parquet/arrow, image folder,
  COCO, manifest) and picking its splits
- `formats`: the layouts `datasets` does not read itself (COCO captions, manifests, typed metadata files)
- `images`: images from files and dataset cells, as RGB
- `examples`: (image, prompt, target) examples, one per caption or answer
- `stream`: the same examples from a stream (`--streaming`)
- `batching`: the collator and the seeded epoch order
- `checks`: the record checks and `vlmtune data check`
- `synthetic`: generated datasets for the demo, tests and benchmarks
"""
