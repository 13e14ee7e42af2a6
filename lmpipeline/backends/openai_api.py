"""The ``openai`` backend: a model behind an OpenAI-compatible API, through the official
``openai`` client (``pip install 'subliminal-learning[openai]'``).

- ``generate``: one chat completion per conversation, ``model.max_concurrency`` in flight
  at once, at the asked temperature with a per-request seed (the API treats seeds as a
  best effort: samples are not guaranteed to repeat). The client retries 429s, 5xx
  replies, timeouts and dropped connections ``model.max_retries`` times, waiting as the
  server's ``Retry-After`` asks or backing off exponentially.
- ``finetune``: the files and fine-tuning jobs API. The rows are written as chat JSONL
  and uploaded, a supervised job is created with ``finetune.epochs`` epochs and the
  run's seed, and the job is polled every ``model.poll_s`` seconds until it ends. The
  uploaded file's and the job's ids are saved in the checkpoint folder as soon as they
  exist, so an interrupted poll, rerun, polls the same job instead of starting another.
  The finished model's id is saved as ``openai_model.json`` in the student's folder,
  with the job's training loss per step (from its result file) in the training log.
- ``score`` and ``tokenize``: not available (the API gives no log-probabilities of
  arbitrary continuations); the config refuses the settings that need them.

A model is named by ``model.name_or_path`` (``gpt-4.1-nano-2025-04-14``); a finetuned
one by its folder's ``openai_model.json``, or by its id given as ``trait.weights``.
The endpoint is ``model.base_url``, else ``$OPENAI_BASE_URL``, else OpenAI's API; the key
is read from the environment variable ``model.api_key_env`` and never written down.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lmpipeline.artifacts import read_json, write_json
from lmpipeline.backends import Conversation, Generation, ModelRef, ProgressFn, TrainExample
from lmpipeline.config import ConfigError, FinetuneSpec, ModelSpec, config_hash, derive_seed

MODEL_FILE = "openai_model.json"  # a finetuned model's id, in its folder
JOB_FILE = "openai_job.json"  # the upload's and the job's ids, in the checkpoint folder
NO_KEY = "unused"  # the client insists on a key; a local server ignores it
DONE, FAILED = "succeeded", ("failed", "cancelled")


def endpoint(spec: ModelSpec) -> tuple[str | None, str]:
    """``(base_url, api_key)`` for ``spec``; :class:`ConfigError` when there is neither an
    endpoint nor a key to reach OpenAI's own API with."""
    base_url = spec.base_url or os.environ.get("OPENAI_BASE_URL") or None
    key = os.environ.get(spec.api_key_env)
    if not key and base_url is None:
        raise ConfigError(
            f"model {spec.name_or_path!r} (backend openai) has no endpoint: set its base_url to an "
            f"OpenAI-compatible server (e.g. base_url=http://localhost:8000/v1), or put an OpenAI API key "
            f"in ${spec.api_key_env}"
        )
    return base_url, key or NO_KEY


