"""REST routes under /finetune/v1/, the same for both hosts (plain dict bodies: FastAPI 0.94/pydantic 1 and current)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from finetune_core.errors import ConfigError, FinetuneError
from finetune_core.hosts.host import Host
from finetune_core.hosts.job_runner import JobBusy, JobRunner
from finetune_core.jobs import best_step, fit
from finetune_core.methods import METHODS
from finetune_core.ui.aesthetic_tab import AestheticJobs
from finetune_core.ui.aesthetic_tab import routes as aesthetic_routes
from finetune_core.ui.method_tab import method_sections
from finetune_core.ui.rest_body import object_field, refuse_unknown_fields, required_text
from finetune_core.ui.schema import field_specs

log = logging.getLogger(__name__)
PREFIX = "/finetune/v1"
_CREATE_KEYS = {"method", "name", "method_settings", "settings", "overwrite"}
_LINT_KEYS = {"method", "data_settings", "settings"}
MAX_BODY_BYTES = 1 << 20  # settings are small; a larger body is a mistake (or an attack), refused before parsing
MAX_DEPTH = 16  # a body is an object of objects of values: anything far deeper is a mistake (or an attack)


def mount_api(app: Any, host: Host, runner: JobRunner, dependencies: Sequence[Any] | None = None,
              service: Any = None, methods: Mapping[str, Any] | None = None) -> None:
    """Add the routes to a FastAPI `app`; `dependencies` (e.g. the WebUI's --api-auth check) guard every route.

    The error contract: 400 with one sentence in `detail` for anything the caller can fix (malformed JSON, a field
    of the wrong type, a bad setting, a missing file), 409 while a training job holds the model, 413 for a body
    over 1 MiB, and 500 only for a bug (logged with its traceback).
    """
    from fastapi import APIRouter, Request
    from starlette.concurrency import run_in_threadpool

    if service is None:
        from finetune_core.jobs import service
    routes = _Routes(host, runner, service, methods)
    router = APIRouter(prefix=PREFIX, dependencies=list(dependencies or []), tags=["finetune"])
    router.add_api_route("/methods", routes.methods, methods=["GET"])
    router.add_api_route("/status", routes.status, methods=["GET"])

    def post(path: str, handler: Callable[[dict], Any]) -> None:
        async def endpoint(request: Request) -> Any:
            raw = await _read_body(request)
            # Route bodies touch files and the model: keep them off the event loop.
            return await run_in_threadpool(_call, handler, raw)

        # FastAPI reads the annotation to inject the request; a string from postponed annotations would not resolve.
        endpoint.__annotations__["request"] = Request
        endpoint.__name__ = f"finetune_{path.strip('/')}"
        router.add_api_route(path, endpoint, methods=["POST"])

    post("/train", routes.train)
    post("/create", routes.create)
    post("/lint", routes.lint)
    post("/inspect", routes.inspect)
    post("/estimate", routes.estimate)
    post("/compare", routes.compare)
    post("/suggest", routes.suggest)
    post("/use", routes.use)
    post("/paused/generate", routes.generate_paused)
    for command in ("interrupt", "pause", "resume"):
        router.add_api_route(f"/{command}", getattr(routes, command), methods=["POST"])

    aesthetic = AestheticJobs(host, runner)
    for path, handler in aesthetic_routes(aesthetic).items():
        post(path, handler)
    router.add_api_route("/aesthetic/embeddings", lambda: {"embeddings": aesthetic.library.names()[1:]},
                         methods=["GET"])
    app.include_router(router)


async def _read_body(request: Any) -> bytes:
    """The raw body, refused with 413 past MAX_BODY_BYTES (declared or streamed)."""
    from fastapi import HTTPException

    declared = request.headers.get("content-length", "")
    too_large = HTTPException(status_code=413, detail=f"the request body is larger than {MAX_BODY_BYTES} bytes; "
                                                      f"send only the settings that differ from the defaults")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _call(handler: Callable[[dict], Any], raw: bytes) -> Any:
    """Parse and run a route body; FinetuneError -> 400 with its message, JobBusy -> 409, a bug -> 500 (logged)."""
    from fastapi import HTTPException

    try:
        return handler(_json_object(raw))
    except JobBusy as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    except FinetuneError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc
    except Exception as exc:
        log.exception("finetune API call failed")
        raise HTTPException(status_code=500, detail=f"Internal error ({type(exc).__name__}: {exc})") from exc


def _json_object(raw: bytes) -> dict:
    too_deep = ConfigError(f"the request body nests objects or lists more than {MAX_DEPTH} levels deep; settings are "
                           f"plain values one level inside the body, as the README shows")
    try:
        body = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except RecursionError:
        raise too_deep from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"the request body is not valid JSON ({str(exc).splitlines()[0]}); send a JSON object "
                          f"such as {{\"method\": \"textual-inversion\", \"name\": \"my-style\"}}") from exc
    if not isinstance(body, dict):
        raise ConfigError("the request body must be a JSON object (with the fields listed in the README)")
    if _depth(body) > MAX_DEPTH:
        raise too_deep
    return body


def _depth(value: Any) -> int:
    """How deeply objects and lists nest in a parsed JSON value (without recursion: the value may be very deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


class _Routes:
    """The route bodies, as plain functions of dict bodies."""

    def __init__(self, host: Host, runner: JobRunner, service: Any, methods: Mapping[str, Any] | None) -> None:
        self.host, self.runner, self.service, self._methods = host, runner, service, methods

    def _registry(self) -> Mapping[str, Any]:
        if self._methods is not None:
            return self._methods

        return METHODS

    def methods(self) -> dict[str, Any]:
        """Every method's form schema: fields with kind, default, label, help, choices and `advanced`."""
        out = {}
        for key, spec in self._registry().items():
            sections = method_sections(spec, self.service)
            out[key] = {"label": spec.label, "description": spec.description,
                        "output_kind": spec.output_kind,
                        "create": [f.as_dict() for f in field_specs(spec.create_type)] if spec.create_type else None,
                        "sections": {name: [f.as_dict() for f in specs] for name, specs in sections.items()}}
        return out

    def status(self) -> dict[str, Any]:
        return self.runner.state().as_dict()

    def train(self, body: dict) -> dict[str, Any]:
        request = self.service.request_from_json(body)
        job_id = self.runner.start(request)
        return {"job_id": job_id, "status": self.runner.state().as_dict()}

    def create(self, body: dict) -> dict[str, Any]:
        refuse_unknown_fields(body, _CREATE_KEYS, "create")
        # `method_settings` is the name train uses (and the README shows); `settings` is kept for old callers.
        settings = object_field(body, "method_settings" if "method_settings" in body else "settings")
        paths = self.runner.create(self.service, required_text(body, "method"), required_text(body, "name"), settings,
                                   body.get("overwrite", False))
        return {"paths": [str(p) for p in paths]}

    def lint(self, body: dict) -> dict[str, Any]:
        refuse_unknown_fields(body, _LINT_KEYS, "lint")
        settings = object_field(body, "data_settings") if "data_settings" in body else object_field(body, "settings")
        method = required_text(body, "method") if "method" in body else "textual-inversion"
        report = self.service.lint(settings, method, None)
        return {"summary": report.format(), "n_images": len(report.rows),
                "rows": [_row(r) for r in report.rows]}

    def estimate(self, body: dict) -> dict[str, Any]:
        """The measured peak memory of a run (`model`: an architecture name, by default the loaded model's) and
        the plan that fits `fit` (like "8GB"; by default the CUDA device's free memory)."""
        refuse_unknown_fields(body, {"method", "model", "method_settings", "data_settings", "train_settings", "fit"},
                              "estimate")
        settings = {section: object_field(body, f"{section}_settings") for section in ("method", "data", "train")
                    if f"{section}_settings" in body}
        method = required_text(body, "method")
        model = required_text(body, "model") if "model" in body else fit.architecture_of(self.host.get_model())
        return fit.report(fit.Request(method, model, settings), body.get("fit") or None)

    def inspect(self, body: dict) -> dict[str, Any]:
        refuse_unknown_fields(body, {"path"}, "inspect")
        info = self.service.inspect(required_text(body, "path"))
        fields: dict[str, Any] = {}
        if dataclasses.is_dataclass(info) and not isinstance(info, type):
            fields = dataclasses.asdict(info)
        return {**{k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items()},
                "description": info.describe()}

    def compare(self, body: dict) -> dict[str, Any]:
        """The comparison grid of a run's saved copies (issue 23); 409 while a job holds the model."""
        refuse_unknown_fields(body, {"run_dir", "prompts", "seeds"}, "compare")
        prompts, seeds = _text_list(body, "prompts"), _seed_list(body)
        grid = self.runner.compare(required_text(body, "run_dir"), prompts, seeds)
        return {"path": str(grid.path), "steps": grid.steps, "prompts": grid.prompts, "seeds": grid.seeds,
                "suggested_step": grid.suggested}

    def suggest(self, body: dict) -> dict[str, Any]:
        """The run's saved steps, its validation losses and the suggested step (how it is smoothed)."""
        refuse_unknown_fields(body, {"run_dir"}, "suggest")
        info = best_step.run_info(required_text(body, "run_dir"))
        copies = best_step.require_copies(info)
        suggestion = best_step.suggest_step(info, copies)
        return {"steps": [c.step for c in copies], "validation_losses": [list(p) for p in
                                                                         best_step.validation_series(info)],
                "suggested_step": suggestion.step if suggestion else None, "smoothing": best_step.SMOOTHING}

    def use(self, body: dict) -> dict[str, Any]:
        """Make a saved copy the artefact (the previous file kept as <file>.N.bak)."""
        refuse_unknown_fields(body, {"run_dir", "step"}, "use")
        step = body.get("step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
            raise ConfigError(f"step must be a whole number (a saved step of the run), not {step!r}")
        chosen, written, backups = self.runner.use_copy(required_text(body, "run_dir"), step)
        return {"step": chosen, "paths": [str(p) for p in written], "backups": [str(p) for p in backups]}

    def generate_paused(self, body: dict) -> dict[str, Any]:
        """A picture with the paused job's current state (its word, adapters or hypernetwork); 409 unless paused."""
        refuse_unknown_fields(body, {"prompt", "negative_prompt", "seed"}, "paused/generate")
        seed = body.get("seed", -1)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < -1:
            raise ConfigError(f"seed must be a whole number, -1 for the run's preview seed, not {seed!r}")
        negative = body.get("negative_prompt", "")
        if not isinstance(negative, str):
            raise ConfigError(f"negative_prompt must be a text, not {negative!r}")
        path = self.runner.generate_paused(required_text(body, "prompt"), negative, seed)
        return {"path": str(path)}

    def interrupt(self) -> dict[str, bool]:
        return {"interrupted": self.runner.interrupt()}

    def pause(self) -> dict[str, bool]:
        return {"paused": self.runner.pause()}

    def resume(self) -> dict[str, bool]:
        return {"resumed": self.runner.resume()}


def _text_list(body: dict, key: str) -> list[str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a list of texts, not {value!r}")
    return value


def _seed_list(body: dict) -> list[int] | None:
    value = body.get("seeds")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"seeds must be a list of whole numbers, not {value!r}")
    return value


def _row(row: Any) -> dict[str, Any]:
    get = (lambda k: row.get(k)) if isinstance(row, dict) else (lambda k: getattr(row, k, None))
    size, bucket = get("size"), get("bucket")
    return {"path": str(get("path")), "size": list(size) if size else None, "caption": get("caption"),
            "bucket": list(bucket) if bucket else None, "tokens": get("tokens"),
            "problems": list(get("problems") or [])}
