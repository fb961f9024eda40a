"""The one config class of a run, loaded from YAML with ``--set key=value`` overrides.

Every field is documented; unknown fields are errors (``extra="forbid"``) so a typo never silently
falls back to a default. :func:`load_config` turns any problem into a :class:`ConfigError` whose
one-line message names the field.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Method = Literal["rl", "gepa", "memory", "fst"]
FastKind = Literal["gepa", "memory", "gepa+memory"]


class ConfigError(ValueError):
    """A config cannot be used; ``str(err)`` is a one-line message naming the field."""


class _Strict(BaseModel):
    # Every float must be finite: a timeout, lr or budget of inf or nan is a typo, not a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")
MAX_QUOTE = 200  # an error quotes at most this many characters of the user's input
MAX_CONFIG_NODES = 100_000  # YAML aliases can expand a 1 KB file into billions of nodes: refused beyond this


def _quote(value: object) -> str:
    """A short repr of user input for an error message (bounded however large or nested the value is)."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = MAX_QUOTE
    text = short.repr(value)
    return text if len(text) <= MAX_QUOTE else text[: MAX_QUOTE - 3] + "..."


class LoraConfig(_Strict):
    """Train a LoRA adapter instead of all weights (the base is then the adapter-disabled model)."""

    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | str = Field("all-linear", description="Modules to adapt (peft syntax).")


class ModelConfig(_Strict):
    path: str = Field("micro", description="HF model id or local dir; 'micro' is the embedded micro-world base.")
    lora: LoraConfig | None = Field(None, description="Optional LoRA; null trains all weights.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda[:i]' or 'mps'.")

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not _DEVICE.fullmatch(device):
            raise ValueError(f"unknown device {_quote(device)}: use auto, cpu, cuda, cuda:<i> or mps")
        return device


class StageConfig(_Strict):
    task: str = Field(description="Task spec: micro/<name>, jsonl:<path>, rg:<dataset>, ... or <module>:<attr>.")
    steps: int = Field(gt=0, description="Loop steps spent on this task before the stream moves on.")
    name: str | None = Field(
        None, min_length=1, description="Task name in metric keys (default: the task's own). Unique per task spec."
    )


