"""The errors a user can fix, raised where they are found and reported by the CLI as one line
(`error: ...`, exit 2) instead of a traceback. Kept free of heavy imports: `./run.sh score` and
`./run.sh runs` name them without loading torch."""

from __future__ import annotations


class TransformConfigError(ValueError):
    """An augmentation in train.augment that albumentations cannot build."""


class PretrainedWeightsError(RuntimeError):
    """timm's hub weights cannot be had (offline, or no such weights)."""


class ExtractorWeightsError(RuntimeError):
    """The learned extractor's weights cannot be had (offline, or a bad file)."""


class NonFiniteLossError(FloatingPointError):
    """A training step's loss is NaN or infinite (under train.nan_policy: stop)."""


class ExportError(RuntimeError):
    """export.onnx is on and the members do not export to ONNX."""


class PackageError(RuntimeError):
    """The package cannot be written (no project source to build the wheel from, a wheel missing)."""


class CheckpointError(ValueError):
    """A checkpoint that is unreadable (truncated, not a checkpoint) or holds more than plain data:
    loading it would run code, so it is refused."""


class ArtifactError(ValueError):
    """A cached artifact whose manifest or files cannot be read as written."""


class UserError(Exception):
    """An error the user can fix (a command's own check); printed without a traceback."""
