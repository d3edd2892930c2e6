"""REST routes under /finetune/v1/, the same for both hosts (plain dict bodies: FastAPI 0.94/pydantic 1 and current)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from finetune_core.errors import ConfigError, FinetuneError
from finetune_core.service import TrainRequest
from finetune_core.ui.host import Host
from finetune_core.ui.job_runner import JobBusy, JobRunner
from finetune_core.ui.schema import field_specs

log = logging.getLogger(__name__)
PREFIX = "/finetune/v1"
_REQUEST_KEYS = {f.name for f in dataclasses.fields(TrainRequest)}
_CREATE_KEYS = {"method", "name", "method_settings", "settings", "overwrite"}


def mount_api(app: Any, host: Host, runner: JobRunner, dependencies: Sequence[Any] | None = None,
              service: Any = None, methods: Mapping[str, Any] | None = None) -> None:
    """Add the routes to a FastAPI `app`; `dependencies` (e.g. the WebUI's --api-auth check) guard every route."""
    from fastapi import APIRouter, Body

    if service is None:
        from finetune_core import service
    routes = _Routes(host, runner, service, methods)
    router = APIRouter(prefix=PREFIX, dependencies=list(dependencies or []), tags=["finetune"])
    router.add_api_route("/methods", routes.methods, methods=["GET"])
    router.add_api_route("/status", routes.status, methods=["GET"])

    def post(path: str, handler: Callable[[dict], Any]) -> None:
        def endpoint(body: dict = Body(...)) -> Any:  # noqa: B008 - FastAPI's way of declaring a JSON body
            return _call(handler, body)

        endpoint.__name__ = f"finetune_{path.strip('/')}"
        router.add_api_route(path, endpoint, methods=["POST"])

    post("/train", routes.train)
    post("/create", routes.create)
    post("/lint", routes.lint)
    post("/inspect", routes.inspect)
    for command in ("interrupt", "pause", "resume"):
        router.add_api_route(f"/{command}", getattr(routes, command), methods=["POST"])
    app.include_router(router)


def _call(handler: Callable[[dict], Any], body: Any) -> Any:
    """Run a route body; FinetuneError -> 400 with its message, JobBusy -> 409, a bug -> 500 (logged)."""
    from fastapi import HTTPException

    try:
        if not isinstance(body, dict):
            raise ConfigError("the request body must be a JSON object")
        return handler(body)
    except JobBusy as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    except FinetuneError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc
    except Exception as exc:
        log.exception("finetune API call failed")
        raise HTTPException(status_code=500, detail=f"Internal error ({type(exc).__name__}: {exc})") from exc


class _Routes:
    """The route bodies, as plain functions of dict bodies."""

    def __init__(self, host: Host, runner: JobRunner, service: Any, methods: Mapping[str, Any] | None) -> None:
        self.host, self.runner, self.service, self._methods = host, runner, service, methods

    def _registry(self) -> Mapping[str, Any]:
        if self._methods is not None:
            return self._methods
        from finetune_core.methods import METHODS

        return METHODS

    def methods(self) -> dict[str, Any]:
        """Every method's form schema: fields with kind, default, label, help, choices and `advanced`."""
        from finetune_core.ui.method_tab import method_sections

        out = {}
        for key, spec in self._registry().items():
            sections = method_sections(spec, self.service)
            out[key] = {"label": spec.label, "description": getattr(spec, "description", ""),
                        "output_kind": spec.output_kind,
                        "create": [f.as_dict() for f in field_specs(spec.create_type)] if spec.create_type else None,
                        "sections": {name: [f.as_dict() for f in specs] for name, specs in sections.items()}}
        return out

    def status(self) -> dict[str, Any]:
        return self.runner.state().as_dict()

    def train(self, body: dict) -> dict[str, Any]:
        unknown = sorted(set(body) - _REQUEST_KEYS)
        if unknown:
            raise ConfigError(f"unknown field(s) in the train request: {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(_REQUEST_KEYS))}")
        if not isinstance(body.get("method"), str) or not isinstance(body.get("name", ""), str):
            raise ConfigError("the train request needs 'method' (e.g. \"textual-inversion\") and 'name' as strings")
        if body["method"] not in self._registry():
            raise ConfigError(f"unknown method {body['method']!r}; choose one of {', '.join(self._registry())}")
        request = TrainRequest(**{"name": "", **body})
        job_id = self.runner.start(request)
        return {"job_id": job_id, "status": self.runner.state().as_dict()}

    def create(self, body: dict) -> dict[str, Any]:
        unknown = sorted(set(body) - _CREATE_KEYS)
        if unknown:
            raise ConfigError(f"unknown field(s) in the create request: {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(_CREATE_KEYS))}")
        method, name = _required(body, "method"), _required(body, "name")
        spec = self._registry().get(method)
        # `method_settings` is the name train uses (and the README shows); `settings` is kept for old callers.
        settings = dict(body.get("method_settings") or body.get("settings") or {})
        paths = self.service.create(method, name, settings, self.host.get_model(),
                                    self.host.folders(), overwrite=bool(body.get("overwrite", False)))
        if spec is not None:
            self.host.artifacts_written(spec.output_kind, list(paths))
        return {"paths": [str(p) for p in paths]}

    def lint(self, body: dict) -> dict[str, Any]:
        settings = dict(body.get("data_settings") or body.get("settings") or {})
        report = self.service.lint(settings, body.get("method", "textual-inversion"), None)
        return {"summary": report.format(), "n_images": len(report.rows),
                "rows": [_row(r) for r in report.rows]}

    def inspect(self, body: dict) -> dict[str, Any]:
        info = self.service.inspect(_required(body, "path"))
        fields: dict[str, Any] = {}
        if dataclasses.is_dataclass(info) and not isinstance(info, type):
            fields = dataclasses.asdict(info)
        return {**{k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items()},
                "description": info.describe()}

    def interrupt(self) -> dict[str, bool]:
        return {"interrupted": self.runner.interrupt()}

    def pause(self) -> dict[str, bool]:
        return {"paused": self.runner.pause()}

    def resume(self) -> dict[str, bool]:
        return {"resumed": self.runner.resume()}


def _required(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"the request needs '{key}' as a non-empty string")
    return value.strip()


def _row(row: Any) -> dict[str, Any]:
    get = (lambda k: row.get(k)) if isinstance(row, dict) else (lambda k: getattr(row, k, None))
    size, bucket = get("size"), get("bucket")
    return {"path": str(get("path")), "size": list(size) if size else None, "caption": get("caption"),
            "bucket": list(bucket) if bucket else None, "tokens": get("tokens"),
            "problems": list(get("problems") or [])}
