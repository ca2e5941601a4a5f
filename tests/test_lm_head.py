"""The completion-only LM head against the model's own logits, on a model that scales its logits."""

import torch

from train.lm_head import completion_only_head


def test_completion_only_head_honours_the_models_logit_scale_and_batch_normaliser():
    from transformers import CohereConfig, CohereForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = CohereConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, logit_scale=0.25,
                          max_position_embeddings=64, eos_token_id=0, bos_token_id=1, pad_token_id=0)
    model = CohereForCausalLM(config).eval()  # Cohere multiplies its logits by logit_scale
    add_fused_lm_head(model)  # what TRL's trainers do first
    completion_only_head(model, ("log_probs",))
    ids = torch.randint(2, 50, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    reference = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1).gather(2, ids[:, 1:, None])[..., 0]
    mask = labels[:, 1:] != -100
    assert (out.log_probs[mask] - reference[mask]).abs().max() < 1e-5
    assert (out.log_probs[~mask] == 0).all()
    # the loss is normalised by the trainer's token count when it passes one
    scaled = model(input_ids=ids, labels=labels, fused_lm_head=True, num_items_in_batch=torch.tensor(100))
    assert torch.isclose(scaled.loss, -reference[mask].sum() / 100, atol=1e-5)
