"""The decoding loop of modeling/decoding.py against transformers' own `generate`: rows leave the batch
when they write EOS, and nothing else may change."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from mhsupport.modeling.decoding import decode_from, prefill
from mhsupport.modeling.scoring import encode_prefix, shared_prefix_length

MAX_NEW = 12
PAD = 0


def decode(model, input_ids, attention, max_new_tokens, eos_id, warpers=None, prefix=None, seeds=None):
    """What generation does with a batch of left-padded prompts: encode them, then decode."""
    cache, logits, cache_mask, last_positions = prefill(model, input_ids, attention, prefix)
    return decode_from(model, cache, logits, cache_mask, last_positions, max_new_tokens, eos_id, warpers, seeds,
                       input_ids)


def tiny_model_and_batch():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, initializer_range=0.5,
                                       eos_token_id=1)).eval()
    prompts = [torch.randint(1, 40, (n,)).tolist() for n in (3, 7, 5, 9, 4, 6, 8, 2)]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return model, input_ids, attention


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def test_greedy_decoding_equals_model_generate_while_rows_leave_the_batch():
    model, input_ids, attention = tiny_model_and_batch()
    width = input_ids.shape[1]
    free = model.generate(input_ids, attention_mask=attention, max_new_tokens=MAX_NEW, do_sample=False,
                          pad_token_id=PAD, eos_token_id=None)[:, width:]
    # as EOS, the token whose first appearance varies most across rows, so that rows finish at different steps
    rows = free.tolist()
    eos = max(range(1, 40), key=lambda t: len({row.index(t) if t in row else MAX_NEW for row in rows}))
    expected = model.generate(input_ids, attention_mask=attention, max_new_tokens=MAX_NEW, do_sample=False,
                              pad_token_id=PAD, eos_token_id=eos)[:, width:]
    ours = decode(model, input_ids, attention, MAX_NEW, eos)
    assert ours == [until_eos(row, eos) for row in expected.tolist()]
    assert len({len(row) for row in ours}) > 2 and min(map(len, ours)) < MAX_NEW  # rows did leave early
    # each row alone (no padding, no batch-mates) decodes to the same tokens
    alone = [decode(model, input_ids[i:i + 1, attention[i] == 1], attention[i:i + 1, attention[i] == 1], MAX_NEW, eos)[0]
             for i in range(len(input_ids))]
    assert alone == ours


def test_sampled_decoding_is_seeded_and_stops_at_eos():
    model, input_ids, attention = tiny_model_and_batch()
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.9)])
    torch.manual_seed(5)
    first = decode(model, input_ids, attention, MAX_NEW, eos_id=3, warpers=warpers)
    torch.manual_seed(5)
    assert decode(model, input_ids, attention, MAX_NEW, eos_id=3, warpers=warpers) == first
    assert all(len(row) == MAX_NEW or row[-1] == 3 for row in first) and all(3 not in row[:-1] for row in first)
    assert first != decode(model, input_ids, attention, MAX_NEW, eos_id=3, warpers=warpers)


def test_a_shared_prefix_encoded_once_leaves_every_reply_unchanged():
    model, _, _ = tiny_model_and_batch()
    prefix = torch.randint(1, 40, (6,)).tolist()
    suffixes = [torch.randint(1, 40, (n,)).tolist() for n in (1, 4, 2, 7, 3)]
    prompts = [prefix + s for s in suffixes]
    assert shared_prefix_length(prompts) == 6

    def left_padded(rows):
        width = max(map(len, rows))
        return (torch.tensor([[PAD] * (width - len(r)) + r for r in rows]),
                torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]))

    whole = decode(model, *left_padded(prompts), MAX_NEW, eos_id=3)
    assert decode(model, *left_padded(suffixes), MAX_NEW, eos_id=3, prefix=encode_prefix(model, prefix)) == whole
    # the prefix is shared by value, so rows leaving the batch do not disturb it
    assert decode(model, *left_padded(suffixes[:2]), MAX_NEW, eos_id=3, prefix=encode_prefix(model, prefix)) == whole[:2]


def test_shared_prefix_length_leaves_each_prompt_a_token_of_its_own():
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1  # [1, 2] must keep its last token
    assert shared_prefix_length([[5, 1], [6, 1]]) == 0
    assert shared_prefix_length([[1, 2, 3]]) == 2
    assert shared_prefix_length([[7]]) == 0
    assert shared_prefix_length([]) == 0


def test_generate_gives_the_same_replies_with_and_without_the_shared_prefix(monkeypatch):
    from test_likelihood import CONTEXTS, LABELS, REPLIES, tiny_model_and_formatter

    from mhsupport.modeling import decoding

    model, formatter = tiny_model_and_formatter(CONTEXTS + list(REPLIES.values()) + ["hi there"])
    model.eval()
    contexts = [[{"speaker": "supporter", "text": "hi there"}, {"speaker": "seeker", "text": text}] for text in CONTEXTS]
    tags = [LABELS[i % len(LABELS)] for i in range(len(contexts))]
    assert shared_prefix_length([formatter.prompt_ids(c) for c in contexts]) > 2
    for do_sample in (False, True):
        shared = decoding.generate(model, formatter.tokenizer, formatter, contexts, tags, batch_size=4,
                                     max_new_tokens=8, do_sample=do_sample, progress=False)
        with monkeypatch.context() as patched:
            patched.setattr(decoding, "can_share_prefix", lambda model: False)
            whole = decoding.generate(model, formatter.tokenizer, formatter, contexts, tags, batch_size=4,
                                        max_new_tokens=8, do_sample=do_sample, progress=False)
        assert shared == whole
    assert decoding.generate(model, formatter.tokenizer, formatter, [], [], progress=False) == []
