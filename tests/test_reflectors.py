"""Every reflector kind offline: a local OpenAI-compatible server, replay, hf on the tiny model, feedback;
the preflight check and the stop rule for a dead fast channel."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from conftest import small_config
from typer.testing import CliRunner

from fastslow.cli import app
from fastslow.config import ConfigError, FastConfig
from fastslow.loop import Trainer, TrainingError
from fastslow.reflect import make_reflector
from fastslow.reflectors import FeedbackReflector, prompt_hash

GEPA_PROMPT = """I provided an assistant with the following instructions to perform a task for me:
```
Solve the problem.
```

The following are examples:
```
# Example 1
## Inputs
Calculate 2 + 3.

## Generated Outputs
6

## Feedback
No <answer> tag; read '6'. Expected answer: 5
Put the final answer alone inside <answer></answer> tags: <answer>42</answer>.

# Example 2
## Inputs
Calculate 4 - 1.

## Generated Outputs
<answer>3</answer>

## Feedback
Correct: '3'.

# Example 3
## Inputs
Calculate 5 + -4.

## Generated Outputs
5 + -4 = 11

## Feedback
Answer '11' is wrong. Expected answer: 1
```

Provide the new instructions within ``` blocks."""


class _Server:
    """A minimal OpenAI-compatible /chat/completions server on 127.0.0.1 that records what it was sent."""

    def __init__(self) -> None:
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                text = "```\nAdd the numbers and answer inside <answer></answer>.\n```"
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def test_openai_reflector_talks_to_a_local_server_and_records_for_replay(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_LOCAL_KEY", "local-secret-value")
    record = tmp_path / "calls.jsonl"
    cfg = FastConfig(reflector="openai:tiny-chat", reflector_base_url=server.url, reflector_key_env="MY_LOCAL_KEY",
                     reflection_max_tokens=64, reflection_record=str(record))
    lm = make_reflector(cfg.reflector, cfg)
    reply = lm(GEPA_PROMPT)
    assert "<answer>" in reply
    sent = server.seen[0]
    assert sent["path"] == "/v1/chat/completions" and sent["body"]["model"] == "tiny-chat"
    assert sent["body"]["max_tokens"] == 64 and sent["body"]["messages"][0]["content"] == GEPA_PROMPT
    assert sent["auth"] == "Bearer local-secret-value"
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert rows == [{"hash": prompt_hash(GEPA_PROMPT), "prompt": GEPA_PROMPT, "reply": reply}]

    server.close()  # replay needs no server: the recorded reply comes back, an unknown prompt is an error
    replay = make_reflector(f"replay:{record}", FastConfig(reflector=f"replay:{record}"))
    assert replay(GEPA_PROMPT) == reply
    with pytest.raises(KeyError):
        replay("a prompt never recorded")


def test_openai_reflector_without_key_for_a_remote_server_fails_its_first_call(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    lm = make_reflector("openai:gpt-4o-mini", FastConfig(reflector="openai:gpt-4o-mini"))  # building needs no key
    with pytest.raises(ConfigError, match="no OPENAI_API_KEY"):  # the preflight makes this call before step 0
        lm(GEPA_PROMPT)


def test_hf_reflector_on_the_tiny_model(tiny_model):
    cfg = FastConfig(reflector=f"hf:{tiny_model}", reflection_max_tokens=12)
    lm = make_reflector(cfg.reflector, cfg)
    first = lm([{"role": "user", "content": "Improve: ```Answer.```"}])
    assert isinstance(first, str) and first == lm([{"role": "user", "content": "Improve: ```Answer.```"}])
    assert 0 < len(first.replace(" ", "")) <= 12  # the character tokenizer decodes with spaces between tokens
    with pytest.raises(ConfigError, match="hf:/no/such/dir"):
        make_reflector("hf:/no/such/dir", cfg)


def test_feedback_reflector_mines_rules_and_worked_examples_from_failures():
    reply = make_reflector("feedback", FastConfig(reflector="feedback"))(GEPA_PROMPT)
    text = reply.strip().strip("`").strip()
    assert text.startswith("Solve the problem.")
    assert "Put the final answer alone inside <answer></answer> tags" in text  # the format rule feedback stated
    assert "Input: Calculate 2 + 3.\nAnswer: 5" in text  # the failure, with the expected answer
    assert "Input: Calculate 5 + -4.\nAnswer: 1" in text
    assert "4 - 1" not in text  # a success teaches nothing new
    assert "is wrong" not in text  # verdicts are not rules
    again = FeedbackReflector()(GEPA_PROMPT.replace("Solve the problem.", text))
    assert again.count("Calculate 2 + 3.") == 1  # examples are not added twice


def _broken(prompt):
    raise ConnectionError("server unreachable")


@pytest.mark.parametrize(("reflector", "says"), [("test_reflectors:_broken", "server unreachable"),
                                                ("openai:gpt-4o-mini", "no OPENAI_API_KEY")])
def test_preflight_stops_a_run_whose_reflector_cannot_work(tiny_model, tmp_path, monkeypatch, reflector, says):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    runner = CliRunner()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {tiny_model}}}\nstages: [{{task: 'conftest:vowel_task', steps: 2}}]\n"
                   f"fast: {{reflector: '{reflector}'}}\n")
    result = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "fast.reflector" in result.output and says in result.output
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # nothing was spent


def test_all_failed_rounds_stop_the_run_and_keep_the_checkpoint(tiny_model, tmp_path):
    cfg = small_config(tiny_model, tmp_path / "r", steps=8, extra=[
        "fast.reflector=test_reflectors:_broken", "fast.preflight=false", "fast.stop_after_failed_rounds=2",
        "fast.reflection_retries=0", "checkpoint_every=1"])
    trainer = Trainer(cfg, log=lambda m: None)
    with pytest.raises(TrainingError, match="every reflection call failed in 2 consecutive rounds"):
        trainer.run()
    assert trainer.state.step == 2  # rounds at steps 0 and 2: stopped before the third step's update
    assert any((tmp_path / "r" / "checkpoints").iterdir())
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    fast_rows = [r for r in rows if "fast/failed_reflection_calls" in r]
    assert fast_rows and fast_rows[-1]["fast/failed_reflection_calls"] > 0 and fast_rows[-1]["fast/accepted_total"] == 0


def test_hf_reflector_on_a_missing_folder_says_so(tmp_path):
    with pytest.raises(ConfigError, match="fast.reflector.*no model folder at"):
        make_reflector(f"hf:{tmp_path / 'missing'}", FastConfig())


def test_a_local_openai_compatible_server_needs_no_key():
    from fastslow.reflectors import OpenAIReflector

    local = ["http://[::1]:8000/v1", "http://localhost:8000/v1", "http://127.0.0.1/v1"]
    assert not any(OpenAIReflector("m", base_url=u, key_env="K").needs_key() for u in local)
    assert OpenAIReflector("m", base_url="https://api.example.com/v1", key_env="K").needs_key()