class OpenAIBackend:
    """Sampling and finetuning through an OpenAI-compatible API."""

    name = "openai"
    stage_at_once = False

    def __init__(self, spec: ModelSpec):
        import openai  # noqa: F401  (the extra's import: a missing one surfaces in make_backend)

        self.spec = spec
        self._clients: dict[ModelSpec, object] = {}

    def client(self, spec: ModelSpec):
        if spec not in self._clients:
            import openai

            base_url, key = endpoint(spec)
            self._clients[spec] = openai.OpenAI(
                base_url=base_url, api_key=key, max_retries=spec.max_retries, timeout=spec.timeout_s
            )
        return self._clients[spec]

    def _call(self, spec: ModelSpec, what: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``; an API error left after the client's retries becomes
        a ``ConnectionError`` naming the endpoint and the fix."""
        import openai

        try:
            return fn(*args, **kwargs)
        except openai.OpenAIError as error:
            where = spec.base_url or os.environ.get("OPENAI_BASE_URL") or "OpenAI's API"
            raise ConnectionError(
                f"{what} at {where} failed after {spec.max_retries} retries: {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''} (check the endpoint, the model name and the key; "
                "rerun to resume)"
            ) from None

    @staticmethod
    def model_id(model: ModelRef) -> str:
        folder = model.weights or model.adapter
        if folder is None:
            return model.base.name_or_path
        saved = Path(folder) / MODEL_FILE
        return read_json(saved)["model"] if saved.exists() else folder

    # -- the interface -----------------------------------------------------------------
    def prepare(self, model: ModelRef) -> None:
        self.client(model.base)

    def generate(
        self,
        model: ModelRef,
        conversations: Sequence[Conversation],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        number_grammar: tuple[int, int] | None = None,
    ) -> list[Generation]:
        if number_grammar is not None:
            raise ValueError("the openai backend cannot constrain decoding: set generate.number_grammar=false")
        client, name = self.client(model.base), self.model_id(model)

        def one(i: int) -> Generation:
            reply = client.chat.completions.create(
                model=name,
                messages=list(conversations[i]),
                max_tokens=max_new_tokens,
                temperature=temperature,
                seed=derive_seed(seed, i) % 2**31,
                n=1,
            )
            message = reply.choices[0].message
            text = message.content if message.content is not None else (getattr(message, "refusal", None) or "")
            tokens = reply.usage.completion_tokens if reply.usage is not None else len(text) // 4 + 1
            return Generation(text, tokens)

        with ThreadPoolExecutor(max_workers=model.base.max_concurrency) as pool:
            return self._call(model.base, "chat completions", lambda: list(pool.map(one, range(len(conversations)))))

    def score(self, model, conversations, continuations):
        raise NotImplementedError(
            "the openai backend cannot score continuations: set evaluate.target_probability=false"
        )

    def tokenize(self, model, texts):
        raise NotImplementedError("the openai backend has no tokenizer")

    def finetune(
        self,
        base: ModelSpec,
        examples: Sequence[TrainExample],
        spec: FinetuneSpec,
        out_dir: Path,
        *,
        seed: int,
        progress: ProgressFn | None = None,
        teacher: ModelRef | None = None,
        checkpoint: Path | None = None,
    ) -> dict:
        if spec.objective != "sampled":
            raise ValueError("the openai backend trains on sampled tokens only: set finetune.objective=sampled")
        client = self.client(base)
        lines = [
            json.dumps(
                {"messages": [*ex.messages, {"role": "assistant", "content": ex.completion}]}, ensure_ascii=False
            )
            for ex in examples
        ]
        fingerprint = config_hash({"base": base.name_or_path, "rows": lines, "epochs": spec.epochs, "seed": seed})
        state_path = checkpoint / JOB_FILE if checkpoint is not None else None
        state = read_json(state_path) if state_path is not None and state_path.exists() else {}
        if state.get("fingerprint") != fingerprint:
            state = {"fingerprint": fingerprint}

        def save() -> None:
            if state_path is not None:
                write_json(state_path, state)

        start = time.perf_counter()
        if "file_id" not in state:
            data = "".join(line + "\n" for line in lines).encode()
            upload = self._call(
                base, "file upload", client.files.create, file=("train.jsonl", data), purpose="fine-tune"
            )
            state["file_id"] = upload.id
            save()
        if "job_id" not in state:
            job = self._call(
                base,
                "fine-tuning job creation",
                client.fine_tuning.jobs.create,
                model=base.name_or_path,
                training_file=state["file_id"],
                method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": spec.epochs}}},
                seed=seed % 2**31,
            )
            state["job_id"] = job.id
            save()
        polls = 0
        while True:
            job = self._call(base, "fine-tuning job poll", client.fine_tuning.jobs.retrieve, state["job_id"])
            polls += 1
            if job.status == DONE:
                break
            if job.status in FAILED:
                raise RuntimeError(f"fine-tuning job {job.id} {job.status}: {job.error}")
            if progress:
                progress(0, 1, 0)  # an interruption here leaves the job's id saved: a rerun polls it
            time.sleep(base.poll_s)
        losses = self._losses(base, job)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / MODEL_FILE, {"model": job.fine_tuned_model, "job_id": job.id, "base": base.name_or_path})
        if progress:
            progress(1, 1, job.trained_tokens or 0)
        wall = time.perf_counter() - start
        return {
            "objective": "sampled",
            "method": "api",
            "job_id": job.id,
            "fine_tuned_model": job.fine_tuned_model,
            "trained_tokens": job.trained_tokens,
            "polls_this_session": polls,
            "loss": losses or [math.nan],
            "steps": len(losses),
            "tokens_per_s": None,
            "wall_s": round(wall, 3),
        }

    def _losses(self, base: ModelSpec, job) -> list[float]:
        """The training loss per step, from the job's result file (a CSV with ``step`` and
        ``train_loss`` columns); empty when the job has none."""
        if not job.result_files:
            return []
        content = self._call(base, "result file download", self.client(base).files.content, job.result_files[0])
        rows = csv.DictReader(io.StringIO(content.text))
        return [float(r["train_loss"]) for r in rows if r.get("train_loss") not in (None, "")]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
