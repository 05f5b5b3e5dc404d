"""The generator recipe's training pieces: the labelled-positions loss equals the model's own loss,
the tag-contrast loss's terms equal the likelihood stage's scores, and the tag rows' optimizer step
is scaled by exactly generator.tag_lr_scale, nothing else moved."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, LlamaConfig, LlamaForCausalLM, TrainingArguments

from mhsupport.training import loop, trainers, validation
from mhsupport.modeling.tag_likelihood import reference_nll
from mhsupport.modeling.formatting import IGNORE_INDEX
from test_likelihood import CONTEXTS, LABELS, REPLIES, tiny_model_and_formatter, toy_examples


def features_and_collator(formatter, n=16):
    features = [formatter.training_features(e) for e in toy_examples(n, seed=3)]
    return features, DataCollatorForSeq2Seq(formatter.tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)


def test_labelled_positions_loss_equals_the_models_own_loss(tmp_path):
    model, formatter = tiny_model_and_formatter(CONTEXTS + list(REPLIES.values()))
    features, collator = features_and_collator(formatter)
    batch = collator(features)
    trainer = trainers.LabelledPositionsTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True,
                                                                                   report_to="none"))
    model.eval()  # no dropout: both losses see the same activations
    own = model(**batch).loss
    assert trainer.compute_loss(model, batch).item() == pytest.approx(own.item(), rel=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_shared_prefix_gives_the_models_own_loss_and_gradients(tmp_path, family):
    # every context opens with the same turn, as every chat prompt opens with the system prompt
    model, formatter = tiny_model_and_formatter(CONTEXTS + list(REPLIES.values()) + ["welcome to the chat"])
    if family == "llama":  # rotary positions: the rows' own tokens must be positioned after the shared ones
        config = LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             pad_token_id=model.config.pad_token_id, eos_token_id=model.config.eos_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    examples = [{**e, "context": [{"speaker": "supporter", "text": "welcome to the chat"}] + e["context"]}
                for e in toy_examples(8, seed=3)]
    batch = DataCollatorForSeq2Seq(formatter.tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(
        [formatter.training_features(e) for e in examples])
    assert batch["attention_mask"].eq(0).any()  # rows of different lengths: right padding is in play
    trainer = trainers.LabelledPositionsTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True,
                                                                                   report_to="none"))
    model.eval()
    shared = trainers.shared_batch_prefix(model, batch["input_ids"], batch["attention_mask"],
                                          batch["labels"][:, 1:] != IGNORE_INDEX)
    assert shared > 3
    own = model(**batch).loss
    own.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    assert loss.item() == pytest.approx(own.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_no_prefix_is_shared_where_a_row_differs_from_the_first_token_or_checkpointing_is_on(tmp_path):
    model, formatter = tiny_model_and_formatter(CONTEXTS + list(REPLIES.values()))
    features, collator = features_and_collator(formatter)
    batch = collator(features)
    scored = batch["labels"][:, 1:] != IGNORE_INDEX
    ids = batch["input_ids"].clone()
    ids[1, 0] = (ids[0, 0] + 1) % model.config.vocab_size
    assert trainers.shared_batch_prefix(model, ids, batch["attention_mask"], scored) == 0
    ids[:, 0] = ids[0, 0]
    assert trainers.shared_batch_prefix(model, ids, batch["attention_mask"], scored) >= 1
    model.activation_checkpointing_enable()
    assert trainers.shared_batch_prefix(model, ids, batch["attention_mask"], scored) == 0


@pytest.mark.parametrize("tag_format", ["token", "words"])
def test_tag_contrast_loss_terms_equal_the_likelihood_stage_scores(tmp_path, tag_format):
    model, formatter = tiny_model_and_formatter(CONTEXTS + list(REPLIES.values()), tag_format)
    examples = toy_examples(12, seed=4)
    features = [formatter.training_features(e) for e in examples]
    batch = DataCollatorForSeq2Seq(formatter.tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(features)
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    model.eval()
    own = trainers.LabelledPositionsTrainer(model=model, args=args).compute_loss(model, batch)
    # every wrong tag drawn: the cross-entropy over tags then does not depend on the draw's order
    trainer = trainers.TagContrastTrainer(model=model, args=args, openings=[formatter.opening_ids(t) for t in LABELS],
                                          weight=0.5, negatives=len(LABELS) - 1)
    loss, parts = trainer.compute_loss(model, batch, return_outputs=True)
    assert parts["lm_loss"].item() == pytest.approx(own.item(), rel=1e-5)
    nll, tokens = reference_nll(model, formatter, examples, LABELS, batch_size=5, progress=False)
    gold = torch.tensor([LABELS.index(e["category"]) for e in examples])
    expected = F.cross_entropy(-torch.tensor(nll / tokens[:, None]), gold)
    assert parts["contrast_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(own.item() + 0.5 * expected.item(), rel=1e-5)
    loss.backward()  # the gradient reaches the openings through the shared context's cache and the continuations
    opening_rows = model.get_input_embeddings().weight.grad[sorted({i for t in LABELS for i in formatter.opening_ids(t)})]
    assert (opening_rows.abs().sum(dim=1) > 0).all()


def test_contrast_term_is_divided_over_accumulated_micro_batches(tmp_path):
    # with num_items_in_batch the Trainer does not divide a micro-batch's loss by the accumulation steps
    model, formatter = tiny_model_and_formatter(CONTEXTS + list(REPLIES.values()))
    features, collator = features_and_collator(formatter, n=8)
    batch = collator(features)
    trainer = trainers.TagContrastTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"),
                                          openings=[[formatter.tag_ids[t]] for t in LABELS], weight=1.0, negatives=3)
    model.eval()
    labelled = int((batch["labels"] != IGNORE_INDEX).sum())
    _, single = trainer.compute_loss(model, batch, return_outputs=True, num_items_in_batch=labelled)
    trainer.current_gradient_accumulation_steps = 4
    _, accumulated = trainer.compute_loss(model, batch, return_outputs=True, num_items_in_batch=4 * labelled)
    assert accumulated["lm_loss"].item() == pytest.approx(single["lm_loss"].item() / 4, rel=1e-5)
    assert accumulated["contrast_loss"].item() == pytest.approx(single["contrast_loss"].item() / 4, rel=1e-5)


@pytest.mark.parametrize("contrast", [False, True])
def test_the_losses_run_under_the_trainers_bf16_autocast(tmp_path, contrast):
    """Both losses call the decoder and the head directly, bypassing the autocast the Trainer puts
    around the model's own forward: they must open it themselves."""
    model, formatter = tiny_model_and_formatter(CONTEXTS + list(REPLIES.values()))
    features, collator = features_and_collator(formatter, n=8)
    seen = set()
    model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=8, use_cpu=True, bf16=True,
                             report_to="none", save_strategy="no", disable_tqdm=True)
    extra = {"openings": [[formatter.tag_ids[t]] for t in LABELS], "weight": 1.0, "negatives": 1} if contrast else {}
    trainer_class = trainers.TagContrastTrainer if contrast else trainers.LabelledPositionsTrainer
    trainer_class(model=model, args=args, data_collator=collator, train_dataset=Dataset.from_list(features),
                  **extra).train()
    assert seen == {torch.bfloat16}


