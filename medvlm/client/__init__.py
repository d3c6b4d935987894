"""Python client of the medvlm gateway: sync and asyncio clients, results as dataclasses.

    from medvlm.client import Client

    with Client("127.0.0.1:50050") as client:
        result = client.classify("chest.png", labels=["normal chest radiograph", "cardiomegaly"])
        print(result.best.label, result.best.probability)
"""

from medvlm.client._aio import AsyncClient
from medvlm.client._errors import (
    DeadlineExceeded, InvalidInput, MedvlmError, NotSupported, Overloaded, PermissionDenied,
    Unauthenticated, Unavailable, UnreadableFile, UnrecognizedFile,
)
from medvlm.client._images import WINDOW_PRESETS, ImageSource, LoadedImage, Window, load_image, sniff
from medvlm.client._settings import ConnectionSettings, settings_from
from medvlm.client._sync import Client
from medvlm.client._types import (
    AbstainReason, ClassifyResult, Embedding, Embeddings, EngineInfo, ItemError, ItemResult, LabelScore, ModelInfo,
    Priority, SimilarityResult, Trust,
)

__all__ = [
    "AsyncClient", "Client", "ConnectionSettings", "settings_from",
    "AbstainReason", "ClassifyResult", "Embedding", "Embeddings", "EngineInfo", "ItemError", "ItemResult", "LabelScore",
    "ModelInfo", "Priority", "SimilarityResult", "Trust",
    "ImageSource", "LoadedImage", "WINDOW_PRESETS", "Window", "load_image", "sniff",
    "MedvlmError", "InvalidInput", "Unavailable", "Overloaded", "DeadlineExceeded", "Unauthenticated",
    "PermissionDenied", "UnreadableFile", "UnrecognizedFile", "NotSupported",
]