class SlowConfig(_Strict):
    """Slow channel: RL on weights.

    Learning rate (every engine, every process count): update k = 1, 2, ... uses
    ``lr * min(1, k / warmup_steps)``, so the first update uses lr / warmup_steps (never 0) and update
    ``warmup_steps`` the full rate; the schedule steps once per optimizer update. ``slow/lr`` in a metrics row is
    the rate that step's update used (its last update's with ``updates_per_batch`` > 1; absent when the step made
    no update, e.g. every group flat).
    """

    loss: Literal["cispo", "grpo"] = Field("cispo", description="CISPO (default) or GRPO-style clipped loss.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    warmup_steps: int = Field(10, ge=0, description="Linear learning-rate warm-up, in optimizer updates: update k "
                              "uses lr * min(1, k / warmup_steps).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float | None = Field(None, gt=0, description="Clip the gradient norm; null = no clipping.")
    batch_problems: int = Field(8, gt=0, description="Problems per step.")
    group_size: int = Field(8, gt=1, description="G: rollouts per problem (one advantage group).")
    updates_per_batch: int = Field(1, gt=0, description="Optimizer steps on each batch (ratio != 1 after 1).")
    tau: float = Field(4.0, gt=0, description="CISPO: importance ratio truncated from above at tau.")
    clip_eps: float = Field(0.2, gt=0, description="GRPO: ratio clipped to [1-eps, 1+eps].")
    kl_coef: float = Field(0.0, ge=0, description="Coefficient of a k3 KL-to-base penalty in the loss "
                           "(with kl_target: its starting value, 0 = 1/sqrt(2 kl_target)).")
    kl_target: float | None = Field(
        None, gt=0, description="Drift budget, nats/token: adapt the KL coefficient after each drift measurement "
        "so the exact reverse KL stays near this value (null = fixed kl_coef).")
    kl_target_gain: float = Field(0.5, gt=0, description="Gain of the kl_target controller: log beta moves by "
                                  "gain * log(KL / target) per update (error clipped to +-2).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of training rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of training rollouts.")
    max_new_tokens: int = Field(24, gt=0, description="Completion length cap.")
    loss_aggregation: Literal["group", "tokens"] = Field(
        "group", description="group: token-mean within each problem's group, then mean over groups; tokens: sum "
        "over all kept tokens / their count (TRL's cispo; to compare engines).")


class MemoryConfig(_Strict):
    """Experience memory (``fast.kind: memory`` or ``gepa+memory``, ``method: memory``): lessons and cases.

    Each round samples ``fast.val_size`` train problems twice (with the memory context and with the base prompt,
    within ``fast.budget`` rollouts), marks the lessons retrieved for a problem helpful or harmful by which did
    better, and asks ``fast.reflector`` (the same seam as GEPA) for lessons from the scored attempts; the curator
    turns its reply into add / helpful / harmful / drop operations merged into the store.
    """

    max_lessons: int = Field(48, gt=0, description="Lessons kept; beyond it the lowest helpful-minus-harmful go.")
    max_cases: int = Field(200, gt=0, description="Cases (problem, attempt, reward, feedback) kept; the lowest "
                           "reward (then the oldest) go first.")
    max_lesson_chars: int = Field(200, gt=0, description="A proposed lesson longer than this is refused (counted).")
    max_context_tokens: int = Field(
        256, gt=0, description="Tokens of one context (base prompt + lessons + cases), policy tokenizer; what "
        "does not fit is left out, and never past the model's own context.")
    lessons_per_context: int = Field(6, ge=0, description="Top lessons retrieved into a problem's context.")
    cases_per_context: int = Field(2, ge=0, description="Top cases (worked train examples) retrieved per problem.")
    drop_harmful_margin: int = Field(
        3, gt=0, description="A lesson whose harmful count exceeds its helpful count by this much is dropped.")
    reflect_examples: int = Field(8, gt=0, description="Scored attempts shown to the reflector per round.")
    retriever: Literal["bm25", "dense", "hybrid"] = Field(
        "bm25", description="How lessons and cases are ranked per problem. bm25: words (bm25s); dense: cosine of "
        "the policy's own hidden states (current weights, last layer mean-pooled; re-embedded after each weight "
        "update; no other model); hybrid: reciprocal-rank fusion of both, sum 1/(60 + rank).")


class FastConfig(_Strict):
    """Fast channel: GEPA over a population of system prompts, an experience memory, or both."""

    kind: FastKind | None = Field(
        None, description="What the fast channel holds: 'gepa' (a prompt population), 'memory' (lessons and cases "
        "retrieved per problem) or 'gepa+memory' (the prompt plus retrieved memory). null: by method (gepa for "
        "gepa/fst, memory for memory). Only method fst takes another kind than its method's.")
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="Experience-memory settings.")

    every: int = Field(
        10, gt=0,
        description="T: a GEPA round at each stage's first step and every T steps from it (steps start, start+T, ...).",
    )
    population: int = Field(4, gt=0, description="K: prompts kept (top-K of the Pareto front); must divide G.")
    budget: int = Field(120, gt=0, description="Hard cap on a GEPA round's rollouts, re-scoring included.")
    val_size: int = Field(16, gt=0, description="Pareto (validation) problems per round, drawn from train.")
    val_growth: float = Field(
        2.0, ge=1.0,
        description="A round whose validation set is too flat to tell candidates apart (every candidate "
        "scored the same, or the seed alone scored 0 or 1 everywhere; metric fast/val_flat) multiplies the next "
        "round's val_size by this (at least +1), up to val_max and never past what leaves half of fast.budget "
        "for proposals (re-scoring the seed and the K carried prompts on it). A proposal enters the Pareto front "
        "only when it strictly beats its parent on validation; when the front holds fewer than K prompts the "
        "population is filled to K by mean validation score (kept candidates, then proposals that did not beat "
        "their parent; while a round has fewer than K distinct prompts every new proposal is scored on "
        "validation for this), so that every group mixes K prompts (metrics fast/population, fast/front_size, "
        "fast/filled).",
    )
    val_max: int | None = Field(None, gt=0, description="Cap of the grown val_size (None: 4 x val_size).")
    minibatch: int = Field(3, gt=0, description="GEPA reflection minibatch size.")
    reflector: str = Field(
        "micro",
        description="'micro' (offline micro-world reflector), 'feedback' (no LM), 'hf:<model>', 'openai:<model>' "
        "(an OpenAI-compatible server), 'litellm:<model>', 'replay:<file>' or '<module>:<attr>' (a callable).",
    )
    reflector_base_url: str | None = Field(
        None, description="openai:<model>: the server's base URL (default https://api.openai.com/v1)."
    )
    reflector_key_env: str = Field("OPENAI_API_KEY", description="openai:<model>: env var holding the API key "
                                   "(its value is masked in every output and file, whatever its shape).")
    reflection_max_tokens: int = Field(512, gt=0, description="Reply length cap of hf:/openai: reflectors.")
    reflection_temperature: float = Field(0.0, ge=0, description="Sampling temperature of hf:/openai: reflectors.")
    reflection_record: str | None = Field(None, description="Append every reflection call to this JSONL file.")
    reflection_replay: str | None = Field(
        None, description="Answer reflection calls from this recording (unrecorded prompts go to the reflector)."
    )
    preflight: bool = Field(True, description="Before step 0, one short real call to the reflector (fail early).")
    stop_after_failed_rounds: int = Field(
        3, ge=0, description="R: stop the run after R consecutive rounds whose reflection calls all failed (0: never)."
    )
    reflection_retries: int = Field(2, ge=0, description="Retries of a failing reflection call.")
    reflection_timeout_s: float = Field(120.0, gt=0, description="Wall-clock limit of one reflection call.")
    max_consecutive_reflection_failures: int = Field(
        3, gt=0, description="A round ends (keeping its population) after this many failed reflection calls in a row."
    )
    temperature: float = Field(0.0, ge=0, description="Sampling temperature when GEPA scores a prompt (0=greedy).")
    max_reply_chars: int = Field(
        50_000, gt=0, description="A reflection reply longer than this is a reflection error (never parsed)."
    )
    max_prompt_chars: int = Field(
        8_000, gt=0, description="A proposed prompt longer than this is rejected (a reflection error)."
    )

    @field_validator("reflector_key_env")
    @classmethod
    def _mask_key(cls, value: str) -> str:
        from fastslow.util import add_secret_env

        add_secret_env(value)  # redacted from here on, whatever the variable is called or its value looks like
        return value


