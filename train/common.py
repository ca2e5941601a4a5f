"""What every trainer shares: loading the model, CPU-safe trainer arguments, LoRA, checkpoints and
resume, and the metrics file written at the end.

Defaults are chosen for a CPU machine (TRL's bf16 and gradient checkpointing fail or crawl there);
on a GPU the same code runs under `accelerate launch` with `--bf16`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from steer.errors import SteerError
from steer.files import atomic_path, atomic_write_text
from steer.lm import default_model_path

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    """Options every trainer takes (the CLI flags of the same names)."""

    model: str | None = None  # local HF directory; None: the default model (Gemma 3 270M)
    out: str = "runs/out"
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 2
    grad_accum: int = 1
    learning_rate: float = 5e-5
    max_length: int = 256
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"  # peft's "all-linear", or module names separated by commas
    seed: int = 0
    save_steps: int = 50
    eval_fraction: float = 0.1
    eval_steps: int = 0  # 0: evaluate only at the end
    logging_steps: int = 1
    limit: int | None = None  # use only the first N rows of the data
    resume: bool = False
    bf16: bool = False
    progress: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_dir(path: str | None) -> Path:
    """The model directory to train from (the converted default model when `path` is None)."""
    directory = default_model_path() if path is None else Path(path)
    if not (directory / "config.json").exists():
        raise SteerError(f"not a Hugging Face model directory (no config.json): {directory}")
    return directory


def load_tokenizer(directory: Path):
    """The tokenizer of a model directory, ready for training (a pad token; see `_read_tokenizer`).

    Reading Gemma's 33 MB tokenizer takes about 6 s, and a training loop reads the same one for every
    stage (each model it saves carries a copy): tokenizers read in this process are kept by the content
    of their files, and a copy of the kept one (about 2 s) is handed out, so callers may change it."""
    key = _tokenizer_key(Path(directory))
    kept = _TOKENIZERS.pop(key, None)
    if kept is None:
        kept = _read_tokenizer(Path(directory))
    _TOKENIZERS[key] = kept  # (the most recent last)
    while len(_TOKENIZERS) > 2:
        _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
    tokenizer = copy.deepcopy(kept)
    tokenizer.name_or_path = tokenizer.init_kwargs["name_or_path"] = str(directory)
    return tokenizer


_TOKENIZERS: dict[str, Any] = {}  # content key -> a tokenizer never handed out itself
_TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens", "chat_template", "vocab", "merges", "spiece")


def _tokenizer_key(directory: Path) -> str:
    """A digest of the tokenizer's files, without the settings of a load that do not change the
    tokenizer (a trained model's copy differs from its base model's only there)."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(directory.iterdir()):
        if not path.is_file() or not path.name.startswith(_TOKENIZER_FILES):
            continue
        data = path.read_bytes()
        if path.name == "tokenizer_config.json":
            settings = {k: v for k, v in json.loads(data).items() if k not in ("local_files_only", "is_local", "name_or_path")}
            data = json.dumps(settings, sort_keys=True).encode()
        digest.update(path.name.encode() + b"\0" + data + b"\0")
    return digest.hexdigest()


def _read_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Gemma's tokenizer keeps Python copies of its 262k-entry vocabulary and 515k merges that only its
    # constructor reads (the Rust tokenizer holds its own).  `datasets` pickles the tokenizer to
    # fingerprint each `map` TRL makes, which took 8 s a map with them and 1 s without.
    for name, empty in (("_vocab", dict), ("_merges", list)):
        if isinstance(tokenizer.__dict__.get(name), empty):
            tokenizer.__dict__[name] = empty()
    return tokenizer


def load_causal_lm(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True,
                                                use_safetensors=True)


def lora_config(options: TrainOptions, task_type: str = "CAUSAL_LM"):
    """LoRA on every linear layer but the output head (peft's "all-linear", whatever the architecture
    names its layers), or on the modules `options.lora_targets` names."""
    if not options.lora:
        return None
    from peft import LoraConfig

    targets = options.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
        if not targets:
            raise SteerError("--lora-targets names no module")
    return LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                      task_type=task_type, target_modules=targets)


