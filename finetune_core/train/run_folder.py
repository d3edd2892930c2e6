"""The per-run folder: resume state, intermediate artefacts, preview images, the loss CSV and the settings.

Layout (the WebUI's log folder, `<log>/<date>/<name>/`, has the same roles):
    state/checkpoint.pt   trainable state, optimizer, counters (exact resume)
    state/config.json     the TrainConfig the run used
    artifacts/            intermediate artefacts `<name>-<step>.*`
    images/               previews `<name>-<step>.png`
    loss.csv              step, epoch, epoch_step, loss, learn_rate (the WebUI's `textual_inversion_loss.csv`),
                          and validation_loss when the run evaluates one (blank at steps without an evaluation)
    settings.json         everything the run was started with
Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_core.errors import ArtifactError
from finetune_core.formats.atomic import atomic_write, load_pt, save_pt

CSV_COLUMNS = ("step", "epoch", "epoch_step", "loss", "learn_rate", "validation_loss")


@dataclass(frozen=True)
class LossRow:
    """One row of the loss CSV."""

    step: int
    epoch: int
    epoch_step: int
    loss: float  # the mean training loss of the steps since the previous row
    learn_rate: float
    validation_loss: float | None = None  # evaluated at this step (`validation_every` and every save), else None


class RunFolder:
    """Files of one training run, rooted at `path` (created on first write)."""

    def __init__(self, path: str | Path, csv_name: str = "loss.csv") -> None:
        self.path = Path(path)
        self.csv_path = self.path / csv_name

    @property
    def state_dir(self) -> Path:
        return self.path / "state"

    @property
    def artifacts_dir(self) -> Path:
        return self.path / "artifacts"

    @property
    def images_dir(self) -> Path:
        return self.path / "images"

    @property
    def settings_path(self) -> Path:
        return self.path / "settings.json"

    def record_check(self, line: str) -> None:
        """Append a line to `checks.txt`: what the host's loader applied of each file saved."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / "checks.txt", "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def has_state(self) -> bool:
        """True when the folder holds a resume checkpoint."""
        return (self.state_dir / "checkpoint.pt").is_file()

    def state_bytes(self) -> int:
        """The size of the resume checkpoint on disk (0 when there is none)."""
        path = self.state_dir / "checkpoint.pt"
        return path.stat().st_size if path.is_file() else 0

    def save_state(self, state: dict[str, Any], config: dict[str, Any]) -> Path:
        """Write the resume checkpoint and the config it belongs to."""
        _write_json(self.state_dir / "config.json", config)
        return save_pt(state, self.state_dir / "checkpoint.pt", overwrite=True)

    def load_config(self) -> dict[str, Any]:
        """The saved config of the resume state; ArtifactError when there is none."""
        if not self.has_state():
            raise ArtifactError(f"{self.path} has no resume state (state/checkpoint.pt); start a new run instead")
        config_path = self.state_dir / "config.json"
        try:
            return json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{config_path} cannot be read ({exc}); start a new run instead") from exc

    def load_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Read the resume checkpoint and its config; ArtifactError when there is none."""
        config = self.load_config()
        return load_pt(self.state_dir / "checkpoint.pt"), config

    def write_settings(self, settings: dict[str, Any]) -> Path:
        """Write settings.json (what the run was started with)."""
        return _write_json(self.settings_path, settings)

    def loss_rows(self) -> list[LossRow]:
        """The rows of the loss CSV, oldest first."""
        if not self.csv_path.is_file():
            return []
        with self.csv_path.open(newline="", encoding="utf-8") as handle:
            return [LossRow(int(r["step"]), int(r["epoch"]), int(r["epoch_step"]), float(r["loss"]),
                            float(r["learn_rate"]), _optional_float(r.get("validation_loss")))
                    for r in csv.DictReader(handle)]

    def append_loss_row(self, row: LossRow) -> None:
        """Add a row (the file is small: rewritten atomically)."""
        self._write_rows([*self.loss_rows(), row])

    def truncate_loss_rows(self, after_step: int) -> None:
        """Drop rows past `after_step` (a crashed run logged steps its last state does not have)."""
        rows = self.loss_rows()
        kept = [r for r in rows if r.step <= after_step]
        if len(kept) != len(rows):
            self._write_rows(kept)

    def save_image(self, image: Any, stem: str, parameters: str = "") -> Path:
        """Save a PIL preview image as `images/<stem>.png`, with its generation `parameters` as the WebUI's PNGs
        carry them."""
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        if parameters:
            info.add_text("parameters", parameters)
        return atomic_write(self.images_dir / f"{stem}.png", lambda tmp: image.save(tmp, format="PNG", pnginfo=info),
                            overwrite=True)

    def _write_rows(self, rows: list[LossRow]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        validated = any(r.validation_loss is not None for r in rows)  # else the WebUI's five columns exactly
        writer.writerow(CSV_COLUMNS if validated else CSV_COLUMNS[:5])
        for r in rows:
            cells = [r.step, r.epoch, r.epoch_step, f"{r.loss:.7f}", f"{r.learn_rate:.10g}"]
            if validated:
                cells.append("" if r.validation_loss is None else f"{r.validation_loss:.9g}")
            writer.writerow(cells)
        text = buffer.getvalue()
        atomic_write(self.csv_path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)


def _optional_float(text: str | None) -> float | None:
    """A blank cell (no evaluation at that step, or a CSV written before the column existed) is None."""
    return float(text) if text else None


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    text = json.dumps(data, indent=2, default=str)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)
