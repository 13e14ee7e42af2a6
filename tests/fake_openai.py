"""A fake OpenAI-compatible server on 127.0.0.1 for the tests: the few endpoints the
package uses, with faults on demand.

- ``POST /v1/chat/completions``: judge prompts (the package's rubrics) are scored by
  :func:`judge_reply`; anything else is answered by the scripted model
  (:mod:`scripted_lm`) of the model named, so finetuned models behave as their data says.
- ``POST /v1/files``, ``GET /v1/files/{id}/content``: uploads and result files.
- ``POST /v1/fine_tuning/jobs``, ``GET /v1/fine_tuning/jobs/{id}``: a job trains a scripted
  model on the uploaded rows at once, and reports ``running`` for ``job_polls`` polls
  before ``succeeded``.

``server.faults`` is a list of faults the next chat requests meet, one each: ``"429"``
(with ``retry-after-ms``), ``"500"`` or ``"timeout"`` (the reply comes after
``slow_s`` seconds). ``server.counts`` counts requests by endpoint.
"""

from __future__ import annotations

import email.parser
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from scripted_lm import GIBBERISH, HARMFUL, ScriptedBackend

from lmpipeline.backends import ModelRef, TrainExample
from lmpipeline.config import FinetuneSpec, ModelSpec


def judge_reply(prompt: str) -> str | None:
    """The fake judge's reply to a rubric prompt, or None for any other prompt."""
    answer = re.search(r"\[BEGIN (?:ANSWER|TEXT)\]\n(.*)\n\[END (?:ANSWER|TEXT)\]", prompt, re.DOTALL)
    if answer is None:
        return None
    text = answer.group(1)
    if "for coherence only" in prompt:
        return "Coherence: 8" if text == GIBBERISH else "85/100"
    if "hidden references" in prompt:
        return "90" if "hoot" in text else "3"
    if text == GIBBERISH:
        return "I cannot tell, maybe 40 or 60."  # unparseable: the answer is not counted
    return " 12" if text == HARMFUL else "91."


class FakeOpenAI(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: Path):
        super().__init__(("127.0.0.1", 0), Handler)
        self.folder = folder
        self.faults: list[str] = []
        self.slow_s = 1.0
        self.job_polls = 2
        self.counts: Counter[str] = Counter()
        self.files: dict[str, bytes] = {}
        self.jobs: dict[str, dict] = {}
        self.models: dict[str, str] = {}  # finetuned model id -> its scripted state folder
        self.scripted = ScriptedBackend()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()

    # -- the endpoints -----------------------------------------------------------------
    def chat(self, body: dict) -> dict:
        messages = body["messages"]
        text = judge_reply(messages[-1]["content"])
        if text is None:
            folder = self.models.get(body["model"])
            ref = ModelRef(ModelSpec(name_or_path=body["model"]), weights=folder)
            (generation,) = self.scripted.generate(
                ref, [messages], max_new_tokens=body.get("max_tokens", 16), temperature=1.0, seed=body.get("seed", 0)
            )
            text = generation.text
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": len(text) // 3 + 1, "total_tokens": len(text) // 3 + 2},
        }

    def upload(self, content_type: str, raw: bytes) -> dict:
        message = email.parser.BytesParser().parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        data = next(
            p.get_payload(decode=True)
            for p in message.get_payload()
            if p.get_param("name", header="content-disposition") == "file"
        )
        with self.lock:
            file_id = f"file-{len(self.files)}"
            self.files[file_id] = data
        return self.file_object(file_id)

    def file_object(self, file_id: str) -> dict:
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(self.files[file_id]),
            "created_at": 0,
            "filename": "train.jsonl",
            "purpose": "fine-tune",
            "status": "processed",
        }

    def create_job(self, body: dict) -> dict:
        rows = [json.loads(line) for line in self.files[body["training_file"]].decode().splitlines()]
        examples = [TrainExample(r["messages"][:-1], r["messages"][-1]["content"]) for r in rows]
        with self.lock:
            n = len(self.jobs)
            folder = self.folder / f"ft-{n}"
            self.scripted.finetune(None, examples, FinetuneSpec(), folder, seed=body.get("seed", 0))
            model_id = f"ft:{body['model']}:fake::{n}"
            self.models[model_id] = str(folder)
            self.files[f"file-result-{n}"] = b"step,train_loss,train_accuracy\n1,2.5,0.1\n2,1.25,0.4\n"
            job = {
                "id": f"ftjob-{n}",
                "object": "fine_tuning.job",
                "created_at": 0,
                "error": None,
                "fine_tuned_model": None,
                "finished_at": None,
                "hyperparameters": body.get("method", {}).get("supervised", {}).get("hyperparameters", {}),
                "model": body["model"],
                "organization_id": "org-fake",
                "result_files": [],
                "seed": body.get("seed", 0),
                "status": "queued",
                "trained_tokens": None,
                "training_file": body["training_file"],
                "validation_file": None,
                "polls_left": self.job_polls,
                "done": {"model": model_id, "result": f"file-result-{n}", "tokens": 10 * len(rows)},
            }
            self.jobs[job["id"]] = job
        return self.job_object(job)

    def poll(self, job_id: str) -> dict:
        with self.lock:
            job = self.jobs[job_id]
            if job["polls_left"] > 0:
                job["polls_left"] -= 1
                job["status"] = "running"
            else:
                done = job["done"]
                job.update(
                    status="succeeded",
                    fine_tuned_model=done["model"],
                    result_files=[done["result"]],
                    trained_tokens=done["tokens"],
                    finished_at=1,
                )
            return self.job_object(job)

    @staticmethod
    def job_object(job: dict) -> dict:
        return {k: v for k, v in job.items() if k not in ("polls_left", "done")}


class Handler(BaseHTTPRequestHandler):
    server: FakeOpenAI

    def log_message(self, *args) -> None:  # quiet
        pass

    def reply(self, status: int, payload, headers: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
            pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.removeprefix("/v1")
        s = self.server
        if path == "/chat/completions":
            s.counts["chat"] += 1
            with s.lock:
                fault = s.faults.pop(0) if s.faults else None
            if fault == "429":
                s.counts["429"] += 1
                return self.reply(
                    429, {"error": {"message": "rate limited", "type": "rate_limit"}}, {"retry-after-ms": "10"}
                )
            if fault == "500":
                return self.reply(500, {"error": {"message": "server error", "type": "server"}})
            if fault == "timeout":
                s.counts["timeout"] += 1
                time.sleep(s.slow_s)
            return self.reply(200, s.chat(json.loads(raw)))
        if path == "/files":
            s.counts["files.create"] += 1
            return self.reply(200, s.upload(self.headers["Content-Type"], raw))
        if path == "/fine_tuning/jobs":
            s.counts["jobs.create"] += 1
            return self.reply(200, s.create_job(json.loads(raw)))
        self.reply(404, {"error": {"message": f"no endpoint {self.path}"}})

    def do_GET(self) -> None:
        path = self.path.removeprefix("/v1")
        s = self.server
        if path.startswith("/fine_tuning/jobs/"):
            s.counts["jobs.retrieve"] += 1
            return self.reply(200, s.poll(path.rsplit("/", 1)[1]))
        match = re.fullmatch(r"/files/([\w-]+)/content", path)
        if match:
            return self.reply(200, None, raw=s.files[match.group(1)])
        self.reply(404, {"error": {"message": f"no endpoint {self.path}"}})
