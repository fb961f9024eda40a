"""Reflection models that work offline: ``feedback``, ``hf:<model>``, ``openai:<model>`` (any OpenAI-compatible
server), and record/replay of any of them.

A reflection model takes GEPA's reflection prompt (a string, or chat messages) and returns text holding the new
prompt inside triple backticks. Each kind here registers in :mod:`fastslow.registry` when :mod:`fastslow.reflect`
is imported; settings come from ``FastConfig`` (``reflection_max_tokens``, ``reflection_temperature``,
``reflector_base_url``, ``reflector_key_env``, ``reflection_record``, ``reflection_replay``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from fastslow.config import ConfigError

FIELD = "field 'fast.reflector'"


def prompt_text(prompt: Any) -> str:
    """The reflection prompt as one string (chat messages are joined by role)."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)


def _messages(prompt: Any) -> list[dict[str, str]]:
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]


def _setting(cfg: Any, name: str) -> Any:
    """``cfg.<name>`` (a FastConfig, or any object that has it), else FastConfig's own default: one source."""
    from fastslow.config import FastConfig

    default = FastConfig.model_fields[name].default
    return getattr(cfg, name, default) if cfg is not None else default


# ---- feedback: no language model ------------------------------------------------------------------
_BLOCK = re.compile(r"```(.*?)```", re.DOTALL)
_EXPECTED = re.compile(r"[Ee]xpected(?: answer)?:?\s*(.+?)\s*$")
# Imperative format rules ("Put the final answer ...", "Answer with ..."); verdicts ("Answer '8' is wrong") are not.
_RULE = re.compile(r"^((?:Put|Give|Reply|Use|Write|Format|Answer (?:with|only|in))\b[^.\n]*(?:\.|$))", re.MULTILINE)
_RECORD = re.compile(r"^#+ Example \d+\s*$", re.MULTILINE)


class FeedbackReflector:
    """Builds the next prompt from the verifier's feedback on the minibatch, with no language model.

    The new prompt is the current instruction (GEPA puts it between the first triple backticks), then
    the answer-format rules the feedback states (sentences such as "Put the final answer inside ..."),
    then up to ``examples`` worked examples mined from the failures: the problem's input and the answer
    the feedback says was expected. Examples already in the prompt are not added twice, and the prompt
    keeps at most ``max_examples`` of them (the newest), so it cannot grow without bound.
    """

    def __init__(self, examples: int = 2, max_examples: int = 4, max_input_chars: int = 300) -> None:
        self.examples, self.max_examples, self.max_input_chars = examples, max_examples, max_input_chars

    @staticmethod
    def _records(text: str) -> list[dict[str, str]]:
        """GEPA's reflective dataset as rendered in the prompt: '# Example i' then '## <key>' sections."""
        records = []
        for chunk in _RECORD.split(text)[1:]:
            fields: dict[str, str] = {}
            for part in re.split(r"^## ", chunk, flags=re.MULTILINE)[1:]:
                key, _, value = part.partition("\n")
                fields[key.strip()] = value.strip()
            records.append(fields)
        return records

    def __call__(self, prompt: Any) -> str:
        text = prompt_text(prompt)
        blocks = _BLOCK.findall(text)
        current = blocks[0].strip() if blocks else ""
        instruction, _, old = current.partition("\n\nExamples:")
        rules = [line for line in instruction.split("\n") if line.strip()]
        examples = [e for e in old.strip().split("\n\n") if e.strip()] if old else []
        added = 0
        for rec in self._records(text):
            feedback = rec.get("Feedback", "")
            for rule in _RULE.findall(feedback):
                if rule.strip() and rule.strip() not in "\n".join(rules):
                    rules.append(rule.strip())
            expected = next((m.group(1) for line in feedback.splitlines() if (m := _EXPECTED.search(line))), None)
            if expected is None or added >= self.examples:
                continue
            problem = " ".join(rec.get("Inputs", "").split())[: self.max_input_chars]
            answer = expected.rstrip(".").strip("'\"")
            example = f"Input: {problem}\nAnswer: {answer}"
            if problem and example not in examples:
                examples.append(example)
                added += 1
        examples = examples[-self.max_examples:]
        body = "\n".join(rules) + ("\n\nExamples:\n" + "\n\n".join(examples) if examples else "")
        return f"```\n{body.strip()}\n```"


