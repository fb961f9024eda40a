"""The ``fastslow`` command. Bad input exits with status 2 and one line naming the problem."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

# Nothing is fetched from a model hub unless the user asks for it (HF_HUB_OFFLINE=0).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
if os.environ.get("FASTSLOW_STARTER_PID", "").isdigit():  # a rank of `fastslow launch` (CPU): ends with torchrun
    from fastslow.util import die_with_parent

    die_with_parent(parent=int(os.environ.pop("FASTSLOW_STARTER_PID")))  # (popped: not for the rank's own children)

from fastslow import threads as _threads  # noqa: E402 - must run before torch loads (it does not import torch)

# Passive OpenMP waiting and one thread per usable CPU, unless the user chose: on a busy machine spinning
# threads cost several-fold (see fastslow.threads). What was set here is ours to change for child processes.
THREAD_DEFAULTS = _threads.hygiene()

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.text import Text  # noqa: E402

# An unexpected crash still prints a traceback, but never frame locals: an API client's frames hold keys.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Fast-slow continual post-training of LLMs.")
world_app = typer.Typer(no_args_is_help=True, help="The embedded micro world.")
app.add_typer(world_app, name="world")
probe_app = typer.Typer(no_args_is_help=True, help="Probes of trained runs.")
app.add_typer(probe_app, name="probe")
models_app = typer.Typer(no_args_is_help=True, help="Real pretrained models, installed offline from PyPI packages.")
app.add_typer(models_app, name="models")
memory_app = typer.Typer(no_args_is_help=True, help="A run's experience memory (method memory, fast.kind memory).")
app.add_typer(memory_app, name="memory")
# User text (paths, task names, a server's error body) is never parsed: no markup, no :emoji: codes.
console = Console(stderr=True, emoji=False, markup=False, highlight=False)


def say(message: str) -> None:
    """One message to stderr, redacted, with terminal escape sequences removed."""
    from fastslow.util import clean

    console.print(clean(str(message)), soft_wrap=True)


def print_error(message: str) -> None:
    """``error: <message>`` as one redacted line (user text is not markup)."""
    from fastslow.util import one_line

    # one write: the lines of two ranks sharing a stderr pipe must not interleave within a line
    console.print(Text.assemble(("error: ", "bold red"), one_line(message, 400)), soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    print_error(message)
    raise typer.Exit(code)


def guarded(command):
    """Every error escaping ``command`` ends as one redacted line: exit 2 when it comes from the user's inputs,
    environment or plug-in code, exit 1 for a training failure or (with a request to report it) a fastslow bug.
    No traceback is printed: one could quote a key held in the user's exception."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from fastslow.errors import describe, exit_code

        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # typer's own (a usage error raised by a command): main() prints it as one line
        except KeyboardInterrupt:  # typer would turn it into a silent exit 130
            print_error("aborted (Ctrl-C)")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the one place every error becomes one line
            print_error(describe(exc))
            _after_peers_printed(exc)
            raise typer.Exit(exit_code(exc)) from None

    return wrapper


def _after_peers_printed(exc: BaseException) -> None:
    """A failure every rank agreed on (``Engine.agree``): wait until every rank has printed its line, as the
    launcher stops the other ranks as soon as one exits."""
    dist = sys.modules.get("torch.distributed")
    if getattr(exc, "agreed_by_ranks", False) and dist is not None and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a peer already gone: nothing left to wait for
            pass


def _main_process() -> bool:
    """False in the other ranks of a `fastslow launch` run: they stay quiet (rank 0 reports)."""
    return os.environ.get("RANK", "0") == "0"


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
        disable=not _main_process() or not console.is_terminal,  # no terminal: plain lines (run_config)
    )


