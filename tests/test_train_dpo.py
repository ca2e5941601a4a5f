"""DPO on a tiny model: the loss and implicit rewards against a direct computation, the reference
model kept fixed, the completion-only LM head, and resume."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from train.common import TrainOptions, load_causal_lm
from train.data import load_pairs
from train.dpo import build_trainer, train_dpo

pytestmark = pytest.mark.slow  # training steps: seconds each, so not in the fast subset

BETA = 0.3


def options(tmp_path, tiny_text_dir, **kw):
    base = dict(model=str(tiny_text_dir), out=str(tmp_path / "run"), max_steps=3, save_steps=3, learning_rate=1e-3,
                eval_fraction=0.25, progress=False, batch_size=4)
    return TrainOptions(**{**base, **kw})


def summed_logps(model, batch):
    """Sum of log p(completion token | prefix), from plain logits (no fused head, no TRL code)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ids = batch["input_ids"][:, 1:]
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_text_dir, arithmetic_pairs):
    """A trainer after three full fine-tuning steps, so the policy differs from the reference."""
    pairs = load_pairs(arithmetic_pairs)
    opts = options(tmp_path_factory.mktemp("dpo"), tiny_text_dir)
    trainer = build_trainer(pairs[:16], [], opts, beta=BETA)
    trainer.train()
    trainer.model.eval()
    return trainer


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_dpo_loss_and_rewards_equal_a_direct_computation(trained, tiny_text_dir, loss_type):
    trainer = trained
    batch = next(iter(trainer.get_eval_dataloader(trainer.train_dataset)))
    fresh_reference = load_causal_lm(tiny_text_dir)
    policy = summed_logps(trainer.model, batch)
    reference = summed_logps(fresh_reference, batch)
    (pc, pr), (rc, rr) = policy.chunk(2), reference.chunk(2)
    d = (pc - rc) - (pr - rr)
    eps = 0.1
    lengths_c, lengths_r = batch["completion_mask"].sum(1).float().chunk(2)
    expected = {
        "sigmoid": -F.logsigmoid(BETA * d),
        "hinge": torch.relu(1 - BETA * d),
        "ipo": ((pc - rc) / lengths_c - (pr - rr) / lengths_r - 1 / (2 * BETA)) ** 2,
        "robust": (-(1 - eps) * F.logsigmoid(BETA * d) + eps * F.logsigmoid(-BETA * d)) / (1 - 2 * eps),
    }[loss_type].mean()
    assert abs(d).max() > 1e-3  # the policy has moved: the comparison is not between two zeros
    trainer.loss_types, trainer.label_smoothing = [loss_type], eps
    trainer._metrics["train"].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    metrics = trainer._metrics["eval"]  # the model is in eval mode
    assert metrics["rewards/chosen"][-1] == pytest.approx((BETA * (pc - rc)).mean().item(), abs=1e-5)
    assert metrics["rewards/rejected"][-1] == pytest.approx((BETA * (pr - rr)).mean().item(), abs=1e-5)
    assert metrics["rewards/margins"][-1] == pytest.approx((BETA * d).mean().item(), abs=1e-5)
    assert metrics["logps/chosen"][-1] == pytest.approx(pc.mean().item(), abs=1e-4)


def test_full_fine_tuning_never_updates_the_reference(trained, tiny_text_dir):
    fresh = load_causal_lm(tiny_text_dir).state_dict()
    reference = trained.ref_model.state_dict()
    assert all(torch.equal(reference[k], fresh[k]) for k in fresh)
    policy = trained.model.state_dict()
    assert any(not torch.equal(policy[k], fresh[k]) for k in fresh)  # while the policy did move


