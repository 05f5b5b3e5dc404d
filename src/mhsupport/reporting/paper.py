"""The paper's systems, its numbers and its orderings, as data: which evals Table 2 and Table 4 are
made of, the BLEU the paper reports for them, the ESConv paper's own scores as a scale reference, and
the orderings the paper claims (each tested by the report)."""

from __future__ import annotations

# The paper's BLEU (scale unstated, probably 0-1; DESIGN.md section 1).
PAPER_TABLE2 = {"Pretrained": 0.073, "ESConv": 0.226, "Unified": 0.229, "ESConv+tag": 0.293, "Unified+tag": 0.300}

PAPER_TABLE4 = {("esconv", "none"): 0.293, ("esconv", "random"): 0.271, ("esconv", "classifier"): 0.313,
                ("unified", "none"): 0.300, ("unified", "random"): 0.278, ("unified", "classifier"): 0.331}

TABLE2_SYSTEMS = {
    "Pretrained": {"generator_source": "base", "dataset": "esconv", "strategy_tag": False, "sampler": "none"},
    "ESConv": {"dataset": "esconv", "strategy_tag": False, "sampler": "none"},
    "Unified": {"dataset": "unified", "strategy_tag": False, "sampler": "none"},
    "ESConv+tag": {"dataset": "esconv", "strategy_tag": True, "sampler": "none"},
    "Unified+tag": {"dataset": "unified", "strategy_tag": True, "sampler": "none"},
}

# The ESConv paper's automatic evaluation (Liu et al., ACL 2021) under the esconv protocol:
# other models (DialoGPT with strategy tokens: Joint predicts the strategy, Oracle is given the gold
# one), all of ESConv, its own random split.
LITERATURE = [
    {"system": "Liu et al. 2021: DialoGPT-Joint (other model, data, split)", "esconv_bleu_2": 5.00,
     "esconv_rouge_l": 15.09},
    {"system": "Liu et al. 2021: DialoGPT-Oracle (other model, data, split)", "esconv_bleu_2": 5.52,
     "esconv_rouge_l": 15.82},
]

DATASET_NAMES = {"esconv": "ESConv", "unified": "Unified"}

ORDERINGS = [  # (claim, system A, system B): B should beat A
    ("tag > no tag (ESConv)", "table2/ESConv", "table2/ESConv+tag"),
    ("tag > no tag (Unified)", "table2/Unified", "table2/Unified+tag"),
    ("unified > ESConv (tagged)", "table2/ESConv+tag", "table2/Unified+tag"),
    ("classifier > none (ESConv)", "table4/esconv/none", "table4/esconv/classifier"),
    ("classifier > none (Unified)", "table4/unified/none", "table4/unified/classifier"),
    ("none > random (ESConv)", "table4/esconv/random", "table4/esconv/none"),
    ("none > random (Unified)", "table4/unified/random", "table4/unified/none"),
    ("oracle > classifier (ESConv)", "table4/esconv/classifier", "table4/esconv/oracle"),
    ("oracle > classifier (Unified)", "table4/unified/classifier", "table4/unified/oracle"),
]


def systems(table4_samplers) -> dict[str, dict]:
    """Every eval the report reads: Table 2's rows and Table 4's dataset x sampler cells."""
    out = {f"table2/{name}": values for name, values in TABLE2_SYSTEMS.items()}
    for dataset in ("esconv", "unified"):
        for sampler in table4_samplers:
            out[f"table4/{dataset}/{sampler}"] = {"dataset": dataset, "strategy_tag": True, "sampler": sampler}
    return out
