"""How much of each model the tracer can permute: groups, fraction of units permutable, warnings.

For every model of a fixed table (modelmerge.examples.blocks, modelmerge.examples.models,
tiny Hugging Face transformers, a bare ``nn.TransformerEncoder`` and a bare
``nn.MultiheadAttention``), calls ``modelmerge.trace.trace_spec(model)`` (with an example
input when ``trace_spec`` takes an ``example_inputs`` or ``example`` keyword: a tuple of
positional arguments: images ``[2, 1, 8, 8]``, token ids ``randint(0, 50, (2, 6))``,
sequences ``[2, 40]``, a stream ``[2, 6, 16]``, ``(x, x, x)`` for the bare attention) and reports
its spec's number of groups, the fraction of units permutable and the number of warnings.
A tracer error is caught and reported in its row.

Units. For every parameter with ``ndim >= 2`` (``model.named_parameters()``, so a tied weight
counts once, under its first name), its *output-feature axis* holds that many units:

* axis 0 for Linear and Conv weights and packed projections (``in_proj_weight`` of
  ``nn.MultiheadAttention``, a fused ``qkv``): the brief's "axis-0 length";
* axis 1 for ``nn.Embedding`` weights (the embedding features, not the vocabulary), and for
  the Hugging Face ``Conv1D`` weights of GPT-2, stored ``[in, out]``;
* the last axis for a free-standing parameter that is no layer's weight (a ``cls_token``
  ``[1, 1, D]``, a position table ``[1, N, D]``): its features.

The model's final output layer(s) are excluded (the ``output`` column of :data:`MODELS`: a
classifier head, GPT-2's ``lm_head`` (tied to ``wte``, so already counted once as the
embedding), BERT's pooler, the bare attention's ``out_proj``). A unit is *permutable* when the
spec entry of that axis is a group name (a string: every unit, also when the axis is permuted
in blocks), or, for a segmented entry (a tuple of ``(group | None, length)`` pairs), the
length covered by the segments whose group is not None. A parameter missing from the spec
counts as fixed. Constraints between groups (head sets: units moving in chunks, rigid members
of a grouped conv) are not reflected: a unit of any group counts as permutable.

The ceiling is 1.0 where the model's only output is its logits. It is below 1.0 where a
residual stream is itself an output and so can never be permuted: BertModel (returns
``last_hidden_state``) and the bare ``nn.TransformerEncoder`` (whose input and output are the
stream: every ``out_proj`` and ``linear2`` writes into it); their notes give the ceiling (the
units outside the stream: q/k/v and the MLP's hidden layer). GPT-2 is built with
``use_cache=False`` so that its keys and values are not outputs.

    python benchmarks/permutable.py [--json out.json] [--only TinyViT,GPT2LMHeadModel]
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

IMAGES = (2, 1, 8, 8)
VOCAB = 50


@dataclass(frozen=True)
class Entry:
    """One row: how to build the model, its example input (positional arguments), its output layers."""

    name: str
    build: Callable[[], nn.Module]
    example: Callable[[], tuple]
    output: tuple[str, ...]  # module prefixes whose parameters are the model's output layers
    note: str = ""


def _images() -> tuple:
    return (torch.randn(IMAGES),)


def _tokens() -> tuple:
    return (torch.randint(0, VOCAB, (2, 6)),)


def _blocks(name: str, **kw) -> Callable[[], nn.Module]:
    def build():
        from modelmerge.examples import blocks

        return getattr(blocks, name)(**kw)

    return build


def _models(name: str) -> Callable[[], nn.Module]:
    def build():
        from modelmerge.examples import models

        return getattr(models, name)()

    return build


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=16,
                                      bos_token_id=0, eos_token_id=0, use_cache=False))


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=16, intermediate_size=32,
                                vocab_size=VOCAB, max_position_embeddings=16))


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=16,
                                               intermediate_size=32, image_size=8, patch_size=4, num_channels=1,
                                               num_labels=10))


def _hf_lm(cls_name: str, config_name: str, **extra) -> Callable[[], nn.Module]:
    """A tiny Hugging Face model of ``cls_name`` (hidden 16, 2 layers, 2 heads)."""

    def build() -> nn.Module:
        import transformers

        fields = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
                  "vocab_size": VOCAB, "max_position_embeddings": 32, "use_cache": False, **extra}
        return getattr(transformers, cls_name)(getattr(transformers, config_name)(**fields))

    return build


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _mha() -> nn.Module:
    return nn.MultiheadAttention(16, 2, batch_first=True)


def _stream() -> tuple:
    return (torch.randn(2, 6, 16),)


def _qkv() -> tuple:
    x = torch.randn(2, 6, 16)
    return (x, x, x)


MODELS = (
    Entry("TinyViT", _blocks("TinyViT"), _images, ("head",)),
    Entry("FusedViT", _blocks("FusedViT"), _images, ("head",)),
    Entry("EncoderClassifier", _blocks("EncoderClassifier", seq=40), lambda: (torch.randn(2, 40),), ("head",)),
    Entry("MobileNetish", _blocks("MobileNetish"), _images, ("head",)),
    Entry("ResNeXtish", _blocks("ResNeXtish"), _images, ("head",)),
    Entry("DenseNetish", _blocks("DenseNetish"), _images, ("head",)),
    Entry("GPT2LMHeadModel", _gpt2, _tokens, ("lm_head",), "use_cache=False; lm_head tied to wte"),
    Entry("BertModel", _bert, _tokens, ("pooler",), "last_hidden_state is an output: ceiling 160/272 = 0.588"),
    Entry("ViTForImageClassification", _vit, _images, ("classifier",)),
    Entry("LlamaForCausalLM", _hf_lm("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2), _tokens,
          ("lm_head",), "rotary q/k: q/k and the head order held fixed, v/o permuted within each head"),
    Entry("LlamaForCausalLM (GQA)", _hf_lm("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=1), _tokens,
          ("lm_head",), "rotary q/k and grouped-query attention: attention held fixed"),
    Entry("GPTNeoXForCausalLM", _hf_lm("GPTNeoXForCausalLM", "GPTNeoXConfig"), _tokens, ("embed_out",),
          "per-head interleaved qkv: attention held fixed"),
    Entry("OPTForCausalLM", _hf_lm("OPTForCausalLM", "OPTConfig", ffn_dim=32, word_embed_proj_dim=16), _tokens,
          ("lm_head",)),
    Entry("DistilBertForSequenceClassification",
          _hf_lm("DistilBertForSequenceClassification", "DistilBertConfig", dim=16, n_layers=2, n_heads=2,
                 hidden_dim=32), _tokens, ("classifier",)),
    Entry("nn.TransformerEncoder", _encoder, _stream, (), "stream is input and output: ceiling 160/224 = 0.714"),
    Entry("nn.MultiheadAttention", _mha, _qkv, ("out_proj",), "called as (x, x, x)"),
    Entry("VGGish", _models("VGGish"), _images, ("classifier.3",)),
    Entry("ResNetish", _models("ResNetish"), _images, ("head",)),
)

_AXIS0_WEIGHTS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.Bilinear)


def unit_axis(model: nn.Module, name: str, p: torch.Tensor) -> int:
    """The output-feature axis of parameter ``name`` (see the module docstring)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if isinstance(owner, nn.Embedding) and leaf == "weight":
        return 1
    if type(owner).__name__ == "Conv1D" and hasattr(owner, "nf") and leaf == "weight":
        return 1  # transformers' GPT-2 Conv1D: weight [in, out]
    if isinstance(owner, _AXIS0_WEIGHTS) and leaf == "weight":
        return 0
    if isinstance(owner, nn.MultiheadAttention) and leaf.endswith("_weight"):
        return 0  # in_proj_weight (packed q/k/v) or q/k/v_proj_weight
    if leaf == "weight":
        return 0  # another layer's weight: [out, in, ...] by convention
    return p.ndim - 1  # a free-standing parameter (cls token, position table): its features


