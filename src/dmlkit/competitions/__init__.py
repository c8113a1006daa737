"""Competition adapters: a name → adapter table, so a config names its competition."""

from __future__ import annotations

from .animalclef import AnimalCLEF2026
from .base import Adapter, Calibration, InputError, Predictions
from .generic_csv import GenericCSV
from .happywhale import Happywhale
from .humpback import Humpback
from .image_folder import ImageFolder
from .landmark_recognition import LandmarkRecognition
from .landmark_retrieval import LandmarkRetrieval
from .wildlife import Wildlife

ADAPTERS: dict[str, type[Adapter]] = {
    cls.name: cls
    for cls in (
        LandmarkRecognition,
        LandmarkRetrieval,
        Humpback,
        Happywhale,
        GenericCSV,
        ImageFolder,
        Wildlife,
        AnimalCLEF2026,
    )
}


def get_adapter(name: str) -> Adapter:
    try:
        return ADAPTERS[name]()
    except KeyError:
        raise KeyError(f"unknown competition '{name}'; known: {sorted(ADAPTERS)}") from None


def adapter_for_header(columns: list[str]) -> Adapter:
    """The adapter whose submission header is exactly these columns."""
    for cls in ADAPTERS.values():
        if tuple(columns) == cls.header:
            return cls()
    known = {name: list(cls.header) for name, cls in ADAPTERS.items()}
    raise InputError(f"submission header {columns} matches no competition; known headers: {known}")


__all__ = ["ADAPTERS", "Adapter", "Calibration", "InputError", "Predictions", "adapter_for_header", "get_adapter"]
