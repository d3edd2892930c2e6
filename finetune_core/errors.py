"""Every exception the core raises on purpose.

Hosts show `FinetuneError` messages as they are; anything else is a bug.
"""

from __future__ import annotations


class FinetuneError(Exception):
    """A problem the user can fix; the message says what was asked, what is wrong and what to do."""


class ConfigError(FinetuneError):
    """A setting is invalid (bad number, unknown name, impossible combination)."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems) if len(self.problems) == 1 else
                         "the settings have problems:\n- " + "\n- ".join(self.problems))


class DatasetError(FinetuneError):
    """The dataset folder cannot be used (missing, empty, no readable images)."""


class ModelMismatchError(FinetuneError):
    """A file or setting belongs to another model family or width than the loaded model."""


class ArtifactError(FinetuneError):
    """An artefact cannot be read or written (unknown layout, unsafe pickle, truncated, would overwrite)."""


class TrainingDiverged(FinetuneError):
    """The loss or the gradients stayed non-finite even after rolling back and lowering the learning rate."""


class JobBusy(FinetuneError):
    """A second training job was asked for while one runs."""


class StorageError(FinetuneError):
    """A folder or file cannot be written: full disk, read-only folder, a file where a folder should be, bad name."""


class NetworkError(FinetuneError):
    """Something the job called (the host's sampler, a model loader) tried to download and the network failed."""


class OutOfMemory(FinetuneError):
    """The run needs more memory than the device has (estimated before step 1, or met while training)."""
