"""Model and tokenizer loading for every profile (DESIGN.md section 5): from scratch with a tokenizer
trained on the split, from a Hub id or folder, or from the offline cache's GGUF file (through its
de-quantised copy when `mhs models fetch` has written one); placed by the device rule."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tokenizers import ByteLevelBPETokenizer, Tokenizer
from tokenizers.processors import TemplateProcessing
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          GPT2Config, PreTrainedTokenizerFast, set_seed)

from mhsupport.data.examples_io import read_examples
from mhsupport.data.subsets import seeded_subset
from mhsupport.errors import MhsError
from mhsupport.modeling import devices

log = logging.getLogger(__name__)


def dequantised_dir(gguf_path: str | Path) -> Path:
    """Where `mhs models fetch` writes the de-quantised copy of a GGUF file: a Hugging Face model
    folder (fp32 safetensors, config, tokenizer) beside it, named after it."""
    gguf_path = Path(gguf_path)
    return gguf_path.with_name(gguf_path.stem + ".fp32")


def require_local(path: Path, what: str) -> Path:
    if not Path(path).exists():
        raise MhsError(f"{what} not found at {path}: run `mhs models fetch` for the offline weights, "
                       "or set the model path in config")
    return Path(path)


# --- tokenizers -------------------------------------------------------------------------

def train_bpe_tokenizer(texts, vocab_size: int, min_frequency: int, bert_inputs: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the given texts (the tiny profiles'). With
    bert_inputs, every encoding is wrapped as [CLS] ... [SEP], as BERT classifiers expect."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=["<|endoftext|>", "[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"],
                            show_progress=False)
    if bert_inputs:
        cls, sep = bpe.token_to_id("[CLS]"), bpe.token_to_id("[SEP]")
        bpe.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe.to_str()), eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]")


def tokenizer_texts(examples: list[dict]) -> list[str]:
    """The texts a from-scratch generator tokenizer is trained on: every context turn and response."""
    return [t["text"] for e in examples for t in e["context"]] + [e["response"] for e in examples]


# --- models -----------------------------------------------------------------------------

def load_causal_lm(model_cfg, placement: devices.Placement, train_texts=None):
    """(model, tokenizer) for a generator profile: from scratch, a Hub id / folder, or a GGUF file,
    placed by the device rule (devices.training or devices.inference)."""
    source = model_cfg.source
    if source == "scratch":
        if train_texts is None:
            raise MhsError("a from-scratch model needs training texts for its tokenizer")
        tokenizer = train_bpe_tokenizer(train_texts, model_cfg.tokenizer.vocab_size, model_cfg.tokenizer.min_frequency)
        arch = model_cfg.architecture
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=arch.n_positions, n_embd=arch.n_embd,
                            n_layer=arch.n_layer, n_head=arch.n_head, bos_token_id=tokenizer.eos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return devices.place(AutoModelForCausalLM.from_config(config), placement), tokenizer
    model, tokenizer = _pretrained_causal_lm(model_cfg)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return devices.place(model, placement), tokenizer


def _pretrained_causal_lm(model_cfg):
    """(model, tokenizer) of a pretrained or GGUF generator profile, in fp32 on the CPU."""
    source = model_cfg.source
    if source == "pretrained":
        name = model_cfg.name_or_path
        try:
            return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32), AutoTokenizer.from_pretrained(name)
        except OSError as err:
            raise MhsError(f"cannot load model {name!r}: {str(err).splitlines()[0]} "
                           "(a Hub id needs the Hub; a local folder must exist)") from None
    if source == "gguf":
        folder = require_local(Path(model_cfg.model_dir).expanduser(), "offline model folder")
        gguf_path = require_local(folder / model_cfg.gguf_file, "GGUF file")
        copy = dequantised_dir(gguf_path)
        if copy.is_dir():
            return AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32), AutoTokenizer.from_pretrained(copy)
        log.warning("de-quantising %s on load (about 20 s): run `mhs models fetch` once to keep an fp32 "
                    "copy that loads in under a second", gguf_path)
        return load_gguf(folder, model_cfg.gguf_file)
    raise MhsError(f"generator.source={source!r}: expected scratch, pretrained or gguf")


def load_gguf(folder: Path, gguf_file: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file, its tensors de-quantised to `dtype`."""
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    # An ordinary model from here on, trainable and saved without a quantisation config.
    model.is_quantized, model.hf_quantizer = False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def load_saved_causal_lm(path: Path, placement: devices.Placement):
    """(model, tokenizer) of a trained generator's folder: a plain model, or a LoRA adapter (loaded
    over its base model by peft and merged, so it is scored and generates as a merged run does)."""
    path = Path(path)
    model = _adapter_model(path) if (path / ADAPTER_CONFIG).is_file() else \
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return devices.place(model, placement), AutoTokenizer.from_pretrained(path)


