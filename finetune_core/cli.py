"""`python -m finetune_core`: train / create / lint / inspect / bench / aesthetic / estimate / ui.

Flags are generated from the settings dataclasses (the same fields the tab shows), so the CLI, the tab and the REST
API accept the same settings under the same names (`learning_rate` -> `--learning-rate`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from finetune_core.errors import ConfigError, FinetuneError
from finetune_core.settings import (
    MODEL_HELP,
    DefaultsHelpFormatter,
    add_settings_flags,
    add_threads_flag,
    require_model,
)

SECTIONS = ("method", "data", "train")


def _setting_types() -> dict[str, type]:
    from finetune_core.data.dataset_config import DatasetConfig
    from finetune_core.train.train_config import TrainConfig
    return {"data": DatasetConfig, "train": TrainConfig}


def _settings_from_args(args: argparse.Namespace, types: dict[str, type]) -> dict[str, dict[str, Any]]:
    """Flag values per section, typed by the one coercer in its text mode (the command line is typed text)."""
    from finetune_core.settings import coerce_settings

    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for dest, value in vars(args).items():
        if ":" in dest and value is not None:
            section, name = dest.split(":", 1)
            out[section][name] = value
    return {section: coerce_settings(types[section], values, section, from_text=True) if section in types else values
            for section, values in out.items()}


def build_parser() -> argparse.ArgumentParser:
    from finetune_core.methods import METHODS
    parser = argparse.ArgumentParser(prog="python -m finetune_core", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics (paths, cache hits, devices)")
    commands = parser.add_subparsers(dest="command", required=True)
    from finetune_core.jobs.request import form_defaults
    for verb in ("train", "create"):
        verb_parser = commands.add_parser(verb, help=f"{verb} an artefact with a method" if verb == "train" else
                                          "create a new, untrained embedding or hypernetwork file to train later")
        methods = verb_parser.add_subparsers(dest="method", required=True)
        for spec in METHODS.values():
            if verb == "create" and spec.create_type is None:
                continue  # nothing to create before training (DreamBooth, LoRA): train it directly
            sub = methods.add_parser(spec.key, help=spec.description, description=spec.description)
            _common_flags(sub, training=verb == "train", name_help=spec.name_help)
            taken: set[str] = set()
            defaults = form_defaults(spec.key)
            if verb == "create":
                add_settings_flags(sub, "method", spec.create_type or spec.config_type, taken)
                continue
            add_settings_flags(sub, "method", spec.config_type, taken, defaults["method"])
            for section, config_type in _setting_types().items():
                add_settings_flags(sub, section, config_type, taken, defaults[section])
    lint = commands.add_parser("lint", help="check a dataset folder before training")
    lint.add_argument("--model", default=None, help="count tokens with this model's tokenizer (optional)")
    lint.add_argument("--method", default="textual-inversion", choices=list(METHODS))
    add_settings_flags(lint, "data", _setting_types()["data"], set())
    inspect = commands.add_parser("inspect", help="say what an artefact file is and which model it fits")
    inspect.add_argument("file")
    bench = commands.add_parser("bench", help="print speed, memory and compute-floor figures",
                                formatter_class=DefaultsHelpFormatter)
    from finetune_core.bench import add_arguments
    add_arguments(bench)
    add_threads_flag(bench)
    from finetune_core.aesthetic.aesthetic_cli import add_parser as add_aesthetic
    add_aesthetic(commands)
    from finetune_core.jobs.estimate_cli import add_parser as add_estimate
    add_estimate(commands, add_settings_flags, _setting_types())
    _add_pick_parsers(commands)
    ui = commands.add_parser("ui", help="serve the Fine-tune tab as its own app on localhost")
    ui.add_argument("rest", nargs=argparse.REMAINDER, help="options of the app (see `ui --help`)")
    return parser


def _common_flags(parser: argparse.ArgumentParser, training: bool, name_help: str) -> None:
    parser.add_argument("--model", default=None, help=f"required: {MODEL_HELP}")
    parser.add_argument("--name", default=None, help=name_help + (
        " (required, but not with --resume: the run's own name)" if training else " (required)"))
    parser.add_argument("--output-dir", default=None, help="laid out like the WebUI: embeddings/, models/... "
                        "(default: outputs" + ("; with --resume: the run's own" if training else "") + ")")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file of the same name")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    if training:
        parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                            help="continue an interrupted run exactly, with its own name, settings and output folder; "
                                 "max steps, saving, loss CSV and preview flags may change it, others are refused")
        parser.add_argument("--num-processes", type=int, default=None, metavar="N",
                            help="train data-parallel on N processes (one per GPU; on a CPU, cores are shared) "
                                 "through accelerate launch; the global batch is --batch-size")
    add_threads_flag(parser)


def main(argv: Sequence[str] | None = None) -> int:
    from finetune_core.cpu import prepare_process
    prepare_process()  # before anything imports torch: OpenMP reads its wait policy once, at load
    quiet_libraries()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ui"]:
        from finetune_core.ui.app import main as ui_main
        return int(ui_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return _dispatch(args, argv)
    except FinetuneError as exc:
        from finetune_core.train.distributed import launched_rank
        if launched_rank() == 0:  # every process of a data-parallel run fails alike; one says so
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
        return 130


def quiet_libraries() -> None:
    """The user sees our lines, not the libraries' notices about their own versions (diffusers imports peft when
    it is installed, and peft warns about the transformers release on every command)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"Support for Transformers < .* is deprecated in PEFT",
                            category=FutureWarning)


