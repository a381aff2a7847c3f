"""Traced specs of transformers and CNN blocks: residual stream, heads, packed projections, depthwise,
grouped and concatenating convolutions. Every property is checked through the real forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelmerge.errors import VerificationError
from modelmerge.examples import blocks
from modelmerge.network import resolve_network
from modelmerge.permutation import (
    apply_permutation,
    check_permutation,
    random_permutation,
)
from modelmerge.spec import PermutationSpec
from modelmerge.trace import trace_spec
from modelmerge.verify import verify_permuted


class MHAModel(nn.Module):
    """``nn.MultiheadAttention`` (packed ``in_proj_weight``, sequence-first) between two Linear layers."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.attn(h, h, h)[0])


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 16)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True), 2,
                                         enable_nested_tensor=False)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)).mean(1))


class ConvNeXtish(nn.Module):
    """ConvNeXt-style: depthwise 7x7, channels-last LayerNorm and MLP (permute round trip), layer scale."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 2, stride=2)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.ones(c))
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(y))))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class EfficientNetish(nn.Module):
    """EfficientNet-style: a norm called as a function with its module's parameters, SiLU, squeeze-excite."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.expand = nn.Conv2d(c, 2 * c, 1)
        self.se_reduce, self.se_expand = nn.Conv2d(2 * c, 4, 1), nn.Conv2d(4, 2 * c, 1)
        self.project = nn.Conv2d(2 * c, c, 1)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        bn = self.bn
        x = torch.nn.functional.silu(torch.nn.functional.batch_norm(
            self.stem(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
        h = torch.nn.functional.silu(self.expand(x))
        s = torch.sigmoid(self.se_expand(torch.nn.functional.silu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        x = x + self.project(h * s)
        return self.head(x.mean((2, 3)))


def _hf(name):
    transformers = pytest.importorskip("transformers")
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=40, n_positions=16)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=16, intermediate_size=24,
                                  vocab_size=40, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


MODELS = {
    "vit": (lambda: blocks.TinyViT(dim=16, heads=4, mlp=24), (1, 8, 8)),
    "fused-vit": (lambda: blocks.FusedViT(dim=16, heads=4, mlp=24), (1, 8, 8)),
    "mha": (MHAModel, (5, 6)),  # [seq, batch, features]: batch is axis 1 here
    "encoder": (Encoder, (7, 5)),
    "mobilenet": (blocks.MobileNetish, (1, 8, 8)),
    "resnext": (blocks.ResNeXtish, (1, 8, 8)),
    "densenet": (blocks.DenseNetish, (1, 8, 8)),
    "convnext": (ConvNeXtish, (1, 8, 8)),
    "efficientnet": (EfficientNetish, (1, 8, 8)),
    "gpt2": (lambda: _hf("gpt2"), "tokens"),
    "bert": (lambda: _hf("bert"), "tokens"),
}


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every floating tensor random (BatchNorm variances positive), eval mode: nothing hides in constants."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
                if name.endswith("running_var"):
                    t.abs_().add_(0.5)
    return model.eval()


def _inputs(shape, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if shape == "tokens":
        return torch.randint(0, 40, (3, 6), generator=g)
    return torch.randn(3, *shape, generator=g)


def _outputs(model, x):
    from modelmerge.network import output_tensors

    with torch.no_grad():
        return output_tensors(model(x))


def _traced(name):
    make, shape = MODELS[name]
    model = _randomise(make(), 0)
    x = _inputs(shape)
    return model, x, trace_spec(model, (x,))


@pytest.mark.parametrize("name", MODELS)
def test_structured_random_permutations_preserve_the_function(name):
    model, x, result = _traced(name)
    spec = result.spec
    assert result.fraction > 0.9, (result.permutable, result.units, result.warnings)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = _outputs(model, x)
    for seed in (1, 2):
        perm = random_permutation(spec, torch.Generator().manual_seed(seed))
        check_permutation(spec, perm)
        permuted = apply_permutation(state, spec, perm)
        assert any(not torch.equal(permuted[k], state[k]) for k in state)
        model.load_state_dict(permuted)
        for a, b in zip(before, _outputs(model, x)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        model.load_state_dict(state)


@pytest.mark.parametrize("name", ["vit", "fused-vit", "mha", "encoder", "resnext", "densenet", "convnext", "gpt2",
                                  "bert"])
def test_weight_matching_recovers_planted_structured_permutations(name):
    from conftest import assert_recovers_planted

    model, _, result = _traced(name)
    assert_recovers_planted(model.state_dict(), result.spec, 7)


def _head_set(spec: PermutationSpec, member_prefix: str):
    return next(hs for hs in spec.heads.values() if any(g.startswith(member_prefix) for g in hs.groups))


def test_vit_stream_ties_embeddings_tokens_norms_and_heads():
    _, _, result = _traced("vit")
    ax = result.spec.axes
    stream = ax["patch_embed.weight"][0]
    assert ax["cls_token"] == (None, None, stream) and ax["pos_embedding"] == (None, None, stream)
    for key in ("blocks.0.norm1.weight", "blocks.1.norm2.bias", "norm.weight"):
        assert ax[key] == (stream,)
    assert ax["blocks.0.attn.q.weight"][1] == stream and ax["blocks.1.attn.proj.weight"][0] == stream
    assert ax["blocks.0.fc2.weight"][0] == stream and ax["blocks.0.fc2.weight"][1] == ax["blocks.0.fc1.weight"][0] != stream and ax["head.weight"] == (None, stream)
    qk, vo = ax["blocks.0.attn.q.weight"][0], ax["blocks.0.attn.v.weight"][0]
    assert ax["blocks.0.attn.k.weight"][0] == qk and ax["blocks.0.attn.proj.weight"][1] == vo and qk != vo
    heads = _head_set(result.spec, "blocks.0.attn")
    assert heads.count == 4 and set(heads.groups) == {qk, vo} and not heads.rigid


def test_packed_projections_become_segments():
    _, _, mha = _traced("mha")
    entry = mha.spec.axes["attn.in_proj_weight"][0]
    (qk, n1), (k2, n2), (vo, n3) = entry
    assert qk == k2 and qk != vo and n1 == n2 == n3 == 16
    assert mha.spec.axes["attn.out_proj.weight"][1] == vo
    _, _, gpt = _traced("gpt2")
    w = gpt.spec.axes["transformer.h.0.attn.c_attn.weight"]  # GPT-2's Conv1D: [in, 3 * out]
    assert w[0] == gpt.spec.axes["transformer.wte.weight"][1] and len(w[1]) == 3
    assert gpt.spec.axes["lm_head.weight"] == gpt.spec.axes["transformer.wte.weight"]  # tied embedding


def test_cnn_blocks_depthwise_grouped_and_concatenation():
    _, _, mobile = _traced("mobilenet")
    ax = mobile.spec.axes
    dw = next(k for k, m in blocks.MobileNetish().named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    expand = ax[f"{dw}.weight"][0]
    assert expand is not None and ax[f"{dw}.weight"][1] is None  # the depthwise conv carries its input's group
    _, _, resnext = _traced("resnext")
    rigid = [hs for hs in resnext.spec.heads.values() if hs.rigid]
    assert rigid and all(hs.count == 4 and len(hs.groups) == 2 for hs in rigid)
    _, _, dense = _traced("densenet")
    segmented = [ax for ax in dense.spec.axes.values() if any(isinstance(a, tuple) for a in ax)]
    assert segmented and all(all(g is not None for g, _ in a) for ax in segmented for a in ax if isinstance(a, tuple))


def test_wrong_head_tying_is_caught_by_verification():
    model, _, result = _traced("vit")
    spec = result.spec
    wrong = PermutationSpec(spec.groups, spec.axes)  # heads forgotten: q/k units move across heads freely
    state = {k: v.clone() for k, v in model.state_dict().items()}
    net = resolve_network(state, spec=wrong, module=model, input_shape=(1, 8, 8))
    assert net.spec_source == "file" and net.forward_kind == "model"  # --spec with --model: no tracing
    permuted = apply_permutation(state, wrong, random_permutation(wrong, torch.Generator().manual_seed(3)))
    with pytest.raises(VerificationError, match="differ"):
        verify_permuted(state, permuted, net)
    good = resolve_network(state, module=model, input_shape=(1, 8, 8))
    perm = random_permutation(good.spec, torch.Generator().manual_seed(3))
    assert verify_permuted(state, apply_permutation(state, good.spec, perm), good).forward == "model"


def test_token_models_resolve_with_integer_inputs():
    model = _randomise(_hf("bert"), 0)
    net = resolve_network(model.state_dict(), module=model)
    x = net.random_inputs(4, torch.Generator().manual_seed(0))
    assert x.dtype == torch.long and int(x.max()) < 40
    assert net.spec.heads


class CumsumEverywhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x).cumsum(1)  # order-dependent: every group held fixed
        return self.out(x)


def test_warnings_are_summarised_and_low_coverage_is_said():
    result = trace_spec(CumsumEverywhere())
    assert len(result.warnings) == 1 and "3 place(s)" in result.warnings[0]
    assert result.permutable == 0 and result.units == 24
    net = resolve_network(CumsumEverywhere().state_dict(), module=CumsumEverywhere())
    assert any("0 of 24 hidden units" in w for w in net.warnings)


def test_hugging_face_checkpoint_saved_without_its_tied_head_aligns_from_the_cli(tmp_path):
    """save_pretrained drops GPT-2's lm_head.weight (it is the embedding): align fills it for the forward,
    writes only the keys it read, and verifies through the real model."""
    pytest.importorskip("transformers")
    import json

    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from modelmerge.cli.app import app

    kwargs = {"class": "GPT2LMHeadModel", "n_layer": 2, "n_head": 2, "n_embd": 16, "vocab_size": 40,
              "n_positions": 16}
    paths = []
    for seed in (0, 1):
        state = _randomise(_hf("gpt2"), seed).state_dict()
        p = tmp_path / f"gpt{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, str(p))
        paths.append(p)
    out = tmp_path / "aligned.safetensors"
    r = CliRunner().invoke(app, ["align", str(paths[0]), str(paths[1]), "-o", str(out), "--model", "modelmerge.hf:build",
                                 "--model-kwargs", json.dumps(kwargs), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["verified"]["forward"] == "model" and report["spec"]["source"] == "traced"
    written = load_file(str(out))
    assert "lm_head.weight" not in written and set(written) == set(load_file(str(paths[1])))


def test_a_transformers_checkpoint_with_other_names_says_how_to_resave_it(tmp_path):
    """save_pretrained of one transformers version may write names another version's class renames only
    inside from_pretrained (ViT under 5.x): the strict load failed with 'check --model-kwargs' alone,
    though the kwargs were right (black-box sweep)."""
    pytest.importorskip("transformers")
    import json

    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from modelmerge.cli.app import app

    kwargs = {"class": "GPT2LMHeadModel", "n_layer": 2, "n_head": 2, "n_embd": 16, "vocab_size": 40,
              "n_positions": 16}
    state = {k.replace(".attn.", ".attention."): v.clone() for k, v in _hf("gpt2").state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "old.safetensors"))
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "old.safetensors"), "--model", "modelmerge.hf:build",
                                 "--model-kwargs", json.dumps(kwargs)])
    assert r.exit_code == 1 and "save_pretrained" in r.stderr and "from_pretrained" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1


HF_MORE = {
    # rotary embeddings fix q/k and the head order; v/o units still move within each head
    "llama": ("LlamaForCausalLM", "LlamaConfig", {"num_key_value_heads": 2}),
    # grouped-query attention: attention held fixed, MLPs and the stream still move
    "llama-gqa": ("LlamaForCausalLM", "LlamaConfig", {"num_key_value_heads": 1}),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig",
                   {"dim": 16, "n_layers": 2, "n_heads": 2, "hidden_dim": 32}),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig", {}),
    "gpt-neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", {}),  # per-head interleaved fused qkv: held fixed
    "opt": ("OPTForCausalLM", "OPTConfig", {"ffn_dim": 32, "word_embed_proj_dim": 16}),
}


@pytest.mark.parametrize("name", HF_MORE)
def test_more_hugging_face_classes_keep_their_function(name):
    transformers = pytest.importorskip("transformers")
    cls, config_cls, extra = HF_MORE[name]
    fields = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
              "vocab_size": 40, "max_position_embeddings": 32, **extra}
    model = _randomise(getattr(transformers, cls)(getattr(transformers, config_cls)(**fields)), 0)
    x = _inputs("tokens")
    result = trace_spec(model, (x,))
    assert result.permutable > 0
    if name == "llama":  # one group per head for v and the output projection's input
        assert sum("v_proj.out[" in g for g in result.spec.groups) == 4
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = _outputs(model, x)
    for seed in (1, 2):
        model.load_state_dict(apply_permutation(state, result.spec,
                                                random_permutation(result.spec, torch.Generator().manual_seed(seed))))
        for a, b in zip(before, _outputs(model, x)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