# ---- hf: a local transformers model ---------------------------------------------------------------
class HFReflector:
    """A local transformers causal LM as reflection model: chat template, greedy or sampled.

    ``path``: a model folder (or an alias resolved to one). The weights load at the first call, once, so
    validating a config (``--dry-run``) never loads a second model; the run's preflight call loads it.
    """

    def __init__(self, path: str, *, max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0) -> None:
        self.path, self.tokenizer, self.model = path, None, None
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self._lock = threading.Lock()  # GEPA may call from a timeout thread; one generate at a time

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from fastslow.registry import resolve_model

        local = resolve_model(self.path)
        self.tokenizer = AutoTokenizer.from_pretrained(local)
        self.model = AutoModelForCausalLM.from_pretrained(local).eval()

    def __call__(self, prompt: Any) -> str:
        import torch

        with self._lock:
            if self.model is None:
                self._load()
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(_messages(prompt), add_generation_prompt=True, tokenize=False)
        else:
            text = prompt_text(prompt) + "\n"
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {
            "do_sample": False}
        with self._lock, torch.no_grad():
            torch.manual_seed(self.seed)
            out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=tok.pad_token_id or tok.eos_token_id, **sampling)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


# ---- openai: any OpenAI-compatible chat-completions server ---------------------------------------
class OpenAIReflector:
    """POST ``{base_url}/chat/completions`` (the OpenAI wire format that vLLM, llama.cpp, Ollama... serve).

    The key is read from the environment variable ``key_env`` at each call and never stored; a server
    on localhost needs none.
    """

    def __init__(self, model: str, *, base_url: str, key_env: str, max_tokens: int = 512,
                 temperature: float = 0.0, timeout_s: float = 120.0) -> None:
        self.model, self.base_url, self.key_env = model, base_url.rstrip("/"), key_env
        self.max_tokens, self.temperature, self.timeout_s = max_tokens, temperature, timeout_s

    def __call__(self, prompt: Any) -> str:
        body = {"model": self.model, "messages": _messages(prompt), "max_tokens": self.max_tokens,
                "temperature": self.temperature}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.key_env)
        if not key and self.needs_key():
            raise ConfigError(f"no {self.key_env} in the environment (set it, or set fast.reflector_base_url "
                              "to a local OpenAI-compatible server)")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(f"{self.base_url}/chat/completions", json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode("utf-8", "replace")
            raise RuntimeError(f"{self.base_url}: HTTP {exc.code}: {detail}") from None
        return reply["choices"][0]["message"]["content"]

    def needs_key(self) -> bool:
        return urllib.parse.urlsplit(self.base_url).hostname not in ("localhost", "127.0.0.1", "::1")

    def __repr__(self) -> str:
        return f"OpenAIReflector({self.model} at {self.base_url})"


# ---- record / replay ------------------------------------------------------------------------------
def prompt_hash(prompt: Any) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:32]


class Recording:
    """Appends every (prompt hash, prompt, reply) of ``lm`` to a JSONL file, one line per call.

    What is written is redacted (a server that echoes the Authorization header must not put the key on disk)
    and capped: a reply longer than ``max_reply_chars`` (a reflection error anyway) is recorded as that error,
    not stored, so the recording cannot grow by a server's whim.
    """

    def __init__(self, lm: Any, path: str | Path, max_reply_chars: int | None = None) -> None:
        self.lm, self.path = lm, Path(path)
        self.max_reply_chars = max_reply_chars or _setting(None, "max_reply_chars")
        self._lock = threading.Lock()

    def __call__(self, prompt: Any) -> str:
        from fastslow.util import redact

        reply = self.lm(prompt)
        row: dict[str, Any] = {"hash": prompt_hash(prompt), "prompt": redact(prompt_text(prompt))}
        if isinstance(reply, str) and len(reply) > self.max_reply_chars:
            row["error"] = f"reply of {len(reply)} characters exceeds fast.max_reply_chars={self.max_reply_chars}"
        else:
            row["reply"] = redact(reply) if isinstance(reply, str) else reply
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        return reply