class PlainProgress:
    """Progress as plain lines (steps done, elapsed time, time left) for output that is not a terminal, where a
    live bar prints nothing until the end: a line when ``FASTSLOW_PROGRESS_EVERY_S`` (10) have passed since the
    last, and the last step's once any was printed."""

    def __init__(self, label: str, total: int, start: int) -> None:
        from fastslow.util import progress_every_s

        self.label, self.total, self.start = label, total, start
        self.every_s = progress_every_s()
        self.t0 = self._last = time.monotonic()
        self._printed = False

    def update(self, done: int, info: str) -> None:
        from fastslow.util import duration

        now = time.monotonic()
        if now - self._last < self.every_s and not (done == self.total and self._printed):
            return
        self._last, self._printed = now, True
        took = now - self.t0
        left = took / max(done - self.start, 1) * (self.total - done)
        say(f"{self.label}: step {done}/{self.total} ({100 * done // max(self.total, 1)}%), {duration(took)} "
            f"elapsed, about {duration(left)} left" + (f"  {info}" if info else ""))


def step_info(row: dict) -> str:
    """What a progress line shows of a step's metrics row."""
    bits = []
    if "slow/reward_mean" in row:
        bits.append(f"reward {row['slow/reward_mean']:.3f}")
    evals = [v for k, v in row.items() if k.startswith("eval/") and k.endswith("/reward")]
    if evals:
        bits.append(f"eval {sum(evals) / len(evals):.3f}")
    if "drift/kl_rev" in row:
        bits.append(f"kl {row['drift/kl_rev']:.4f}")
    if "fast/accepted_total" in row:
        bits.append(f"accepted {row['fast/accepted_total']:.0f}")
    if row.get("fast/failed_reflection_calls"):
        bits.append(f"failed reflection calls {row['fast/failed_reflection_calls']:.0f}")
    busy = _threads.load_note()
    if busy:  # why steps are slow, said where the user looks
        bits.append(busy)
    return "  ".join(bits)


class RunBar:
    """One run's progress: a bar in ``progress``, and plain lines when the output is not a terminal."""

    def __init__(self, progress: Progress, label: str, total: int, start: int = 0) -> None:
        self.progress, self.bar = progress, progress.add_task(label, total=total, completed=start, info="")
        self.plain = PlainProgress(label, total, start) if not console.is_terminal and _main_process() else None

    def step(self, done: int, _total: int, row: dict) -> None:
        info = step_info(row)
        self.progress.update(self.bar, completed=done, info=info or self.progress.tasks[self.bar].fields["info"])
        if self.plain is not None:
            self.plain.update(done, info)


def run_config(
    cfg, *, resume: bool = False, force: bool = False, label: str | None = None, progress: Progress | None = None
) -> dict:
    """Train ``cfg`` with a live progress line. Shared by ``run``, ``demo`` and ``probe``."""
    from fastslow.loop import Trainer

    own = progress is None
    progress = progress or progress_bar()
    bar: RunBar | None = None

    def on_step(done: int, total: int, row: dict) -> None:
        bar.step(done, total, row)

    trainer = Trainer(cfg, resume=resume, force=force, on_step=on_step, log=say)
    bar = RunBar(progress, label or cfg.method, cfg.total_steps, trainer.state.step)
    if own:
        with progress:
            return trainer.run()
    return trainer.run()