class DriftConfig(_Strict):
    every: int = Field(10, gt=0, description="Measure drift every E loop steps (and at step 0 and the end).")
    probe_size: int = Field(16, gt=0, description="Fixed probe problems per task of the stream.")
    max_new_tokens: int = Field(24, gt=0, description="Length of probe samples.")


class EvalConfig(_Strict):
    every: int = Field(10, gt=0, description="Evaluate every task of the stream every E loop steps.")
    n: int = Field(64, gt=0, description="Held-out problems per task (eval split).")
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding.")


class ScaleConfig(_Strict):
    """Settings of the ``trl`` engine only (TRL's GRPOTrainer under accelerate); the native engine ignores them.

    How the slow channel maps onto ``trl.GRPOConfig`` (``fastslow run CONFIG --dry-run`` prints the result):
    loss cispo -> ``loss_type="cispo"``, tau -> ``epsilon_high`` (TRL's CISPO cap), kl_coef -> ``beta`` (k3, to the
    adapter-disabled model under LoRA, else a frozen copy of the initial weights), group_size ->
    ``num_generations``, batch_problems x group_size -> the generation batch over all processes, betas /
    weight_decay / max_grad_norm -> ``adam_beta1,2`` / ``weight_decay`` / ``max_grad_norm``, max_new_tokens /
    temperature / top_p -> ``max_completion_length`` / ``temperature`` / ``top_p``, model.lora -> ``peft_config``,
    model.dtype -> ``bf16``/``fp16``, gradient_checkpointing -> the model's activation checkpointing (turned on by
    the engine: it never calls ``Trainer.train()``). lr / warmup_steps: fastslow's schedule on both engines (see
    :class:`SlowConfig`), not TRL's ``constant_with_warmup`` (which starts at 0). ``updates_per_batch`` > 1 and
    ``loss: grpo`` map onto ``num_iterations`` and ``loss_type="grpo"``; ``clip_eps`` -> ``epsilon``.

    vLLM (``vllm`` colocate/server): every sampling call passes its own temperature, top_p, max_new_tokens and
    seed to vLLM (greedy evaluation stays greedy). vLLM's log-probs of the sampled tokens travel with the
    rollouts and feed TRL's importance-sampling correction of the vLLM/trainer mismatch
    (``vllm_importance_sampling``: TRL's mode, ratio = exp(trainer log-prob - vLLM log-prob), capped or masked at
    ``vllm_importance_sampling_cap``; ``off`` trains as if vLLM sampled from the trainer's exact weights).

    Differences from the native engine that remain by design (the conformance suite,
    ``tests/test_engine_conformance.py``, puts both on one definition with the option named, then requires the
    first update and 5-step metrics to agree to 1e-4):

    | what                | trl (TRL's definition)         | native                | aligned by                      |
    |---------------------|--------------------------------|-----------------------|---------------------------------|
    | advantage scale     | (r-mean) / (unbiased std+1e-4) | population std + 1e-6 | scale.advantages: native        |
    | flat groups         | adv. 0, tokens still normalise | left out of the loss  | scale.advantages: native        |
    | token aggregation   | token sum / token count        | per group, then mean  | slow.loss_aggregation: tokens   |
    | temperature scaling | log-probs of logits / T        | of raw logits         | slow.temperature: 1             |
    | KL gradient         | k3 x importance ratio          | plain k3              | scale.kl_bias_correction: false |
    | weight decay        | not on biases and norms        | on every weight       | slow.weight_decay: 0            |
    | vLLM rollouts       | importance-sampling fix        | no vLLM               | scale.vllm: off                 |

    (T = slow.temperature; TRL's KL gradient is the unbiased reverse-KL one of DeepSeek-V3.2: k3 times the
    differentiable importance ratio, whose value is 1.) The same on both: the learning rate of every update, the
    drift meter (same weights, same numbers), a batch whose groups are all flat makes no update, the CISPO/GRPO
    token loss and the k3 penalty's value.
    """

    kl_bias_correction: bool = Field(
        True, description="TRL's use_bias_correction_kl: the k3 penalty times the (differentiable) importance ratio, "
        "the unbiased reverse-KL gradient (false: native's plain k3 gradient).")
    advantages: Literal["trl", "native"] = Field(
        "trl", description="Advantage definition of engine trl: trl (TRL's: unbiased group std + 1e-4, flat groups "
        "count in the token normaliser) or native (fastslow's: population std + 1e-6, flat groups left out).")
    vllm: Literal["off", "colocate", "server"] = Field(
        "off", description="Rollouts through vLLM inside TRL: off (the trainer's model.generate), colocate, server."
    )
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="vLLM colocate: GPU memory fraction.")
    vllm_tensor_parallel_size: int = Field(1, gt=0, description="vLLM colocate: tensor-parallel size.")
    vllm_server_host: str = Field("0.0.0.0", description="vLLM server mode: host of `trl vllm-serve`.")
    vllm_server_port: int = Field(8000, gt=0, description="vLLM server mode: port of `trl vllm-serve`.")
    vllm_importance_sampling: Literal["off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = (
        Field("sequence_mask", description="TRL's correction of vLLM's sampling log-probs vs the trainer's (TRL's "
              "vllm_importance_sampling_mode; off: none)."))
    vllm_importance_sampling_cap: float = Field(3.0, gt=0, description="Upper bound of that importance ratio "
                                                "(truncated or masked above it).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (saves memory).")
    nproc: int = Field(1, gt=0, description="Processes `fastslow launch` starts by default (per node).")
    accelerate_config: str | None = Field(
        None, description="accelerate config file `fastslow launch` uses on GPUs (configs/accelerate/*.yaml)."
    )