def _dispatch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from finetune_core.cpu import set_threads
    from finetune_core.jobs import service
    if args.command == "inspect":
        print(service.inspect(args.file).describe())
        return 0
    if args.command == "bench":
        from finetune_core.bench import BenchOptions, run_bench
        run_bench(BenchOptions.from_args(args))
        return 0
    if args.command == "aesthetic":
        from finetune_core.aesthetic.aesthetic_cli import run as run_aesthetic
        return run_aesthetic(args)
    if args.command in ("use", "compare"):
        return _pick(args)
    if args.command != "train":
        set_threads(getattr(args, "threads", None))
    settings = _settings_from_args(args, _section_types(args))
    if args.command == "estimate":
        from finetune_core.jobs.estimate_cli import run as run_estimate
        return run_estimate(args, settings)
    if args.command == "lint":
        model = service.load(args.model) if args.model else None
        print(service.lint(settings["data"], args.method, model).format())
        return 0
    resume = getattr(args, "resume", None)
    if not args.name and not resume:
        raise ConfigError("no name given: pass --name with the file name the new artefact should have")
    require_model(args.model)
    folders = _output_folders(args.output_dir, resume, args.method)
    if args.command == "create":
        service.validate_create(args.method, args.name, settings["method"], folders, args.overwrite)
        model = service.load(args.model, args.device)
        for path in service.create(args.method, args.name, settings["method"], model, folders, args.overwrite):
            print(f"wrote {path}")
        return 0
    request = service.TrainRequest(args.method, args.name or "", settings["method"], settings["data"],
                                   settings["train"], overwrite=args.overwrite, resume_run=resume)
    plan = service.plan(request, folders, family=service.model_family(args.model))  # all but the model's weights
    return _train_processes(args, argv, plan, folders)


def _train_processes(args: argparse.Namespace, argv: Sequence[str], plan: Any, folders: Any) -> int:
    """Train in this process, or start N data-parallel ones (`--num-processes`), or be one of them."""
    from finetune_core.cpu import set_threads
    from finetune_core.jobs import service
    from finetune_core.train.distributed import join_processes, launched_world
    if args.num_processes is not None and args.num_processes < 1:
        raise ConfigError(f"--num-processes must be at least 1, not {args.num_processes}")
    if (args.num_processes or 1) > 1 and launched_world() == 1:
        from finetune_core.jobs.launcher import launch
        return launch(argv, args.num_processes, args.device, folders.logs)
    processes = join_processes(args.device)  # a launcher started several: join them (one thread share each)
    set_threads(args.threads)
    device = args.device or (str(processes.device) if processes.world > 1 else None)
    if processes.is_main:  # a full-size checkpoint takes a while to load: say what the wait is
        print(f"loading the model {args.model} ...", file=sys.stderr)
    return _train(plan, service.load(args.model, device), processes)


def _output_folders(output_dir: str | None, resume: str | None, method: str) -> Any:
    """`--output-dir` (default ./outputs); a resumed run writes where it was writing, and a different folder given
    with --resume is refused rather than ignored."""
    from pathlib import Path

    from finetune_core.jobs import service
    from finetune_core.jobs.request import run_output_dir
    folders = service.OutputFolders.standalone(output_dir or "outputs")
    own = run_output_dir(Path(resume)) if resume else None
    if own is None or output_dir is None:
        return folders
    asked = folders.for_kind(service.method_spec(method).output_kind)
    if asked.resolve() != own.resolve():
        raise ConfigError(f"the run {resume} writes its file to {own}, not {asked}; resume without --output-dir, "
                          f"or start a new run to write elsewhere")
    return folders