def is_main_process() -> bool:
    """True in a plain run and in rank 0 of a multi-process one (`accelerate launch`, torchrun): the one
    process that writes models, metrics and reports and prints summaries, so each is written once."""
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    """A barrier between the processes of a distributed run (nothing to wait for otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def trainer_arguments(options: TrainOptions, has_eval: bool) -> dict[str, Any]:
    """Keyword arguments for any TRL config class (they all extend transformers' TrainingArguments)."""
    evaluate_during = has_eval and options.eval_steps > 0
    return dict(
        output_dir=options.out, seed=options.seed, data_seed=options.seed,
        num_train_epochs=options.epochs, max_steps=options.max_steps,
        per_device_train_batch_size=options.batch_size, per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum, learning_rate=options.learning_rate,
        logging_steps=options.logging_steps, save_strategy="steps", save_steps=options.save_steps,
        save_total_limit=2, eval_strategy="steps" if evaluate_during else "no",
        eval_steps=options.eval_steps if evaluate_during else None,
        bf16=options.bf16, fp16=False, activation_checkpointing=False,
        use_cpu=not torch.cuda.is_available(), report_to="none", disable_tqdm=not options.progress,
        dataloader_num_workers=0, max_length=options.max_length,
        ddp_find_unused_parameters=False,  # every trainer here uses all its parameters; the search costs a pass
    )


def last_checkpoint(out: str | Path) -> str | None:
    """The newest complete checkpoint in `out`, or None.

    The Trainer writes `trainer_state.json` last, so a checkpoint without a readable one was being
    written when the run was stopped: it is removed (with a warning) and the one before it is used."""
    import re
    import shutil

    out = Path(out)
    if not out.is_dir():
        return None
    steps = sorted((int(m.group(1)), d) for d in out.iterdir()
                   if d.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", d.name)))
    for _, directory in reversed(steps):
        try:
            json.loads((directory / "trainer_state.json").read_text())
            return str(directory)
        except (OSError, ValueError):
            if is_main_process():  # the other processes skip it just the same
                log.warning("removing %s: it was being written when the run stopped (no complete "
                            "trainer_state.json)", directory)
                shutil.rmtree(directory, ignore_errors=True)
    return None


def resume_from(options: TrainOptions) -> str | None:
    """The checkpoint to resume from: the newest one in `out` when --resume, else None.

    Starting a fresh run over an output directory that already has checkpoints is refused, so a
    forgotten --resume never silently overwrites a run.
    """
    found = last_checkpoint(options.out)
    if options.resume:
        if found is None:  # killed before its first complete checkpoint: nothing to lose by starting over
            log.warning("--resume: no complete checkpoint in %s yet, so training starts from the beginning",
                        options.out)
            return None
        log.warning("resuming from %s", found)
        return found
    if found is not None:
        raise SteerError(f"{options.out} already holds checkpoints ({Path(found).name}); pass --resume to continue "
                         "that run or choose another --out")
    return None


def save_final(trainer, tokenizer, out: str | Path, lora: bool) -> Path:
    """Save the trained model into `out/model` as a plain HF directory (safetensors) that steer can
    load; a LoRA run also keeps its adapter in `out/adapter`."""
    out = Path(out)
    model = trainer.accelerator.unwrap_model(trainer.model)
    # each folder is written beside its place and renamed into it when whole: a write that fails (a full
    # disk) leaves no half model that a later load would take for the trained one
    if lora:
        with atomic_path(out / "adapter") as staging:
            model.save_pretrained(staging)
        model = model.merge_and_unload()
    with atomic_path(out / "model") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return out / "model"


def run_and_save(trainer, tokenizer, options: TrainOptions, checkpoint: str | None,
                 has_eval: bool, held_out: Callable[[Any], dict[str, Any]] | None = None,
                 known_before: dict[str, Any] | None = None, trainer_evaluates: bool = True) -> dict[str, Any]:
    """Evaluate (fresh runs only), train (from `checkpoint` if resuming), evaluate again and save the
    final model: the part of `metrics.json` every causal-LM trainer shares.  `held_out(trainer)` adds
    a trainer's own held-out metrics to both evaluations (or, without `trainer_evaluates`, is the
    whole evaluation); `known_before` stands for the first one where it is known without a pass."""
    import time

    def evaluate() -> dict[str, Any]:
        return {**(trainer.evaluate() if trainer_evaluates else {}), **(held_out(trainer) if held_out else {})}

    before = (known_before or evaluate()) if has_eval and checkpoint is None else None
    started = time.perf_counter()
    result = train_from(trainer, checkpoint)
    seconds = time.perf_counter() - started
    after = evaluate() if has_eval else None
    final = Path(options.out) / "model"
    if trainer.is_world_process_zero():
        save_final(trainer, tokenizer, options.out, options.lora)
    wait_for_everyone()
    return {"train": {"steps": result.global_step, "loss": result.training_loss, "seconds": seconds,
                      "processes": trainer.args.world_size},
            "eval_before": before, "eval": after, "log": train_log(trainer), "model": str(final)}


def train_from(trainer, checkpoint: str | None):
    """`trainer.train(resume_from_checkpoint=checkpoint)`, except for a run killed after its last step
    was saved: transformers would take one step past max_steps when resuming from there, so that
    checkpoint is loaded instead and the caller goes on to evaluation and saving."""
    finished = _finished_state(checkpoint)
    if finished is None:
        return trainer.train(resume_from_checkpoint=checkpoint)
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = finished
    losses = [entry["loss"] for entry in finished.log_history if "loss" in entry]
    return SimpleNamespace(global_step=finished.global_step,
                           training_loss=sum(losses) / len(losses) if losses else float("nan"))


def _finished_state(checkpoint: str | None):
    """The TrainerState of `checkpoint` if its run had taken all its steps, else None."""
    if checkpoint is None:
        return None
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    return state if state.max_steps and state.global_step >= state.max_steps else None


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def write_metrics(out: str | Path, metrics: dict[str, Any]) -> Path:
    path = Path(out) / "metrics.json"
    if is_main_process():
        atomic_write_text(path, json.dumps(finite(metrics), indent=2) + "\n")
    return path


def quiet_trainer(trainer, options: TrainOptions):
    """Without progress bars, transformers prints every log row instead: keep the output clean."""
    if not options.progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def train_log(trainer) -> list[dict[str, Any]]:
    """The per-step log of a finished run (loss, learning rate, metrics; eval rows too)."""
    return [dict(row) for row in trainer.state.log_history]


def quiet_transformers() -> None:
    """Keep per-tensor loading bars and advisory warnings out of the training output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    import warnings

    import datasets

    datasets.disable_progress_bars()
    # TRL 1.16 still calls a transformers method renamed in 5.x; the warning is not the user's to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # per-map bars over a few hundred rows are noise