def permutable_units(entry, length: int) -> int:
    """Units of one axis that its spec entry permutes (a group name, None, or (group, length) segments)."""
    if entry is None:
        return 0
    if isinstance(entry, str):
        return length
    if isinstance(entry, (tuple, list)):
        return sum(int(seg_len) for group, seg_len in entry if group is not None)
    raise TypeError(f"unexpected spec axis entry {entry!r}")


def count_units(model: nn.Module, spec, output: tuple[str, ...]) -> tuple[int, int, list[str]]:
    """(units, permutable units, parameters missing from the spec) over the counted parameters."""
    total = perm = 0
    missing = []
    for name, p in model.named_parameters():
        if p.ndim < 2 or any(name == o or name.startswith(o + ".") for o in output):
            continue
        axis = unit_axis(model, name, p)
        n = int(p.shape[axis])
        total += n
        if spec is None:
            continue
        axes = spec.axes.get(name)
        if axes is None:
            missing.append(name)
            continue
        perm += min(n, permutable_units(axes[axis], n))
    return total, perm, missing


def example_keyword(trace_spec) -> str | None:
    """The keyword ``trace_spec`` takes an example input by (``example_inputs`` or ``example``), or None."""
    try:
        params = inspect.signature(trace_spec).parameters
    except (TypeError, ValueError):
        return None
    return next((k for k in ("example_inputs", "example") if k in params), None)