def _section_types(args: argparse.Namespace) -> dict[str, type]:
    from finetune_core.methods import METHODS
    types = dict(_setting_types())
    if getattr(args, "method", None) in METHODS and args.command in ("train", "create", "estimate"):
        spec = METHODS[args.method]
        types["method"] = spec.config_type if args.command == "train" else (spec.create_type or spec.config_type)
    return types


def _train(plan: Any, model: Any, processes: Any) -> int:
    """Run the job with a progress bar; Ctrl-C or SIGTERM asks the loop to save and stop (a second one stops at
    once). In a data-parallel run only the main process shows progress and the result."""
    from finetune_core.hosts.console import ConsoleProgress
    from finetune_core.jobs import service
    from finetune_core.train.control import Control
    control = Control()
    received: list[int] = []
    with ConsoleProgress() as progress, _interrupt_on_signals(control, received, processes.world > 1):
        result = service.train_plan(plan, model, on_event=progress, control=control, processes=processes)
    code = 128 + (received[0] if received else signal.SIGINT)  # the shell's code for a process a signal ended
    if not processes.is_main:
        return code if result.interrupted else 0
    if result.interrupted:
        print(f"{result.message}\nStopped by {_signal_words(received)}; resume with --resume {result.run_dir}",
              file=sys.stderr)
        return code
    print(result.message)
    return 0


def _signal_words(received: list[int]) -> str:
    if not received or received[0] == signal.SIGINT:
        return "Ctrl-C"
    return f"{signal.Signals(received[0]).name} (a request to stop, e.g. from a service manager or a closed terminal)"


@contextlib.contextmanager
def _interrupt_on_signals(control: Any, received: list[int], launched: bool = False) -> Iterator[None]:
    """SIGINT and SIGTERM become the Interrupt button: the loop saves the artefact and the resume state, then stops.
    `received` gets the signals' numbers.

    SIGTERM is what a service manager, `docker stop` or a closing terminal sends (SIGKILL follows some seconds
    later), so it saves like Ctrl-C. A process of a data-parallel run gets the terminal's Ctrl-C and then the
    launcher's own signal: both only ask it to save and stop, and only the main process says so.
    """
    from finetune_core.train.distributed import launched_rank

    def handler(signum: int, frame: Any) -> None:
        if control.interrupted and not launched:  # asked twice: the user wants out now
            raise KeyboardInterrupt
        received.append(signum)
        if not control.interrupted and launched_rank() == 0:
            again = "" if launched else " (press Ctrl-C again to stop at once)"
            print(f"\n{_signal_words([signum])}: saving and stopping after this step{again}", file=sys.stderr)
        control.interrupt()

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _add_pick_parsers(commands: Any) -> None:
    """`use` and `compare`: picking a step of a run (issue 23)."""
    use = commands.add_parser("use", help="make a saved copy of a run the artefact (the old file kept as .N.bak)")
    use.add_argument("run", metavar="RUN_FOLDER")
    use.add_argument("--step", type=int, default=None, help="the copy's step (default: the suggested step, the "
                     "lowest smoothed validation loss)")
    compare = commands.add_parser("compare", help="a grid of a run's saved copies x prompts x seeds (prints the PNG)")
    compare.add_argument("run", metavar="RUN_FOLDER")
    compare.add_argument("--prompts", nargs="+", default=None, help="default: the run's preview prompt and two "
                         "from its captions")
    compare.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the run's preview seed")
    compare.add_argument("--model", default=None, help="the model the run trained on (default: its name, when it "
                         "is a built-in tiny model)")
    compare.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    compare.add_argument("--out", default=None, help="the PNG to write (default: images/compare-N.png in the run)")
    add_threads_flag(compare)


def _pick(args: argparse.Namespace) -> int:
    from finetune_core.jobs import best_step
    if args.command == "use":
        step, written, backups = best_step.use_copy(args.run, args.step)
        for path in backups:
            print(f"kept the previous file as {path}")
        print(f"step {step}: wrote {', '.join(str(p) for p in written)}")
        return 0
    from finetune_core.cpu import set_threads
    from finetune_core.jobs import compare, service
    set_threads(args.threads)
    info, _copies = compare.check_compare(args.run, args.prompts, args.seeds)  # before the model loads
    model_name = args.model or str(info.settings.get("model", {}).get("name", ""))
    if not args.model and not model_name.startswith("tiny-"):
        raise ConfigError(f"pass --model with the model the run trained on ({model_name or 'see settings.json'})")
    grid = compare.compare(args.run, service.load(model_name, args.device), args.prompts, args.seeds, args.out)
    if grid.suggested is not None:
        print(f"suggested step: {grid.suggested} ({best_step.SMOOTHING}), marked * in the grid", file=sys.stderr)
    print(grid.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