def test_completion_only_head_matches_trls_head(tiny_text_dir, arithmetic_pairs, tmp_path):
    pairs = load_pairs(arithmetic_pairs)[:4]
    opts = options(tmp_path, tiny_text_dir)
    ours, trls = (build_trainer(pairs, [], opts, fast_head=fast) for fast in (True, False))
    batch = next(iter(ours.get_eval_dataloader(ours.train_dataset)))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                  fused_lm_head=True)
    a, b = ours.model(**inputs), trls.model(**inputs)
    assert torch.allclose(a.log_probs, b.log_probs, atol=1e-5)
    assert torch.allclose(a.entropy, b.entropy, atol=1e-4)
    a.log_probs.sum().backward()  # gradients flow through the compact head
    assert ours.model.get_output_embeddings().weight.grad is not None


def test_lora_reference_is_the_base_model_with_the_adapter_off(tiny_text_dir, arithmetic_pairs, tmp_path):
    pairs = load_pairs(arithmetic_pairs)
    trainer = build_trainer(pairs[:16], [], options(tmp_path, tiny_text_dir, lora=True, lora_r=4), beta=BETA)
    trainer.train()
    batch = next(iter(trainer.get_eval_dataloader(trainer.train_dataset)))
    with trainer.model.disable_adapter():
        off = summed_logps(trainer.model, batch)
    assert torch.allclose(off, summed_logps(load_causal_lm(tiny_text_dir), batch), atol=1e-5)
    assert not torch.allclose(summed_logps(trainer.model, batch), off, atol=1e-4)