def measure(entry: Entry) -> dict:
    from modelmerge.trace import trace_spec

    torch.manual_seed(0)
    model = entry.build().eval()
    row = {"model": entry.name, "params": sum(p.numel() for p in model.parameters()), "note": entry.note,
           "output_layers": list(entry.output)}
    t0 = time.perf_counter()
    spec, warnings, error = None, [], None
    try:
        keyword = example_keyword(trace_spec)
        if keyword is not None:
            result = trace_spec(model, **{keyword: entry.example()})
        else:
            result = trace_spec(model)
        spec, warnings = result.spec, list(result.warnings)
    except Exception as e:  # noqa: BLE001 - report whatever the tracer raised
        error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    row["seconds"] = round(time.perf_counter() - t0, 3)
    units, perm, missing = count_units(model, spec, entry.output)
    row.update({
        "groups": None if spec is None else len(spec.groups),
        "units": units,
        "permutable": perm if spec is not None else None,
        "fraction": round(perm / units, 4) if spec is not None and units else None,
        "warnings": len(warnings),
        "warning_text": warnings,
        "missing_from_spec": missing,
        "error": error,
    })
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write every row (warnings' text included) to this file")
    ap.add_argument("--only", help="comma-separated model names (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--show-warnings", action="store_true", help="print each model's warnings after the table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from modelmerge.trace import trace_spec

    entries = MODELS
    if args.only:
        wanted = set(args.only.split(","))
        entries = tuple(e for e in MODELS if e.name in wanted)
        unknown = wanted - {e.name for e in entries}
        if unknown:
            ap.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(e.name for e in MODELS)}")
    rows = [measure(e) for e in entries]
    keyword = example_keyword(trace_spec)
    how = f"with {keyword}=<example>" if keyword else "without an example input"
    print(f"### permutable units — torch {torch.__version__}, {platform.machine()}, trace_spec {how}\n")
    print("| model | params | groups | units | permutable | fraction | warnings | s | error / note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        frac = "-" if r["fraction"] is None else f"{r['fraction']:.3f}"
        groups = "-" if r["groups"] is None else r["groups"]
        permutable = "-" if r["permutable"] is None else r["permutable"]
        extra = r["error"] or r["note"]
        if r["missing_from_spec"]:
            extra = f"{extra}; missing from spec: {', '.join(r['missing_from_spec'])}".lstrip("; ")
        extra = extra.replace("|", "\\|")
        print(f"| {r['model']} | {r['params']} | {groups} | {r['units']} | {permutable} | {frac} | "
              f"{r['warnings']} | {r['seconds']:.2f} | {extra} |")
    if args.show_warnings:
        for r in rows:
            if r["warning_text"]:
                print(f"\n{r['model']}:")
                for w in r["warning_text"]:
                    print(f"  - {w}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "example_keyword": keyword, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
