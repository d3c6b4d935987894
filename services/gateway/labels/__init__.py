"""Label sets: files (parsing), their embeddings served and kept on disk, and the one exact search
that scores an image against a set, a served one or the labels of a request."""

from services.gateway.labels.files import (
    DEFAULT_TEMPLATE, PLACEHOLDER, Catalogue, Label, LabelSet, LabelSetError, Refused, apply_template, transient_set,
)
from services.gateway.labels.search import Ranked, SetEmbeddings, best, softmax
from services.gateway.labels.sets import LabelSets, ensemble
from services.gateway.labels.store import EmbeddingStore, StoreBusy, index_key

__all__ = [
    "DEFAULT_TEMPLATE", "PLACEHOLDER", "Catalogue", "EmbeddingStore", "Label", "LabelSet", "LabelSetError",
    "LabelSets", "Ranked", "Refused", "SetEmbeddings", "StoreBusy", "apply_template", "best", "ensemble",
    "index_key", "softmax", "transient_set",
]
