"""What ``decodekit bench`` runs: decodekit methods in this process, and peer tools on the same prompt ids."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from decodekit import GREEDY, Engine, InvalidParameter, LoadedModel, SamplingParams

# vLLM's runs: plain decoding and its speculative methods, as vLLM's --speculative-config
VLLM_PEERS = {
    "vllm": None,
    "vllm-ngram": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 1, "prompt_lookup_max": 4},
    "vllm-suffix": {"method": "suffix", "num_speculative_tokens": 16},
    "vllm-decodekit": {
        "method": "custom_class",
        "model": "decodekit.integrations.vllm.Hybrid",
        "num_speculative_tokens": 8,
    },
}
PEERS = ("hf", "hf-lookup", "hf-decodekit", "llamacpp", "llamacpp-lookup", *VLLM_PEERS)
HF_DECODEKIT_METHOD = "hybrid"  # what hf-decodekit drafts with, inside transformers' generate


@dataclass
class Run:
    """One generation of one turn by one runner, as measured."""

    token_ids: list[int]
    wall_s: float
    prefill_s: float | None = None
    accepted_lengths: list[int] = field(default_factory=list)
    draft_sizes: list[int] = field(default_factory=list)
    accepted_drafts: list[int] = field(default_factory=list)
    draft_s: float | None = None  # our engine only: time in the drafter, and in forward + verification
    forward_s: float | None = None
    completions: list[list[int]] = field(default_factory=list)  # every output of a strategy that returns several
    steps: int | None = None  # verification steps, from a peer that counts them but not what each one accepted


class EngineRunner:
    """A decodekit method (with ``attention``: see Engine)."""

    def __init__(
        self, model: LoadedModel, method: str, sampling: SamplingParams = GREEDY, attention: str | None = None
    ) -> None:
        self.name, self.sampling = method, sampling
        self.engine = Engine(model, method, attention=attention)

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> Run:
        g = self.engine.generate(prompt_ids, max_new_tokens=max_new_tokens, sampling=self.sampling)
        s = g.stats
        return Run(
            g.token_ids,
            s.wall_s,
            s.prefill_s,
            s.accepted_lengths,
            s.draft_sizes,
            s.accepted_drafts,
            s.draft_s,
            s.forward_s,
        )


class StrategyRunner:
    """A decoding strategy (it changes the output by design), greedy by its own rule."""

    def __init__(self, model: LoadedModel, strategy: str) -> None:
        self.name, self.strategy = strategy, strategy
        self.engine = Engine(model, "ar")

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> Run:
        g = self.engine.generate(prompt_ids, max_new_tokens=max_new_tokens, strategy=self.strategy)
        return Run(g.token_ids, g.stats.wall_s, completions=[c.token_ids for c in g.completions])


class HFRunner:
    """transformers' own ``generate`` on the same weights: greedy (``hf``), with its prompt-lookup drafting
    (``hf-lookup``), or with decodekit's default method inside it (``hf-decodekit``: custom_generate)."""

    def __init__(self, model: LoadedModel, peer: str = "hf", sampling: SamplingParams = GREEDY) -> None:
        from transformers import AutoModelForCausalLM

        self.name = peer
        self.hf = AutoModelForCausalLM.from_pretrained(model.path, dtype=model.dtype).to(model.device).eval()
        self.device, self.eos = model.device, sorted(model.eos_token_ids)
        self.options: dict[str, object] = {}
        if peer == "hf-lookup":
            self.options["prompt_lookup_num_tokens"] = 10
        elif peer == "hf-decodekit":
            from decodekit.integrations.transformers import generate

            self.options |= {"custom_generate": generate, "method": HF_DECODEKIT_METHOD}
        self.seed = sampling.seed
        self.options |= {"do_sample": not sampling.greedy, "repetition_penalty": sampling.repetition_penalty}
        if not sampling.greedy:
            self.options |= {
                "temperature": sampling.temperature,
                "top_k": sampling.top_k,  # 0 = off, as in decodekit (transformers' default would be 50)
                "top_p": sampling.top_p,
                "min_p": sampling.min_p or None,
            }

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> Run:
        ids = torch.tensor([prompt_ids], device=self.device)
        if self.seed is not None:
            torch.manual_seed(self.seed)
        _sync(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                eos_token_id=self.eos,
                pad_token_id=self.eos[0],
                **self.options,
            )
        _sync(self.device)
        wall = time.perf_counter() - start
        return Run(out[0, len(prompt_ids) :].tolist(), wall)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class PeerError(Exception):
    """A peer failed on one request (the harness records it and goes on)."""


