"""Readers and writers for every artefact the WebUI loads, plus an inspector that tells what a file is."""

from finetune_core.formats.aesthetic import read_aesthetic_embedding, write_aesthetic_embedding
from finetune_core.formats.atomic import atomic_write, load_pt, save_pt
from finetune_core.formats.embedding import (
    EmbeddingFile,
    embedding_from_obj,
    read_embedding,
    write_embedding,
    write_embedding_png,
)
from finetune_core.formats.hypernetwork_file import HypernetworkFile, read_hypernetwork, write_hypernetwork
from finetune_core.formats.inspect import inspect_file
from finetune_core.formats.kinds import ARTIFACT_KINDS, ArtifactInfo, ArtifactKind
from finetune_core.formats.optim_sidecar import OptimizerSidecar, read_optimizer_sidecar, write_optimizer_sidecar

__all__ = [
    "ARTIFACT_KINDS", "ArtifactInfo", "ArtifactKind", "EmbeddingFile", "HypernetworkFile", "OptimizerSidecar",
    "atomic_write", "embedding_from_obj", "inspect_file", "load_pt", "read_aesthetic_embedding", "read_embedding",
    "read_hypernetwork", "read_optimizer_sidecar", "save_pt", "write_aesthetic_embedding", "write_embedding",
    "write_embedding_png", "write_hypernetwork", "write_optimizer_sidecar",
]
