"""Image sets -> WebDataset shards with an index, and tools to look into shard sets.

    python -m shards --help          # demo | folder | imagenet | coco | inspect | verify
    python -m shards.bench           # builder throughput against plain PIL

Modules: `index` (the index.json contract with the training pipeline), `build` (the shared,
resumable writer loop), `images` (decode checks, RGB conversion, EXIF, resizing), `builders`
(listing folders, ImageNet and COCO), `demo` (the generated shapes set), `check` (inspect, verify).
Usable without a GPU; nothing here imports the models or the trainer.
"""
