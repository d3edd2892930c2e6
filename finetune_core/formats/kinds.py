"""The kinds of artefact the WebUI loads, one row each: the output folder, the suffixes the WebUI loads from it, the
name `inspect_file` gives a file of the kind and the sentence that describes one. Everything that depends on a
kind (the same-name refusal, continuing a file, the inspector, the hosts' listings) reads this table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

UNKNOWN = "unknown"
RUN_FILE = "run file"  # a file of a training run's folder, not an artefact


@dataclass
class ArtifactInfo:
    """What `inspect_file` found.

    `kind` is the `name` of a row of ARTIFACT_KINDS (embedding, hypernetwork, checkpoint, aesthetic embedding, lora),
    "run file" (a file of a training run's folder: resume state, settings, loss CSV, preview image) or "unknown".
    """

    path: Path
    kind: str
    family: str | None = None
    name: str | None = None
    width: int | None = None
    vectors: int | None = None
    step: int | None = None
    sizes: list[int] = field(default_factory=list)
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    tensor_count: int | None = None
    details: str = ""

    def describe(self) -> str:
        """One plain sentence for the CLI and the UI."""
        kind = KIND_NAMED.get(self.kind)
        if self.kind == RUN_FILE:
            return f"{self.path.name}: {self.details}"
        if kind is None:
            return (f"{self.path.name} is not an artefact (an embedding, hypernetwork, checkpoint, LoRA or aesthetic "
                    f"embedding): {self.details}")
        text = kind.describe(self, f" ({self.family})" if self.family else "")
        if self.step is not None and kind.shows_step:
            text += f", step {self.step}"
        if self.sd_checkpoint_name or self.sd_checkpoint:
            tag = f"[{self.sd_checkpoint}]" if self.sd_checkpoint else None
            text += ", trained on " + " ".join(part for part in (self.sd_checkpoint_name, tag) if part)
        return text


def _details(info: ArtifactInfo) -> str:
    return f", {info.details}" if info.details else ""


def _embedding(info: ArtifactInfo, family: str) -> str:
    plural = "vector" if info.vectors == 1 else "vectors"
    return f"Textual-inversion embedding '{info.name}': {info.vectors} {plural} of width {info.width}{family}"


def _hypernetwork(info: ArtifactInfo, family: str) -> str:
    return f"Hypernetwork '{info.name}': modules for sizes {', '.join(map(str, info.sizes))}{family}{_details(info)}"


def _checkpoint(info: ArtifactInfo, family: str) -> str:
    return f"Stable Diffusion checkpoint{family}: {info.tensor_count} tensors{_details(info)}"


def _aesthetic(info: ArtifactInfo, family: str) -> str:
    return f"Aesthetic embedding: one CLIP image vector of width {info.width}{family}{_details(info)}"


def _lora(info: ArtifactInfo, family: str) -> str:
    return f"LoRA{family}: {info.details}"


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of artefact."""

    folder: str  # the OutputFolders field, and the key hosts list and refresh by: "embeddings", ...
    name: str  # what `inspect_file` calls a file of this kind: "embedding", ...
    suffixes: tuple[str, ...]  # what the WebUI loads from the folder: one stem with two of these is one artefact
    describe: Callable[[ArtifactInfo, str], str]  # (info, " (family)" or "") -> the sentence's start
    shows_step: bool = False  # the sentence names the step the file was trained to

    @property
    def a_name(self) -> str:
        """The name with its article: "an embedding", "a lora"."""
        return f"{'an' if self.name[0] in 'aeiou' else 'a'} {self.name}"


ARTIFACT_KINDS = (
    ArtifactKind("embeddings", "embedding", (".pt", ".bin", ".safetensors", ".png", ".webp"), _embedding,
                 shows_step=True),
    ArtifactKind("hypernetworks", "hypernetwork", (".pt",), _hypernetwork, shows_step=True),
    ArtifactKind("checkpoints", "checkpoint", (".safetensors", ".ckpt"), _checkpoint),
    ArtifactKind("aesthetic_embeddings", "aesthetic embedding", (".pt", ".safetensors"), _aesthetic),
    ArtifactKind("loras", "lora", (".safetensors", ".pt", ".ckpt"), _lora),
)
KIND_OF_FOLDER = {kind.folder: kind for kind in ARTIFACT_KINDS}
KIND_NAMED = {kind.name: kind for kind in ARTIFACT_KINDS}