def one_step(tmp_path, scale):
    model, formatter = tiny_model_and_formatter(CONTEXTS + list(REPLIES.values()))
    features, collator = features_and_collator(formatter)
    before = model.get_input_embeddings().weight.detach().clone()
    rows = [formatter.tag_ids[label] for label in LABELS]
    args = TrainingArguments(str(tmp_path / str(scale)), max_steps=1, per_device_train_batch_size=16, learning_rate=1e-3,
                             use_cpu=True, report_to="none", save_strategy="no", seed=0, disable_tqdm=True)
    trainers.LabelledPositionsTrainer(model=model, args=args, data_collator=collator,
                                      train_dataset=Dataset.from_list(features),
                                      callbacks=[trainers.RowStepScaleCallback(rows, scale)]).train()
    return model.get_input_embeddings().weight.detach() - before, rows


def test_tag_rows_step_is_scaled_and_nothing_else_changes(tmp_path):
    plain, rows = one_step(tmp_path, 1.0)
    scaled, _ = one_step(tmp_path, 10.0)
    assert plain[rows].abs().sum() > 0
    torch.testing.assert_close(scaled[rows], 10 * plain[rows], rtol=1e-4, atol=1e-7)
    others = torch.ones(len(plain), dtype=torch.bool)
    others[rows] = False
    torch.testing.assert_close(scaled[others], plain[others])


def test_validation_keeps_the_final_epochs_result_for_the_final_model(tmp_path):
    model, formatter = tiny_model_and_formatter(CONTEXTS + list(REPLIES.values()))
    features, collator = features_and_collator(formatter, n=8)
    scored_models = []

    def evaluate(m):  # a number to log and an array the stage reuses, which is kept but not logged
        scored_models.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        return {"loss": float(len(scored_models)), "probabilities": torch.zeros(2, 2)}

    callback = validation.ValidationCallback(evaluate)
    args = TrainingArguments(str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4, use_cpu=True,
                             report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = trainers.LabelledPositionsTrainer(model=model, args=args, data_collator=collator,
                                                train_dataset=Dataset.from_list(features), callbacks=[callback])
    loop.connect_loggers(trainer, tmp_path)
    trainer.train()
    final = callback.result_at(trainer.state.global_step)
    assert final is not None and final["loss"] == 2.0 and final["probabilities"].shape == (2, 2)
    assert callback.result_at(trainer.state.global_step // 2) is None  # the first epoch's model is not the final one
    for name, value in model.state_dict().items():  # the kept result scored exactly the final weights
        torch.testing.assert_close(scored_models[-1][name], value)
    logged = [entry for entry in trainer.state.log_history if "valid_loss" in entry]
    assert [entry["valid_loss"] for entry in logged] == [1.0, 2.0]
    assert not any("valid_probabilities" in entry for entry in trainer.state.log_history)
