"""Shared checks for format tests: the stock WebUI v1.10.1 load gate, reproduced from webui-integration §6e."""

from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Entries `check_pt` accepts inside a zip-format `.pt`.
ZIP_ENTRY = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    *(("torch", f"{kind}Storage") for kind in ("Float", "Half", "Int", "Long", "Double", "Byte", "BFloat16")),
    ("torch", "float32"), ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("_codecs", "encode"), ("__builtin__", "set"),
}
# A legacy (non-zip) torch file is five pickles: magic number, protocol, sys info, the object, storage keys.
LEGACY_PICKLES = 5


class _Inert:
    """Stands in for every allowed global except OrderedDict, so the gate never runs library code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class GateUnpickler(pickle.Unpickler):
    """Refuses any global outside the WebUI's allow-list; records the globals it saw."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.seen: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        self.seen.add((module, name))
        return collections.OrderedDict if (module, name) == ("collections", "OrderedDict") else _Inert

    def persistent_load(self, pid: Any) -> Any:
        return _Inert(pid)


def webui_gate(path: Path) -> set[tuple[str, str]]:
    """Raise unless a stock WebUI v1.10.1 would accept `path`; return the globals the pickle uses."""
    data = Path(path).read_bytes()
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = [n for n in archive.namelist() if not ZIP_ENTRY.match(n)]
            if bad:
                raise pickle.UnpicklingError(f"bad file inside {path}: {bad}")
            pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            unpickler = GateUnpickler(io.BytesIO(archive.read(pkl)))
            unpickler.load()
            return unpickler.seen
    unpickler = GateUnpickler(io.BytesIO(data))
    for _ in range(LEGACY_PICKLES):
        unpickler.load()
    return unpickler.seen


@pytest.fixture
def gate() -> Callable[[Path], set[tuple[str, str]]]:
    """The WebUI load gate as a fixture."""
    return webui_gate