@app.command()
@guarded
def run(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/).")],
    out: Annotated[str | None, typer.Option(help="Run directory (overrides the config's out).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: key=value (repeatable).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in OUT from its last good checkpoint.")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite a run already in OUT.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Validate (tasks, reflector, engine settings), print the resolved "
                                                "settings as JSON, train nothing.")] = False,
) -> None:
    """Run one config: rl, gepa, memory or fst on a task or a stream."""
    from fastslow.config import load_config

    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a rank (accelerate launch on GPUs): it ends when its starter does
        from fastslow.util import die_with_parent

        die_with_parent()

    overrides = list(set_ or []) + ([f"out={out}"] if out else [])
    cfg = load_config(config, overrides)
    if dry_run:
        from fastslow.launch import dry_run as resolve
        from fastslow.launch import format_dry_run

        typer.echo(format_dry_run(resolve(cfg)))
        return
    summary = run_config(cfg, resume=resume, force=force)
    final = {t: round(v["reward"], 4) for t, v in summary["final"].items()}
    if not _main_process():
        return
    fast = summary.get("fast")
    # failed calls over calls (a call fails after all its tries), the same units on both sides
    health = (f"  accepted {fast['accepted_total']}  reflection errors {fast.get('failed_reflection_calls', 0)}/"
              f"{fast['reflection_calls']}") if fast else ""
    say(f"done: {cfg.out}  final reward {final}  kl_rev {summary['drift'].get('kl_rev', 0):.4f}  "
                  f"verifier errors {summary['verifier_errors']}/{summary.get('verifier_calls', 0)}{health}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@guarded
def launch(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(help="YAML config with engine: trl.")],
    nproc: Annotated[int | None, typer.Option(
        min=1, help="Processes per node (default: the config's scale.nproc).")] = None,
    accelerate_config: Annotated[str | None, typer.Option(
        help="accelerate config (configs/accelerate/ddp.yaml or fsdp2.yaml; ZeRO-3 is refused); GPUs only.")] = None,
    nnodes: Annotated[int, typer.Option(min=1, help="Nodes (machines) of the run.")] = 1,
    node_rank: Annotated[int, typer.Option(min=0, help="This node's rank (0 = the main node).")] = 0,
    main_address: Annotated[str, typer.Option(help="Main node's address (multi-node).")] = "127.0.0.1",
    main_port: Annotated[int, typer.Option(min=1, max=65535, help="Main node's port (multi-node).")] = 29500,
) -> None:
    """Run CONFIG (engine trl) on several processes: accelerate launch on GPUs, torchrun (gloo) on CPUs.

    Options after CONFIG that launch does not know (--out, --set, --resume, --force) go to `fastslow run`.
    """
    from fastslow.config import load_config
    from fastslow.launch import launch as start
    from fastslow.launch import launch_command

    run_args = list(ctx.args)
    sets = [run_args[i + 1] for i, a in enumerate(run_args[:-1]) if a == "--set"]
    cfg = load_config(config, sets)
    from fastslow import registry

    spec = registry.engine_spec(cfg.engine)
    if not spec.launchable:
        runs = " or ".join(f"engine '{name}'" for name in registry.listing()["engines"]
                           if registry.engine_spec(name).launchable)
        fail(f"launch runs {runs} on several processes; {config} has engine '{cfg.engine}' (set engine: trl or "
             "--set engine=trl)")
    if _threads.NUM in THREAD_DEFAULTS:  # our default, not the user's: each process gets its share of the CPUs
        os.environ[_threads.NUM] = str(_threads.share(_threads.usable_cpus(), nproc or cfg.scale.nproc))
    accelerate_config = accelerate_config or cfg.scale.accelerate_config
    if spec.check_launch is not None:  # before any process starts; scale.nproc: every process of the run
        world = (nproc or cfg.scale.nproc) * nnodes
        spec.check_launch(cfg.model_copy(update={"scale": cfg.scale.model_copy(update={"nproc": world})}),
                          accelerate_config)
    if nnodes > 1 and node_rank == 0:
        from fastslow.launch import check_port_free

        check_port_free(main_address, main_port)
    if accelerate_config and not torch_has_cuda():
        say(f"launch: no GPU: torchrun starts the processes and {accelerate_config} is not applied "
            "(accelerate shards on accelerators only)")
    cmd = launch_command(config, run_args, nproc=nproc or cfg.scale.nproc,
                         accelerate_config=accelerate_config, nnodes=nnodes,
                         node_rank=node_rank, main_address=main_address, main_port=main_port)
    raise typer.Exit(start(cmd, log=say))


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@app.command("eval")
@guarded
def eval_(
    model: Annotated[str, typer.Option(help="Model dir or id; 'micro' = the micro base; or a run's checkpoint.")],
    task: Annotated[str, typer.Option(help=(
        "Task spec: micro/<name> (the micro world), rg:<dataset>[?key=value&...] (reasoning-gym, e.g. "
        "rg:basic_arithmetic?extract=last_number), humaneval, codeio, jsonl:<path>[?match=..&extract=..], "
        "<module>:<attr> (your own)."))],
    prompt: Annotated[str | None, typer.Option(help="System prompt (default: the task's seed prompt).")] = None,
    n: Annotated[int, typer.Option(min=1, help="Eval problems.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    max_new_tokens: Annotated[int | None, typer.Option(
        help="Completion length cap (default: the task's own budget, e.g. humaneval 256, rg: 32; else the config "
             "default).", min=1)] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for torch (default: the CPUs this process may use, or OMP_NUM_THREADS).", min=1)] = None,
) -> None:
    """Score a model on a task's eval split; prints JSON {task, reward, n}."""
    from fastslow.config import ModelConfig
    from fastslow.errors import load_policy
    from fastslow.rollout import PolicySampler, score_prompt
    from fastslow.tasks import load_task

    if threads:
        import torch

        torch.set_num_threads(threads)
    t = load_task(task)
    if max_new_tokens is None:  # the task's own budget (a function body needs more than a number), else the config's
        from fastslow.config import SlowConfig

        budget = getattr(t, "max_new_tokens", None)
        max_new_tokens = budget if isinstance(budget, int) and budget > 0 else SlowConfig().max_new_tokens
    policy = load_policy(ModelConfig(path=_model_dir(model)))
    system = t.seed_prompt if prompt is None else prompt
    scored = score_prompt(PolicySampler(policy), t, system, n, temperature=temperature,
                          max_new_tokens=max_new_tokens, seed=seed)
    typer.echo(json.dumps({"task": t.name, "reward": scored.mean_reward, "n": len(scored.verdicts)}))