# --- LoRA adapters: saved as peft keeps them, with a record of the base model to load under them ---

ADAPTER_CONFIG = "adapter_config.json"  # peft's
ADAPTER_BASE = "base_model.json"
SCRATCH_BASE_DIR = "base"  # a from-scratch base model exists nowhere else: the run keeps it


def adapter_base_record(model_cfg, vocab_size: int) -> dict:
    """What base_model.json holds: how the profile loads its base model (a from-scratch one: from the
    run's own base/ folder), its Hub id for reference, and the vocabulary size the adapters were
    trained with (the tag tokens added)."""
    keys = {"scratch": (), "pretrained": ("name_or_path",), "gguf": ("model_dir", "gguf_file")}[model_cfg.source]
    return {"source": model_cfg.source, **{key: str(model_cfg[key]) for key in keys},
            "base_model": model_cfg.base_model, "vocab_size": vocab_size}


def _adapter_model(path: Path):
    """A LoRA run's adapters loaded with `PeftModel.from_pretrained` over the base model its
    base_model.json names (resized to the run's vocabulary), then merged into the weights."""
    from peft import PeftModel

    record_file = path / ADAPTER_BASE
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError) as err:
        raise MhsError(f"{record_file}: unreadable ({err}); a LoRA adapter folder needs it to find its base model: "
                       "rebuild the run with `mhs train dialogpt ... --force`") from None
    if record["source"] == "scratch":
        try:
            base = AutoModelForCausalLM.from_pretrained(path / SCRATCH_BASE_DIR, dtype=torch.float32)
        except OSError as err:
            raise MhsError(f"{path / SCRATCH_BASE_DIR}: the adapter's base model is unreadable "
                           f"({str(err).splitlines()[0]}); rebuild the run with --force") from None
    else:
        base, _ = _pretrained_causal_lm(OmegaConf.create(record))
    if base.get_input_embeddings().num_embeddings != record["vocab_size"]:
        # Rows for the tag tokens; their trained values are the adapter's trainable tokens, which replace them.
        # Forked: the rows' random initialisation must not move the seeded RNG of the eval that loads this.
        with torch.random.fork_rng(devices=[]):
            base.resize_token_embeddings(record["vocab_size"], mean_resizing=False)
    return PeftModel.from_pretrained(base, path).merge_and_unload()


def load_scored_generator(cfg, generator_run: Path | None, data_run: Path, placement: devices.Placement):
    """(model, tokenizer) of the generator an eval or likelihood run scores: a fine-tuned run's model,
    or with no run the profile's model before fine-tuning (tiny: untrained, with the tokenizer its
    training would build from the same training subset)."""
    if generator_run is not None:
        return load_saved_causal_lm(generator_run / "model", placement)
    train = seeded_subset(read_examples(data_run, cfg.dataset, "train"), cfg.generator.train_subset, cfg.subset_seed)
    set_seed(cfg.seed)  # an untrained model's weights: the same in every stage that scores it
    return load_causal_lm(cfg.generator, placement, train_texts=tokenizer_texts(train))


def load_sequence_classifier(model_cfg, num_labels: int, placement: devices.Placement, train_texts=None):
    """(model, tokenizer) for a classifier profile: a small BERT from scratch or a BERT folder / Hub id,
    placed by the device rule."""
    if model_cfg.source == "scratch":
        tokenizer = train_bpe_tokenizer(train_texts, model_cfg.tokenizer.vocab_size, model_cfg.tokenizer.min_frequency,
                                        bert_inputs=True)
        arch = model_cfg.architecture
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=arch.hidden_size, num_hidden_layers=arch.num_layers,
                            num_attention_heads=arch.num_heads, intermediate_size=arch.intermediate_size,
                            max_position_embeddings=arch.max_positions, num_labels=num_labels,
                            pad_token_id=tokenizer.pad_token_id)
        return devices.place(AutoModelForSequenceClassification.from_config(config), placement), tokenizer
    path = model_cfg.name_or_path
    if model_cfg.source == "local":
        path = str(require_local(Path(path).expanduser(), "offline classifier model folder"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
    except OSError as err:
        raise MhsError(f"cannot load classifier {path!r}: {str(err).splitlines()[0]}") from None
    return devices.place(model, placement), tokenizer
