"""One proposal from each reflector kind on a real task: SmolLM2-135M on rg:basic_arithmetic.

    fastslow models fetch smollm2-135m && python benchmarks/reflector_examples.py [OUT.json [feedback]]

The reflection prompt is GEPA's own, rendered from the model's real (greedy) answers and the verifier's
feedback. Kinds: feedback; hf:smollm2-135m; openai:smollm2 against a local OpenAI-compatible server that
serves the same model (127.0.0.1, no network), recorded; replay: of that recording.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from gepa.strategies.instruction_proposal import InstructionProposalSignature

from fastslow.config import FastConfig, ModelConfig
from fastslow.policy import Policy
from fastslow.reflect import make_reflector
from fastslow.rollout import PolicySampler
from fastslow.tasks import load_task

TASK = "rg:basic_arithmetic?max_terms=2&max_digits=1&operators=+,-&extract=last_number&train=64&eval=8"


def reflection_prompt() -> str:
    task = load_task(TASK)
    policy = Policy.load(ModelConfig(path="smollm2-135m"))
    problems = list(task.problems("train"))[:16]
    scored = PolicySampler(policy)(task, [(task.seed_prompt, p) for p in problems], temperature=0.0,
                                   max_new_tokens=32, seed=0)
    records = [{"Inputs": p.prompt, "Generated Outputs": out, "Feedback": v.feedback}
               for p, out, v in zip(problems, scored.batch.texts, scored.verdicts, strict=True)]
    # GEPA reflects on minibatches with room to improve (it skips perfect ones): failures first, 3 records.
    records = sorted(records, key=lambda r: r["Feedback"].startswith("Correct"))[:3]
    return InstructionProposalSignature.prompt_renderer(
        {"current_instruction_doc": task.seed_prompt, "dataset_with_feedback": records})


def serve(lm) -> HTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = lm(body["messages"])
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def main(out: str | None, kinds: str = "all") -> None:
    prompt = reflection_prompt()
    proposals = {"prompt": prompt}
    proposals["feedback"] = make_reflector("feedback", FastConfig(reflector="feedback"))(prompt)
    if kinds == "feedback":
        print(json.dumps(proposals, indent=2))
        return
    hf_cfg = FastConfig(reflector="hf:smollm2-135m", reflection_max_tokens=160)
    hf = make_reflector(hf_cfg.reflector, hf_cfg)
    proposals["hf:smollm2-135m"] = hf(prompt)
    httpd = serve(hf)
    record = Path(tempfile.mkdtemp()) / "reflections.jsonl"
    oa_cfg = FastConfig(reflector="openai:smollm2", reflector_base_url=f"http://127.0.0.1:{httpd.server_port}/v1",
                        reflection_record=str(record))
    proposals["openai:smollm2 (local server)"] = make_reflector(oa_cfg.reflector, oa_cfg)(prompt)
    httpd.shutdown()
    proposals["replay"] = make_reflector(f"replay:{record}", FastConfig(reflector=f"replay:{record}"))(prompt)
    text = json.dumps(proposals, indent=2)
    if out:
        Path(out).write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None, *sys.argv[2:3])