def _model_dir(model: str) -> str:
    """A run dir or checkpoint dir resolves to its weights; anything else is passed through."""
    p = Path(model)
    if (p / "checkpoints").is_dir():
        from fastslow.checkpoint import run_weights

        return str(run_weights(p, warn=say))
    if (p / "model" / "config.json").is_file():  # a checkpoint dir
        return str(p / "model")
    return model


@app.command()
@guarded
def report(
    dirs: Annotated[list[Path], typer.Argument(help="Run dirs, or a demo dir holding run dirs.")],
    out: Annotated[Path | None, typer.Option(help="Where report.html goes (default: the first dir).")] = None,
) -> None:
    """(Re)build report.html and the plots from run directories."""
    from fastslow.report import build_report, discover

    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        fail(f"not a directory: {', '.join(missing)}")
    if not discover(list(dirs))[0]:
        fail(f"no runs in {', '.join(map(str, dirs))} (a run dir holds summary.json or metrics.jsonl)")
    path = build_report(list(dirs), out or dirs[0])
    say(f"report: {path}")


@app.command()
@guarded
def serve(
    target: Annotated[Path, typer.Argument(help="A config (with --out), a serving run dir (restart) or a training "
                                                "run dir (its weights and prompts, served from RUN_DIR/serve).")],
    out: Annotated[str | None, typer.Option(help="Serving run directory (overrides the config's out).")] = None,
    host: Annotated[str, typer.Option(help="Bind address; beyond loopback needs the serve.api_key_env key.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 8000,
    learn: Annotated[bool, typer.Option(help="Store answers and feedback; learn from them in the background.")]
    = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: key=value (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved serving plan as JSON (serve.backend vllm: the "
                                                "vLLM command and adapter pushes); serve nothing.")] = False,
) -> None:
    """An OpenAI-compatible server over the current weights and fast context (see fastslow.serve)."""
    from fastslow.serve import resolve_target, run_server, serve_plan
    from fastslow.util import redact

    cfg, run_dir, source = resolve_target(target, out, list(set_ or []))
    if dry_run:
        typer.echo(json.dumps(serve_plan(cfg, run_dir, host=host, port=port, learn=learn), indent=2))
        return
    run_server(cfg, run_dir, host=host, port=port, learn=learn, source=source,
               log=lambda m: console.print(redact(m), markup=False, highlight=False, soft_wrap=True))


@app.command()
@guarded
def demo(
    out: Annotated[Path, typer.Option(help="Where the runs, probes and report go.")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option(help="A ~1 minute version on 2 cores (shorter stages and probes).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of every run.")] = 0,
    methods: Annotated[str, typer.Option(
        help="Comma-separated subset of rl,gepa,memory,fst,fst+memory (default: all five).")] = "",
    workers: Annotated[int | None, typer.Option(
        min=1, help="Runs trained at a time, each in its own process (default: one per usable CPU, at most 5; "
                    "the metrics are the same for any count).")] = None,
) -> None:
    """RL, GEPA-only, memory-only, FST and FST+memory on the micro stream; plasticity probes, attribution, report."""
    from fastslow.demo import METHODS, chosen_methods, run_demo
    from fastslow.pool import default_workers

    try:
        chosen = chosen_methods([m.strip() for m in methods.split(",") if m.strip()] if methods else METHODS)
    except ValueError as exc:
        fail(f"--methods: {exc}")
    workers = workers or default_workers(len(chosen))
    with progress_bar() as progress:

        def run(cfg, *, label=None, **kw):
            return run_config(cfg, label=label, progress=progress, **kw)

        bars: dict[str, RunBar] = {}

        def watch(label: str, done: int, total: int, row: dict) -> None:  # a step of a run in a worker process
            if label not in bars:
                bars[label] = RunBar(progress, label, total)
            bars[label].step(done, total, row)

        # the report's line is printed below (resolved path, in colour)
        result = run_demo(out, quick=quick, seed=seed, methods=chosen, workers=workers, run=run, watch=watch,
                          log=lambda _: None)
    from rich.markup import escape

    from fastslow.util import clean

    where = escape(clean(str(Path(result["report"]).resolve())))
    console.print(f"[bold green]report:[/] {where}  ({result['wall_s'] / 60:.1f} min)", markup=True)


@app.command()
@guarded
def selftest(
    engine: Annotated[str, typer.Option(help="The engine to hold to the native reference (e.g. trl).")] = "trl",
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
) -> None:
    """About a minute: ENGINE vs native on this machine with a tiny model (lr per update, drift on the same
    weights, first update with objectives aligned, the experience memory after two rounds): a table of max relative
    differences. Exit 1 if one is off."""
    from fastslow import registry
    from fastslow.conformance import format_table, selftest

    if registry.engine_spec(engine) is None:
        fail(f"--engine: unknown engine {engine!r}: use one of {registry.known('engines')}")
    checks = selftest(engine)
    if as_json:
        typer.echo(json.dumps([{**vars(c), "ok": c.ok} for c in checks], indent=2))
    else:
        typer.echo(format_table(checks, engine))
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@probe_app.command("plasticity")
@guarded
def probe_plasticity(
    from_: Annotated[str, typer.Option("--from", help="A run dir, a model dir, or 'base'.")],
    task: Annotated[str, typer.Option(help="Held-out task spec (e.g. micro/consonants).")],
    steps: Annotated[int, typer.Option(help="RL steps of the probe.")] = 30,
    config: Annotated[Path | None, typer.Option(help="Config supplying model and RL settings.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: key=value.")] = None,
    out: Annotated[Path, typer.Option(help="Probe run dirs go here.")] = Path("runs/probe"),
    compare_base: Annotated[bool, typer.Option(help="Also probe from the base model.")] = True,
) -> None:
    """Fresh RL on a held-out task from a checkpoint; prints final reward and AUC (and the base's)."""
    from fastslow.config import load_config
    from fastslow.probes import plasticity_probe

    overrides = [f"stages=[{{task: '{task}', steps: {steps}}}]", *(set_ or [])]
    template = load_config(config, overrides)
    starts = [("from", from_)] + ([("base", "base")] if compare_base and from_ != "base" else [])
    results = {}
    with progress_bar() as progress:
        for arm, start in starts:
            results[arm] = plasticity_probe(
                start, task, steps, template, out / arm,
                run=lambda cfg, _arm=arm, **kw: run_config(cfg, label=f"probe {_arm}", progress=progress, **kw),
            )
    typer.echo(json.dumps({arm: {k: r[k] for k in ("start", "final", "auc")} for arm, r in results.items()}))


@world_app.command("build")
@guarded
def world_build(
    out: Annotated[Path, typer.Option(help="Where to write the base model.")] = Path("runs/world-base"),
    seed: Annotated[int, typer.Option(help="Build seed (the shipped model uses 0).")] = 0,
) -> None:
    """Rebuild the micro base model deterministically (tokenizer + pretraining)."""
    from fastslow.world import build_base

    stats = build_base(out, seed=seed)
    typer.echo(json.dumps(stats, indent=2, default=str))


@world_app.command("check")
@guarded
def world_check(
    model: Annotated[str | None, typer.Option(help="Model dir (default: the shipped micro base).")] = None,
    n: Annotated[int, typer.Option(min=1, help="Eval problems per task.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    rl_steps: Annotated[int, typer.Option(min=0, help="Also run RL from the seed prompt for this many steps on "
                                                "weight-dominant tasks (0: skip; 300 checks the property).")] = 0,
    task: Annotated[list[str] | None, typer.Option(help="Check only this micro task (repeatable; default: "
                                                        "all).")] = None,
) -> None:
    """Per task: regime, base reward with the seed prompt, the rule text and the reflector's proposal; properties."""
    from fastslow.world import check_world
    from fastslow.world.tasks import ALL_TASKS

    unknown = [t for t in task or [] if t not in ALL_TASKS]
    if unknown:
        fail(f"unknown micro task(s) {', '.join(unknown)}; known: {', '.join(ALL_TASKS)}")
    typer.echo(json.dumps(check_world(model, n=n, seed=seed, rl_steps=rl_steps, tasks=task), indent=2))


@models_app.command("fetch")
@guarded
def models_fetch(name: Annotated[str, typer.Argument(help="Model name (see `fastslow models list`).")]) -> None:
    """Install a model into $FASTSLOW_HOME/models (idempotent); prints its folder as the last line."""
    from fastslow.models import ModelInstallError, fetch

    try:
        path = fetch(name, log=say)
    except ModelInstallError as exc:
        fail(str(exc))
    typer.echo(str(path))


@models_app.command("list")
@guarded
def models_list() -> None:
    """Known models as JSON: name, package, installed, path."""
    from fastslow.models import listing

    typer.echo(json.dumps(listing(), indent=2))


@memory_app.command("show")
@guarded
def memory_show(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (its memory/ folder is read).")],
    task: Annotated[str | None, typer.Option(help="Only this task's lessons and cases.")] = None,
    cases: Annotated[int, typer.Option(min=0, help="Cases listed per task (the newest).")] = 5,
) -> None:
    """Print a run's memory: lessons (helpful/harmful counts, source task) and cases, per task."""
    from fastslow.memory import read_dir
    from fastslow.util import clean  # lessons and cases are model output: no terminal escapes

    meta, lessons, kept = read_dir(run_dir / "memory")
    if not meta:
        fail(f"no memory in {run_dir} (runs of method memory or fast.kind memory / gepa+memory write memory/)")
    tasks = list(dict.fromkeys([x.task for x in lessons] + [c.task for c in kept]))
    if task is not None:
        if task not in tasks:
            fail(f"task {task!r} has nothing in {run_dir}/memory (tasks there: {', '.join(tasks) or 'none'})")
        tasks = [task]
    lines = [f"{run_dir}/memory: {meta['lessons']} lessons, {meta['cases']} cases; evicted when full "
             f"{meta['evicted_total']}, dropped as harmful {meta['dropped_total']}"]
    for name in tasks:
        mine = sorted((x for x in lessons if x.task == name), key=lambda x: (-(x.helpful - x.harmful), x.id))
        theirs = [c for c in kept if c.task == name]
        lines.append(f"\n[{name}] {len(mine)} lessons, {len(theirs)} cases")
        lines += [f"  +{x.helpful:<3d} -{x.harmful:<3d} #{x.id:<4d} {x.text}" for x in mine]
        for c in theirs[-cases:] if cases else []:
            problem, attempt = " ".join(c.problem.split())[:60], " ".join(c.attempt.split())[:60]
            lines.append(f"  case #{c.id} reward {c.reward:.2f}: {problem} -> {attempt}")
    typer.echo(clean("\n".join(lines)))


def main() -> int:
    """The ``fastslow`` command: a usage error (unknown option, bad value) is one line and exit 2 too."""
    try:
        rc = app(standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors (typer vendors click): what the user typed
        ctx = getattr(exc, "ctx", None)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print_error(f"{message} (see '{ctx.command_path if ctx else 'fastslow'} --help')")
        return getattr(exc, "exit_code", 2)
    except (typer.Abort, KeyboardInterrupt):
        print_error("aborted")
        return 130
    except Exception as exc:  # noqa: BLE001 - outside any command (e.g. a plug-in failing at import): one line
        from fastslow.errors import describe, exit_code

        print_error(describe(exc))
        return exit_code(exc)
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