class ServeConfig(_Strict):
    """``fastslow serve``: an OpenAI-compatible endpoint over the current weights and fast context, learning from
    its traffic with ``--learn`` (see :mod:`fastslow.serve`). Training runs (``fastslow run``) ignore this section.

    The fast context of a request is the served task's best prompt, plus (fast kind memory or gepa+memory) what
    the experience memory retrieves for its user turn; ``system_message`` says what happens to a request's own
    system message. A candidate trained on a copy of the weights is promoted only when its exact
    KL to the base on the probe set is <= ``max_kl`` and its held-out reward is at most ``max_regression`` below
    the best version served under the current context (the served one included: small drops do not compound);
    otherwise it is discarded and the reason is a ``serve_rejected`` row of metrics.jsonl.
    """

    model_name: str = Field("fastslow", min_length=1, max_length=64,
                            description="The model id /v1/models lists; a request naming another model gets 404.")
    task: str | None = Field(
        None, description="Name of the stream task whose best prompt is served and whose verifier scores answers "
        "server-side (null: the last stage's task).")
    max_batch: int = Field(8, gt=0, description="Requests generated together in one batch by the generation thread.")
    batch_wait_ms: float = Field(
        5.0, ge=0, description="How long the generation thread waits to fill a batch once the first request is in.")
    max_queue: int = Field(64, gt=0, description="Requests waiting for generation; one more is answered 429.")
    request_timeout_s: float = Field(
        120.0, gt=0, description="A request still waiting for its answer after this long is answered 503.")
    max_body_bytes: int = Field(65_536, gt=0, description="Larger request bodies are answered 413.")
    max_prompt_tokens: int = Field(
        192, gt=0, description="A formatted prompt (fast context included) longer than this is answered 400.")
    max_tokens: int = Field(64, gt=0, description="Largest max_tokens a request may ask for (more: 400).")
    default_max_tokens: int | None = Field(
        None, gt=0, description="Completion cap of a request that sets none (null: slow.max_new_tokens).")
    system_message: Literal["keep", "merge", "replace"] = Field(
        "merge", description="A request's own system message: keep (used instead of the fast context), merge "
        "(fast context, a blank line, then the request's) or replace (dropped: the fast context only).")
    api_key_env: str = Field(
        "FASTSLOW_SERVE_KEY", description="Env var holding the API key. When set, every route but /healthz needs "
        "'Authorization: Bearer <key>'; binding any host other than loopback requires it. Never logged or stored.")

    @field_validator("api_key_env")
    @classmethod
    def _mask_key(cls, value: str) -> str:
        from fastslow.util import add_secret_env

        add_secret_env(value)  # its value is redacted everywhere, whatever the variable is called
        return value
    score: Literal["feedback", "verifier"] = Field(
        "feedback", description="--learn: where rewards come from: feedback (POST /v1/feedback) or verifier (the "
        "task's verifier scores every answer whose user turn is a known problem of the task).")
    every_n_feedbacks: int = Field(
        32, gt=0, description="--learn: train a candidate once this many new feedbacks are stored, busy or idle.")
    idle_rps: float = Field(
        0.5, ge=0, description="--learn: below this many requests/s (over idle_window_s) the server is idle and the "
        "candidate trains on whatever new feedback there is (at least train_batch rows).")
    idle_window_s: float = Field(10.0, gt=0, description="Window of the request rate idle_rps is compared with.")
    train_batch: int = Field(16, gt=1, description="--learn: feedback rollouts per CISPO step (one advantage group).")
    train_steps: int = Field(2, gt=0, description="--learn: CISPO steps on the candidate before it is gated.")
    fast_every_n_feedbacks: int = Field(
        16, gt=0, description="--learn: a fast-channel round after this many feedbacks (GEPA on the served "
        "weights; the memory curated from those feedbacks).")
    max_kl: float = Field(0.05, ge=0, description="Gate: a candidate's exact KL(pi||base) per token on the probe set "
                          "must be <= this to be promoted.")
    max_regression: float = Field(
        0.05, ge=0, le=1, description="Gate: held-out reward may fall at most this much below the best version's "
        "served under the current fast context (the served version included).")
    gate_n: int = Field(32, gt=0, description="Gate: held-out problems (eval split) scored greedily per version.")
    keep_versions: int = Field(2, gt=0, description="Promoted versions kept on disk (serve/ in the run dir).")
    backend: Literal["native", "vllm"] = Field(
        "native", description="native: fastslow generates (one thread owns the model). vllm: vLLM's OpenAI server "
        "serves and promoted LoRA adapters are pushed to it (--dry-run only: not run on this project's machines).")
    vllm_url: str = Field("http://127.0.0.1:8001", description="backend vllm: the vLLM server's base URL.")


