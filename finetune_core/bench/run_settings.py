"""What one benchmark run is told to change: method/data/train settings, threads, device, environment variables.

Written as `name=value` pairs separated by commas (`"batch_size=2,precision=bf16,threads=1,MALLOC_ARENA_MAX=2"`),
the same text for `--set` (every run) and each side of `--compare A B`. A bare name is looked up among the method's,
the dataset's and the training settings (prefix `method.`, `data.` or `train.` where a name is in two of them);
`threads`, `device`, `processes` (N data-parallel processes through `accelerate launch`, sharing the global batch),
`channels_last` and `unet_grads` (true: emulate the WebUI's loaded model before a job froze
its UNet, whose weight gradients were then computed and kept) are the run's own; a name in capitals is an
environment variable of the run's process (the allocator and OpenMP read theirs only at start, so each run is
its own process).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from finetune_core.errors import ConfigError

SECTIONS = ("method", "data", "train")
RUN_KEYS = ("threads", "device", "processes", "channels_last", "unet_grads")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
# The bench decides these itself: the images, the number of steps, and no side duties inside the timed steps.
_RESERVED = {"data_dir": "the bench trains on examples/dataset", "steps": "use --steps",
             "placeholder": "the bench names its artefact itself"}


@dataclass(frozen=True)
class RunSettings:
    """The parsed overrides of one side of a comparison (or of every run)."""

    text: str = ""
    sections: dict[str, dict[str, str]] = field(default_factory=lambda: {s: {} for s in SECTIONS})
    run: dict[str, str] = field(default_factory=dict)  # threads / device / processes / channels_last / unet_grads
    env: dict[str, str] = field(default_factory=dict)

    def merged(self, other: RunSettings) -> RunSettings:
        """These settings with `other`'s on top (the `--set` base under one side of a comparison)."""
        sections = {s: {**self.sections[s], **other.sections[s]} for s in SECTIONS}
        text = ",".join(t for t in (self.text, other.text) if t)
        return RunSettings(text, sections, {**self.run, **other.run}, {**self.env, **other.env})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_settings(text: str, method_key: str) -> RunSettings:
    """Parse `name=value,...` for `method_key`; ConfigError listing every unknown or misplaced name."""
    settings = RunSettings(text.strip())
    problems: list[str] = []
    owners = _owners(method_key)
    for pair in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            problems.append(f"{pair!r} is not name=value")
        elif _ENV_NAME.match(name):
            settings.env[name] = value
        elif name in RUN_KEYS:
            settings.run[name] = value
        else:
            problem = _place(settings, name, value, owners)
            if problem:
                problems.append(problem)
    if problems:
        raise ConfigError(problems)
    return settings


def _owners(method_key: str) -> dict[str, list[str]]:
    """Setting name -> the sections that have it, for the method `method_key`."""
    from finetune_core.data.dataset_config import DatasetConfig
    from finetune_core.jobs import service
    from finetune_core.train.train_config import TrainConfig
    types = {"method": service.method_spec(method_key).config_type, "data": DatasetConfig, "train": TrainConfig}
    owners: dict[str, list[str]] = {}
    for section, config_type in types.items():
        for f in dataclasses.fields(config_type):
            if f.name != "version":
                owners.setdefault(f.name, []).append(section)
    return owners


def _place(settings: RunSettings, name: str, value: str, owners: dict[str, list[str]]) -> str | None:
    """Put one setting in its section; a sentence when it cannot be placed."""
    section, dot, bare = name.partition(".")
    if not dot:
        section, bare = "", name
    if bare in _RESERVED:
        return f"{bare} cannot be set here: {_RESERVED[bare]}"
    found = owners.get(bare, [])
    if section and section not in found:
        where = f"; it is a {' and '.join(found)} setting" if found else ""
        return f"there is no {section} setting {bare!r}{where}"
    if not section and len(found) > 1:
        return f"{bare!r} is a setting of {' and '.join(found)}; write {found[0]}.{bare} or {found[1]}.{bare}"
    if not found:
        return (f"unknown setting {bare!r}: give a method, data or train setting, one of {', '.join(RUN_KEYS)}, "
                f"or an environment variable in capitals")
    settings.sections[section or found[0]][bare] = value
    return None