class Replay:
    """Answers from a recording; a prompt that was never recorded goes to ``fallback`` or is an error."""

    def __init__(self, path: str | Path, fallback: Any = None) -> None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"field 'fast.reflection_replay': no recording at {p}")
        self.replies: dict[str, str | BaseException] = {}
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"field 'fast.reflection_replay': {p} is not UTF-8 text (byte {exc.start}): "
                              "not a recording") from None
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    self.replies[row["hash"]] = row["reply"] if "error" not in row else RuntimeError(row["error"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(f"field 'fast.reflection_replay': {p} line {lineno} is malformed") from None
        self.fallback, self.hits, self.misses = fallback, 0, 0

    def __call__(self, prompt: Any) -> str:
        key = prompt_hash(prompt)
        if key in self.replies:
            self.hits += 1
            reply = self.replies[key]
            if isinstance(reply, BaseException):  # recorded as a failed call: it fails again
                raise reply
            return reply
        self.misses += 1
        if self.fallback is None:
            raise KeyError(f"reflection prompt {key} is not in the recording")
        return self.fallback(prompt)


# ---- registration -----------------------------------------------------------------------------------
def _feedback(rest: str, cfg: Any = None) -> FeedbackReflector:
    return FeedbackReflector()


def _hf(rest: str, cfg: Any = None) -> HFReflector:
    if not rest:
        raise ConfigError(f"{FIELD}: hf: needs a model path or alias, e.g. hf:smollm2-135m")
    from fastslow.preflight import check_model_spec

    rest = check_model_spec(rest, f"{FIELD} 'hf:{rest}'")  # a missing folder says so, not "bad repo id"
    # A folder that holds no loadable model fails at the first call: the run's preflight call, one line.
    return HFReflector(rest, max_new_tokens=_setting(cfg, "reflection_max_tokens"),
                       temperature=_setting(cfg, "reflection_temperature"))


def _openai(rest: str, cfg: Any = None) -> Any:
    if not rest:
        raise ConfigError(f"{FIELD}: openai: needs a model name, e.g. openai:gpt-4o-mini")
    base_url = _setting(cfg, "reflector_base_url") or "https://api.openai.com/v1"
    key_env = _setting(cfg, "reflector_key_env") or "OPENAI_API_KEY"
    from fastslow.util import add_secret_env

    add_secret_env(key_env)
    lm = OpenAIReflector(rest, base_url=base_url, key_env=key_env,
                         max_tokens=_setting(cfg, "reflection_max_tokens"),
                         temperature=_setting(cfg, "reflection_temperature"),
                         timeout_s=_setting(cfg, "reflection_timeout_s"))
    return lm  # a missing key is reported by the first call (the run's preflight), not here: dry runs need none


def wrap_record_replay(lm: Any, cfg: Any) -> Any:
    """``fast.reflection_replay`` answers from a recording (unrecorded prompts go to ``lm``, if any);
    ``fast.reflection_record`` appends every call to a JSONL file."""
    replay, record = _setting(cfg, "reflection_replay"), _setting(cfg, "reflection_record")
    if replay:
        lm = Replay(replay, fallback=lm)
    if record:
        lm = Recording(lm, record, max_reply_chars=_setting(cfg, "max_reply_chars"))
    return lm


def replay_only(rest: str, cfg: Any = None) -> Replay:
    """``replay:<file.jsonl>``: answers only from the recording; an unrecorded prompt is a reflection error."""
    if not rest:
        raise ConfigError(f"{FIELD}: replay: needs a recording, e.g. replay:runs/x/reflections.jsonl")
    return Replay(rest)


def register() -> None:
    from fastslow import registry

    registry.register_reflector("feedback", _feedback, "prompt built from the verifier's feedback (no LM)")
    registry.register_reflector("hf:", _hf, "a local transformers model: hf:<path or alias>")
    registry.register_reflector("openai:", _openai, "an OpenAI-compatible server (fast.reflector_base_url)")
    registry.register_reflector("replay:", replay_only, "replies replayed from a recorded JSONL")
