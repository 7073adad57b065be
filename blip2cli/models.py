"""The catalogue of BLIP-2 checkpoints by short name, and the Hugging Face cache.

``--model opt-2.7b`` (everywhere a model is taken) means ``Salesforce/blip2-opt-2.7b``:
``resolve()`` maps a short name to its hub id in the shared loader, unless a local
folder of that name exists (the folder wins). ``blip2 models`` lists the catalogue
and ``blip2 models download NAME`` fetches one. Importing this module is cheap
(no torch, no transformers, no huggingface_hub): ``--help`` builds from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    name: str  # short name
    repo_id: str  # hub id
    task: str  # what the checkpoint can do in blip2
    params_b: float  # parameters, billions (vision + Q-Former + language model; opt-2.7b counted
    # on the model bench --from-config builds: 7.49 GB of bfloat16 parameters)

    @property
    def fp16_gb(self) -> float:
        """Weights in float16/bfloat16, GB (10**9 bytes): two bytes a parameter."""
        return self.params_b * 2


_GEN = "caption, ask, chat"
CATALOGUE: tuple[Entry, ...] = (
    Entry("opt-2.7b", "Salesforce/blip2-opt-2.7b", _GEN, 3.74),
    Entry("opt-6.7b", "Salesforce/blip2-opt-6.7b", _GEN, 7.75),
    Entry("flan-t5-xl", "Salesforce/blip2-flan-t5-xl", _GEN, 3.94),
    Entry("flan-t5-xxl", "Salesforce/blip2-flan-t5-xxl", _GEN, 12.23),
    Entry("opt-2.7b-coco", "Salesforce/blip2-opt-2.7b-coco", _GEN + " (fine-tuned on COCO captions)", 3.74),
    Entry("opt-6.7b-coco", "Salesforce/blip2-opt-6.7b-coco", _GEN + " (fine-tuned on COCO captions)", 7.75),
    Entry("flan-t5-xl-coco", "Salesforce/blip2-flan-t5-xl-coco", _GEN + " (fine-tuned on COCO captions)", 3.94),
    Entry("itm", "Salesforce/blip2-itm-vit-g", "embed, search, score (image-text retrieval)", 1.17),
)
BY_NAME = {e.name: e for e in CATALOGUE}

# What `blip2 models download` fetches: the weights in safetensors and the small
# files transformers reads (config, processor, tokenizer). Pickle weights are not
# downloaded: the loader refuses them without --allow-pickle anyway.
DOWNLOAD_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model", "*.tiktoken"]


def resolve(model: str) -> str:
    """A short name becomes its hub id; a local folder of that name wins; anything else is kept."""
    entry = BY_NAME.get(model.strip().lower()) if model else None
    if entry is None or os.path.exists(os.path.expanduser(model)):
        return model
    return entry.repo_id


def entry_for(name_or_id: str) -> Entry | None:
    """The catalogue entry of a short name or of a hub id in the catalogue."""
    key = name_or_id.strip()
    if key.lower() in BY_NAME:
        return BY_NAME[key.lower()]
    for e in CATALOGUE:
        if e.repo_id.lower() == key.lower():
            return e
    return None


def cached(repo_id: str, revision: str | None = None) -> str:
    """Whether the model is in the local Hugging Face cache: 'yes', 'partly' or 'no'.

    'yes' means the config and the weights named by the snapshot are there;
    the cache layout is read from disk only (no network)."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(config, str):
        return "no"
    folder = os.path.dirname(config)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        import json

        try:
            with open(index, encoding="utf-8") as f:
                shards = set(json.load(f).get("weight_map", {}).values())
        except (OSError, ValueError):
            return "partly"
        return "yes" if shards and all(os.path.isfile(os.path.join(folder, s)) for s in shards) else "partly"
    return "yes" if os.path.isfile(os.path.join(folder, "model.safetensors")) else "partly"