class WorkerRunner:
    """A runner in a worker process of its own, spoken to in JSON lines (see ``llamacpp_worker.py``): it prints
    ``{"ready": true}``, then answers each request line with ``token_ids`` and ``wall_s`` (and whatever other
    :class:`Run` fields it measures) or with ``error``. A worker that crashed is started again for the next
    request."""

    name: str
    command: list[str]
    cwd: Path | None = None
    env: dict[str, str] | None = None

    @property
    def pid(self) -> int:
        """The worker's process id: its memory is what this runner uses."""
        return self.process.pid

    def _start(self) -> None:
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=self.cwd,
            env=self.env,
        )
        line = self.process.stdout.readline()
        if not line.startswith('{"ready"'):
            raise PeerError(f"{self.name} did not start (exit status {self.process.wait()})")
        self.info = {k: v for k, v in json.loads(line).items() if k != "ready"}  # what the worker says it runs

    def request(self, prompt_ids: list[int], max_new_tokens: int) -> dict:
        """The request line for a turn."""
        raise NotImplementedError

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> Run:
        if self.process.poll() is not None:
            self._start()  # the last request crashed it
        try:
            self.process.stdin.write(json.dumps(self.request(prompt_ids, max_new_tokens)) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise PeerError(f"{self.name} crashed (exit status {self.process.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise PeerError(f"{self.name}: {reply['error']}")
        return Run(**{name: reply[name] for name in Run.__dataclass_fields__ if name in reply})

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)


class LlamaCppRunner(WorkerRunner):
    """llama.cpp (llama-cpp-python) on the same GGUF file, in a worker process of its own.

    Its weights stay quantized, so its outputs need not match decodekit's de-quantized float model.
    """

    WORKER = Path(__file__).with_name("llamacpp_worker.py")

    def __init__(
        self, gguf: Path, eos: frozenset[int], lookup: int | None = None, sampling: SamplingParams = GREEDY
    ) -> None:
        self.name = "llamacpp" if lookup is None else "llamacpp-lookup"
        self.sampling = sampling.to_dict()
        self.command = [sys.executable, str(self.WORKER), str(gguf), "--threads", str(torch.get_num_threads())]
        if lookup:
            self.command += ["--lookup", str(lookup)]
        self.eos = sorted(eos)
        self._start()

    def request(self, prompt_ids: list[int], max_new_tokens: int) -> dict:
        return {"prompt_ids": prompt_ids, "max_new_tokens": max_new_tokens, "eos": self.eos, "sampling": self.sampling}


class CheckoutRunner(WorkerRunner):
    """A decodekit method as another checkout has it (a worktree of another commit), in a worker process started
    from that checkout: a version measured side by side with this one. Named ``METHOD@DIRNAME``."""

    WORKER = Path(__file__).with_name("engine_worker.py")

    def __init__(self, model: LoadedModel, method: str, checkout: Path, sampling: SamplingParams = GREEDY) -> None:
        if not (checkout / "decodekit" / "__init__.py").is_file():
            raise InvalidParameter(f"--checkout {checkout} holds no decodekit package")
        self.name, self.sampling = f"{method}@{checkout.resolve().name}", sampling.to_dict()
        self.command = [sys.executable, str(self.WORKER), method, "--model", str(model.source)]
        self.command += ["--dtype", model.dtype_option]
        self.command += ["--device", model.device.type]
        self.cwd, self.env = checkout, os.environ | {"PYTHONPATH": str(checkout.resolve())}
        self._start()

    def request(self, prompt_ids: list[int], max_new_tokens: int) -> dict:
        return {"prompt_ids": prompt_ids, "max_new_tokens": max_new_tokens, "sampling": self.sampling}


class VllmRunner(WorkerRunner):
    """vLLM's offline engine (``vllm.LLM``) on the model's checkpoint directory (a GGUF model's de-quantized one), in
    a worker process run by the Python of the vLLM environment (:func:`vllm_python`), plain, with one of its
    speculative methods, or with our ``Hybrid`` proposer (``VLLM_PEERS``)."""

    WORKER = Path(__file__).with_name("vllm_worker.py")

    def __init__(self, model: LoadedModel, peer: str, python: Path, sampling: SamplingParams = GREEDY) -> None:
        self.name, self.sampling, self.eos = peer, sampling.to_dict(), sorted(model.eos_token_ids)
        dtype = "bfloat16" if model.dtype == torch.bfloat16 else "float32"
        self.command = [str(python), str(self.WORKER), str(model.path), "--dtype", dtype]
        self.command += ["--threads", str(torch.get_num_threads())]
        if VLLM_PEERS[peer] is not None:
            self.command += ["--speculative-config", json.dumps(VLLM_PEERS[peer])]
        self.env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # our proposers importable
        self._start()

    def request(self, prompt_ids: list[int], max_new_tokens: int) -> dict:
        return {"prompt_ids": prompt_ids, "max_new_tokens": max_new_tokens, "eos": self.eos, "sampling": self.sampling}


def vllm_python() -> Path | None:
    """The Python of the vLLM environment: ``$DECODEKIT_VLLM_PYTHON``, else ``.venv-vllm`` beside the package's
    checkout (what ``make vllm-env`` makes); None where neither is."""
    named = os.environ.get("DECODEKIT_VLLM_PYTHON")
    python = Path(named) if named else Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    return python if python.is_file() else None


def make_runners(
    model: LoadedModel,
    methods: list[str],
    peers: list[str],
    sampling: SamplingParams = GREEDY,
    checkouts: list[Path] = (),
    strategies: list[str] = (),
    attention: str | None = None,
) -> tuple[list, list[str]]:
    """Build the runners, all decoding with ``sampling``: ``methods`` here (with ``attention``: see Engine), then
    each of them again from every one of ``checkouts``, then the ``strategies`` (greedy by their own rules), then
    the peers; peers that cannot run here are left out, each with a one-line note."""
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise InvalidParameter(f"unknown peer {unknown[0]!r}; available: {', '.join(PEERS)}")
    runners: list = [EngineRunner(model, m, sampling, attention) for m in methods]
    runners += [CheckoutRunner(model, m, checkout, sampling) for checkout in checkouts for m in methods]
    runners += [StrategyRunner(model, strategy) for strategy in strategies]
    notes = []
    if attention not in (None, "full") and (checkouts or peers):
        notes.append(f"attention {attention} is the methods' only: checkouts and peers run full attention")
    for peer in peers:
        if peer.startswith("hf"):
            runners.append(HFRunner(model, peer, sampling))
        elif peer in VLLM_PEERS:
            python = vllm_python()
            if python is None:
                notes.append(f"{peer} skipped: no vLLM environment (make vllm-env, or set DECODEKIT_VLLM_PYTHON)")
                continue
            try:
                runners.append(VllmRunner(model, peer, python, sampling))
            except PeerError as err:
                notes.append(f"{peer} skipped: {err}")
        elif importlib.util.find_spec("llama_cpp") is None:
            notes.append(f"{peer} skipped: llama-cpp-python is not installed (BENCHMARKS.md says how to build it)")
        elif model.source.suffix != ".gguf":
            notes.append(f"{peer} skipped: it needs a .gguf model, not {model.source}")
        else:
            try:
                lookup = 10 if peer.endswith("lookup") else None
                runners.append(LlamaCppRunner(model.source, model.eos_token_ids, lookup, sampling))
            except PeerError as err:
                notes.append(f"{peer} skipped: {err}")
    names = [r.name for r in runners]
    if len(set(names)) != len(names):
        raise InvalidParameter("a method or peer is listed twice")
    return runners, notes
