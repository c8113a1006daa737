"""Image decoding, datasets and albumentations pipelines."""