class Config(_Strict):
    """One run. ``stages`` is the task stream; a single-task run is a stream of one stage."""

    method: Method = Field(
        "fst", description="rl: slow only; gepa: prompt population only (frozen weights); memory: experience memory "
        "only (frozen weights); fst: both channels (fast.kind says what the fast one holds).")
    engine: str = Field(
        "native", description="native (one process, the reference) or a registered engine: trl (TRL's GRPOTrainer "
        "under accelerate; pip install 'fastslow[scale]'; `fastslow launch` for several processes)."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The policy model.")
    stages: list[StageConfig] = Field(min_length=1, description="Task stream: list of {task, steps}.")
    slow: SlowConfig = Field(default_factory=SlowConfig, description="Slow channel (RL) settings.")
    fast: FastConfig = Field(default_factory=FastConfig, description="Fast channel (GEPA) settings.")
    drift: DriftConfig = Field(default_factory=DriftConfig, description="Drift meter settings.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation settings.")
    scale: ScaleConfig = Field(default_factory=ScaleConfig, description="Settings of engine 'trl' (GRPOTrainer).")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Settings of `fastslow serve` only.")
    seed: int = Field(0, ge=0, lt=2**63, description="Seed of everything; same seed on CPU = same metrics.")
    threads: int | None = Field(
        None, gt=0, description="CPU threads for torch (null: OMP_NUM_THREADS, which the fastslow command sets to "
        "the CPUs the process may use unless set). Tiny models run faster on 1."
    )
    verify_timeout_s: float = Field(30.0, gt=0, description="Wall-clock limit of one verifier call (reward 0 after).")
    verifier_error_window: int = Field(
        256, gt=0, description="Verifier calls over which the share of verifier errors is watched."
    )
    max_verifier_error_share: float = Field(
        0.5, ge=0, le=1,
        description="A run whose verifier errors exceed this share of the last verifier_error_window calls stops "
        "(exit 1, checkpoint kept): a verifier that always fails would otherwise train on all-zero rewards.",
    )
    allow_unsafe_execution: bool = Field(
        False, description="Run untrusted code (e.g. a task's programs) with resource limits only where no "
        "isolation mechanism (unshare namespaces, bubblewrap) works; false refuses it."
    )
    oversize_problems: Literal["error", "skip"] = Field(
        "error", description="A problem whose prompt does not fit the model's context: 'error' (a config error "
        "naming it) or 'skip' (left out, counted in summary.json)."
    )
    checkpoint_every: int = Field(10, gt=0, description="Write a checkpoint every N loop steps (and at the end).")
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept on disk (older ones are deleted).")
    out: str = Field("runs/run", description="Run directory.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list, description="Experiment trackers that also get every metrics row (main process; "
        "offline/local by default: <out>/tensorboard, <out>/wandb unless WANDB_MODE, <out>/mlruns unless "
        "MLFLOW_TRACKING_URI; pip install 'fastslow[trackers]')."
    )

    @field_validator("engine")
    @classmethod
    def _registered_engine(cls, value: str) -> str:
        from fastslow import registry  # an unknown engine fails here, not at step 0 (built-ins are plug-ins too)

        if registry.engine_spec(value) is None:
            raise ValueError(f"unknown engine {value!r}: use one of {registry.known('engines')}")
        return value

    @model_validator(mode="after")
    def _stream_is_consistent(self) -> Config:
        by_name: dict[str, str] = {}
        for stage in self.stages:
            if stage.name is not None:
                other = by_name.setdefault(stage.name, stage.task)
                if other != stage.task:
                    raise ValueError(f"stages {other!r} and {stage.task!r} are both named {stage.name!r}")
        self._kind_fits_method()
        return self._population_divides_group()

    def _kind_fits_method(self) -> None:
        kind = self.fast.kind
        if kind is not None and self.method in ("gepa", "memory") and kind != self.method:
            raise ValueError(f"fast.kind {kind!r} with method {self.method!r}: method {self.method} holds "
                             f"{self.method} only (use method: fst for fast.kind {kind})")
        if self.fast_kind in ("memory", "gepa+memory") and self.engine not in ("native", "trl"):
            raise ValueError(f"fast.kind {self.fast_kind!r} runs on engines 'native' and 'trl' only")

    @property
    def fast_kind(self) -> str | None:
        """What the fast channel holds in this run (None: no fast channel)."""
        if self.method == "rl":
            return None
        if self.method in ("gepa", "memory"):
            return self.method
        return self.fast.kind or "gepa"

    def _population_divides_group(self) -> Config:
        if self.method == "fst" and "gepa" in (self.fast_kind or "") and self.slow.group_size % self.fast.population:
            raise ValueError(
                f"fast.population (K={self.fast.population}) must divide slow.group_size "
                f"(G={self.slow.group_size}) so each prompt gets G/K rollouts per problem"
            )
        return self

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


def _parse_value(raw: str) -> Any:
    # YAML scalars: numbers, booleans, null, lists ("[a, b]") all parse as a user expects.
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place (list items by index: ``stages.0.steps=5``)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    node: Any = data
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: no list item {part!r}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, dict | list):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {key}: no list item {last!r}")
        node[int(last)] = _parse_value(raw)
    else:
        node[last] = _parse_value(raw)


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    field = ".".join(str(p) for p in e["loc"]) or "config"
    if e["type"] == "extra_forbidden":
        return f"unknown field '{field}'"
    if e["type"] == "missing":
        return f"missing field '{field}'"
    msg = e["msg"].removeprefix("Value error, ")
    return f"field '{field}': {msg}" + (f" (got {_quote(e['input'])})" if e["type"] != "value_error" else "")


def config_from_dict(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_first_error(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load YAML (or start empty), apply overrides, validate. Raises ConfigError with a one-line message."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (UnicodeDecodeError, ValueError) as exc:  # garbage bytes, NUL characters
            raise ConfigError(f"{p} is not a YAML text file ({type(exc).__name__})") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config {p}: {exc.strerror or type(exc).__name__}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"malformed YAML in {p}{where}: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of fields")
        if _expanded_size(data) > MAX_CONFIG_NODES:
            raise ConfigError(f"{p}: more than {MAX_CONFIG_NODES} values once YAML aliases are expanded")
    for assignment in overrides:
        apply_override(data, assignment)
    return config_from_dict(data)


def _expanded_size(data: Any) -> int:
    """Values in ``data`` with shared (aliased) parts counted every time they appear; memoized, so a
    billion-laughs file is measured in a few steps instead of being walked."""
    memo: dict[int, int] = {}

    def size(node: Any, depth: int) -> int:
        if depth > 100:  # recursive aliases: the size is unbounded
            return MAX_CONFIG_NODES + 1
        if id(node) in memo:
            return memo[id(node)]
        if isinstance(node, dict):
            n = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.items())
        elif isinstance(node, list | tuple):
            n = 1 + sum(size(v, depth + 1) for v in node)
        else:
            n = 1
        memo[id(node)] = n = min(n, MAX_CONFIG_NODES + 1)
        return n

    return size(data, 0)


# ---- resume: which config changes keep a run's meaning --------------------------------------------------
# Safe to change when resuming (operational, or what the run does from now on). Everything else (method,
# model, seed, loss, lr, batch sizes, ...) changes what the checkpoint's numbers mean and is refused.
RESUME_SAFE = frozenset({
    "out", "threads", "eval.every", "drift.every", "checkpoint_every", "keep_checkpoints", "verify_timeout_s",
    "verifier_error_window", "max_verifier_error_share", "oversize_problems", "allow_unsafe_execution",
    "fast.reflection_timeout_s",
    "fast.reflection_retries", "fast.max_reply_chars", "fast.max_prompt_chars", "report_to",
})


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys (``{"slow": {"lr": 1}}`` -> ``{"slow.lr": 1}``)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _default(path: str) -> Any:
    """The default of the config field at dotted ``path`` (a sentinel when it has none)."""
    model: Any = Config
    field = None
    for part in path.split("."):
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return _NO_DEFAULT
        field = fields[part]
        model = field.annotation
    default = field.get_default(call_default_factory=True)
    return default.model_dump(mode="json") if isinstance(default, BaseModel) else (
        list(default) if isinstance(default, tuple) else default)


_NO_DEFAULT = object()


def resume_changes(old: dict, new: dict, step: int) -> dict[str, list]:
    """Compare a checkpoint's config with the one resuming it at loop step ``step``.

    Returns the safe changes as ``{field: [old, new]}`` (to be logged); raises :class:`ConfigError` naming
    every field whose change would mix two runs: anything outside :data:`RESUME_SAFE`, and stages the run
    has already trained (before ``step``), the current stage's task, or a stream shorter than ``step``.
    Stages after ``step`` may change: that is the future of the stream.
    """
    old_stages, new_stages = old.get("stages", []), new.get("stages", [])
    flat_old = flatten({k: v for k, v in old.items() if k != "stages"})
    flat_new = flatten({k: v for k, v in new.items() if k != "stages"})
    changed = {k: [flat_old.get(k), flat_new.get(k)] for k in sorted(flat_old.keys() | flat_new.keys())
               if flat_old.get(k) != flat_new.get(k)
               # a field newer than the checkpoint, at its default: what the older version did
               and not (k not in flat_old and flat_new.get(k) == _default(k))}
    refused = [k for k in changed if k not in RESUME_SAFE and not k.startswith("serve.")]  # serve: not training
    start = 0
    for i, stage in enumerate(old_stages):
        end = start + stage["steps"]
        last = i == len(old_stages) - 1  # the last stage may be lengthened (or shortened to what is done)
        if end <= step and not last:  # trained to its end: must be unchanged
            if i >= len(new_stages) or new_stages[i] != stage:
                refused.append(f"stages.{i}")
        elif start <= step:  # the current stage: same task, long enough for what was already trained
            if i >= len(new_stages) or new_stages[i]["task"] != stage["task"]:
                refused.append(f"stages.{i}.task")
        start = end
    if sum(s["steps"] for s in new_stages) < step:
        refused.append(f"stages (the checkpoint is at step {step})")
    if refused:
        shown = ", ".join(dict.fromkeys(refused))
        raise ConfigError(
            f"--resume with a config that changes what the run means: {shown[:MAX_QUOTE]} "
            "(start a new run, or resume with the original values)"
        )
    if old_stages != new_stages:
        changed["stages"] = [old_stages, new_stages]
    return changed


def resume_task_changes(old: dict[str, str], new: dict[str, str], step: int) -> None:
    """Refuse a resume whose tasks hold other problems than the checkpoint's (the same spec, a file edited under
    the same path): the rows before and after would be about different data. ``old``/``new``: content hash by
    task name (:func:`fastslow.tasks.content_hash`); a task the checkpoint did not know is new, not changed."""
    changed = [name for name, digest in new.items() if name in old and old[name] != digest]
    if changed:
        raise ConfigError(
            f"--resume: the problems of task {', '.join(map(repr, changed))[:MAX_QUOTE]} changed since the "
            f"checkpoint at step {step} (its file was edited?): restore them, or start a new run"
        )
