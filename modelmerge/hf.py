"""Hugging Face ``transformers`` classes for ``--model`` (an optional extra: ``pip install 'modelmerge-align[hf]'``).

A ``PreTrainedModel`` is built from a configuration, never from downloaded
weights (the checkpoints are what modelmerge aligns)::

    modelmerge align a.safetensors b.safetensors -o b_aligned.safetensors \\
        --model modelmerge.hf:build \\
        --model-kwargs '{"class": "GPT2LMHeadModel", "n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 100}'

    # or the config.json saved next to the checkpoints by save_pretrained:
    --model modelmerge.hf:build --model-kwargs '{"class": "BertForSequenceClassification", "config": "run/config.json"}'

The model is traced with ``torch.export`` (``use_cache=False``) and verified through
its real forward on random token ids (or images for vision models).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from modelmerge.errors import ModelMergeError, parse_json, read_text


def build(**kwargs) -> nn.Module:
    """Build a ``transformers`` model class from its configuration.

    Args:
        class: the class name in ``transformers`` (``"GPT2LMHeadModel"``, ``"BertModel"``,
            ``"ViTForImageClassification"``, ...).
        config: optional path to a ``config.json`` (a local file; nothing is downloaded).
        **kwargs: the remaining keys are configuration fields (they override the file's).

    Returns:
        The model, randomly initialised (load the checkpoint into it).

    Raises:
        ModelMergeError: transformers is not installed, the class is unknown, or the config cannot be read.
    """
    try:
        import transformers
    except ImportError:
        raise ModelMergeError("--model modelmerge.hf:build needs Hugging Face transformers: "
                              "pip install 'modelmerge-align[hf]'") from None
    name = kwargs.pop("class", None)
    if not isinstance(name, str):
        raise ModelMergeError('modelmerge.hf:build needs "class" in --model-kwargs, e.g. {"class": "GPT2LMHeadModel"}')
    cls = getattr(transformers, name, None)
    config_cls = getattr(cls, "config_class", None)
    if cls is None or config_cls is None:
        raise ModelMergeError(f"transformers has no model class {name!r} (e.g. GPT2LMHeadModel, BertModel)")
    fields = {}
    path = kwargs.pop("config", None)
    if path is not None:
        text = read_text(Path(path), "the config")
        fields = parse_json(text, f"the config {path}", fix="pass a local config.json")
        if not isinstance(fields, dict):
            raise ModelMergeError(f"the config {path} is not a JSON object")
    fields.update(kwargs)
    fields.pop("architectures", None)
    fields.pop("model_type", None)
    try:
        config = config_cls(**fields)
    except (TypeError, ValueError) as e:
        raise ModelMergeError(f"invalid {config_cls.__name__}: {e}") from None
    config.use_cache = False
    return cls(config)
