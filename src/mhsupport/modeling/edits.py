"""Changes made to a loaded model before it trains: tag tokens added to its vocabulary, the lower
layers frozen, LoRA adapters added (and merged back once trained)."""

from __future__ import annotations

import torch

from mhsupport.errors import MhsError


def add_tag_tokens(model, tokenizer, tags: dict[str, str]) -> None:
    """One special token per tag ({token: its label}). Each new embedding row starts as the mean
    embedding of its label's words ('Providing Suggestions'), so the tags differ from the
    start and a short fine-tuning can learn to condition on them."""
    embeddings = model.get_input_embeddings().weight
    label_rows = {}
    for token, label in tags.items():
        ids = tokenizer(" " + label.lower(), add_special_tokens=False)["input_ids"]
        label_rows[token] = embeddings[ids].detach().mean(dim=0) if ids else None
    tokenizer.add_special_tokens({"additional_special_tokens": list(tags)}, replace_extra_special_tokens=False)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        for token, row in label_rows.items():
            if row is not None:
                weight[tokenizer.convert_tokens_to_ids(token)] = row


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks: its longest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise MhsError(f"{type(model).__name__}: no layer stack found for partial fine-tuning")
    return max(lists, key=len)


def freeze_all_but_top(model, top_layers: int) -> None:
    """Train only the top `top_layers` blocks and everything outside the block stack
    (embeddings, tied LM head, final norm)."""
    layers = decoder_layers(model)
    in_stack = {id(p) for p in layers.parameters()}
    top = {id(p) for layer in list(layers)[-top_layers:] for p in layer.parameters()} if top_layers else set()
    for parameter in model.parameters():
        parameter.requires_grad = id(parameter) not in in_stack or id(parameter) in top


def add_lora(model, lora_cfg, tag_ids: list[int]):
    """Wrap a causal LM with LoRA adapters (peft) on `lora_cfg.target_modules`. The tag tokens' embedding
    rows train too, through peft's trainable tokens (only those rows, tied to the LM head where the
    embeddings are tied), so a new tag can be learnt while the rest of the vocabulary stays frozen."""
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.target_modules  # "all-linear" (peft: every linear layer but the output head) or names
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=targets if isinstance(targets, str) else list(targets), task_type="CAUSAL_LM",
                        trainable_token_indices=list(tag_ids) or None)
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # e.g. a target module the architecture does not have
        raise MhsError(f"generator.lora: {str(err).splitlines()[0]}") from None


def merge_lora(model):
    """The plain model with the adapters and trainable tokens merged into its weights."""
    return model.merge_and_unload()