class _Crash(TrainerCallback):
    """Stops the process the way a kill would: abruptly, after `at` optimiser steps."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def test_killed_run_resumes_to_the_same_result(tiny_text_dir, arithmetic_pairs, tmp_path):
    whole = train_dpo(arithmetic_pairs, options(tmp_path, tiny_text_dir, out=str(tmp_path / "a"), max_steps=6))
    interrupted = options(tmp_path, tiny_text_dir, out=str(tmp_path / "b"), max_steps=6)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(arithmetic_pairs, interrupted, callbacks=[_Crash(4)])
    assert (tmp_path / "b" / "checkpoint-3").is_dir() and not (tmp_path / "b" / "metrics.json").exists()
    interrupted.resume = True
    resumed = train_dpo(arithmetic_pairs, interrupted)
    assert resumed["train"]["steps"] == whole["train"]["steps"] == 6
    for key in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen"):
        assert resumed["eval"][key] == pytest.approx(whole["eval"][key], abs=1e-6)
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["eval"]["eval_loss"] == resumed["eval"]["eval_loss"]


def test_a_checkpoint_cut_short_while_being_written_is_skipped_on_resume(tiny_text_dir, arithmetic_pairs, tmp_path):
    whole = train_dpo(arithmetic_pairs, options(tmp_path, tiny_text_dir, out=str(tmp_path / "a"), max_steps=6,
                                                 save_steps=1))
    interrupted = options(tmp_path, tiny_text_dir, out=str(tmp_path / "b"), max_steps=6, save_steps=1)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(arithmetic_pairs, interrupted, callbacks=[_Crash(4)])
    # as a kill while checkpoint-3 was written leaves it: the weights are there, the trainer state is not
    newest = tmp_path / "b" / "checkpoint-3"
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (newest / name).unlink(missing_ok=True)
    assert (tmp_path / "b" / "checkpoint-2" / "trainer_state.json").exists()
    interrupted.resume = True
    resumed = train_dpo(arithmetic_pairs, interrupted)  # from checkpoint-2, saying so
    assert resumed["train"]["steps"] == 6
    for key in ("eval_loss", "eval_rewards/margins"):
        assert resumed["eval"][key] == pytest.approx(whole["eval"][key], abs=1e-6)


def test_a_new_run_refuses_to_overwrite_checkpoints(tiny_text_dir, arithmetic_pairs, tmp_path):
    from steer.errors import SteerError

    opts = options(tmp_path, tiny_text_dir, max_steps=3)
    train_dpo(arithmetic_pairs, opts)
    with pytest.raises(SteerError, match="--resume"):
        train_dpo(arithmetic_pairs, opts)


def test_precomputed_reference_log_probs_give_the_same_run(tiny_text_dir, arithmetic_pairs, tmp_path):
    live = train_dpo(arithmetic_pairs, options(tmp_path, tiny_text_dir, out=str(tmp_path / "live")))
    stored = train_dpo(arithmetic_pairs, options(tmp_path, tiny_text_dir, out=str(tmp_path / "pre")),
                       precompute_ref=True)
    assert stored["settings"]["precompute_ref"]
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"):
        assert stored["eval"][key] == pytest.approx(live["eval"][key], abs=1e-5)


def test_held_out_pair_accuracy_counts_ties_half_and_equals_a_direct_computation(tmp_path, tiny_text_dir,
                                                                                   arithmetic_pairs):
    """Before training a LoRA policy is its reference: every held-out margin is 0, a tie, and the
    accuracy is 0.5 (TRL's counts it 0.0).  After training, each margin equals β times the log-ratio
    difference computed from plain logits of the policy and of the adapter-disabled model."""
    from train.dpo import _before_training, held_out_margins, pair_accuracy, sigmoid_evaluation

    pairs = load_pairs(arithmetic_pairs)
    opts = options(tmp_path, tiny_text_dir, lora=True, lora_r=4, learning_rate=5e-3, max_steps=4)
    trainer = build_trainer(pairs[:16], pairs[16:], opts, beta=BETA)
    before = pair_accuracy(trainer)
    assert before["pair_ties"] == 1.0 and before["pair_accuracy"] == 0.5 and before["pairs"] == 8
    # what train_dpo reports before the first step without a pass is what the pass gives
    known, measured = _before_training(8), {**trainer.evaluate(), **before}
    for key, value in known.items():
        assert measured[key] == pytest.approx(value, abs=1e-6), key
    trainer.train()
    margins = held_out_margins(trainer)
    assert (margins != 0).all()
    batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader())))
    policy = summed_logps(trainer.model, batch)
    with trainer.model.disable_adapter():
        reference = summed_logps(trainer.model, batch)
    (pc, pr), (rc, rr) = policy.chunk(2), reference.chunk(2)
    direct = BETA * ((pc - rc) - (pr - rr))
    assert torch.allclose(margins[:len(direct)], direct, atol=1e-4)
    after = pair_accuracy(trainer)
    assert after["pair_accuracy"] == pytest.approx(float((margins > 0).float().mean()))
    assert after["pair_ties"] == 0.0 and after["pair_accuracy_ci95"][0] <= after["pair_accuracy"]
    # the one pass train_dpo makes for the sigmoid loss gives TRL's own evaluation (two equal batches)
    ours, trls = sigmoid_evaluation(trainer), trainer.evaluate()
    for key in ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies",
                "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected"):
        assert ours[key] == pytest.approx(trls[key], abs=1e-5), key
    for key in ("pair_accuracy", "pair_ties", "pair_margin", "pairs"):
        assert ours[key] == pytest.approx(after[key], abs=1e-6), key


def test_sft_first_then_dpo_from_it(tmp_path, tiny_text_dir, arithmetic_pairs):
    """`sft_first`: SFT on the chosen responses into OUT/sft, then DPO (LoRA) from that model, which is
    also the reference: before DPO's first step every held-out margin is 0, and the SFT model made the
    chosen responses likelier than the base model does."""
    opts = options(tmp_path, tiny_text_dir, lora=True, lora_r=4, max_steps=3, learning_rate=5e-3)
    metrics = train_dpo(arithmetic_pairs, opts, beta=BETA, sft_first=True)
    sft_model = tmp_path / "run" / "sft" / "model"
    assert metrics["sft"]["model"] == str(sft_model) and metrics["settings"]["model"] == str(sft_model)
    assert metrics["eval_before"]["pair_ties"] == 1.0 and metrics["eval_before"]["pair_accuracy"] == 0.5
    assert metrics["sft"]["eval"]["eval_loss"] < metrics["sft"]["eval_before"]["eval_loss"]
    assert (tmp_path / "run" / "model" / "config.json").exists()
