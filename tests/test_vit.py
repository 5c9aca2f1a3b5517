"""The ``vit`` student (CivT): parameter counts, token embeddings, gradients, both token kinds."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import kdkit
from kdkit.errors import KdkitError
from kdkit.plugin.discovery import default_plugins
from kdkit_plugins.heads import linear
from kdkit_plugins.vit import kdkit_convert_checkpoint, vit

TOKENS = ["cls", "conv", "inv"]
SMALL = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, drop_path_rate=0.0)
KINDS = ["learned", "stem"]


def small_vit(token_kind: str, tokens: list[str] = TOKENS):
    torch.manual_seed(0)
    return vit(tokens=tokens, token_kind=token_kind, **SMALL)


def images(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def count(*modules) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


@pytest.mark.parametrize("preset, deit, expected", [
    ("ti", "deit_tiny_distilled_patch16_224", 6_104_184),
    ("s", "deit_small_distilled_patch16_224", 22_822_200),
])
def test_civt_parameter_count_with_three_heads(preset, deit, expected):
    """CivT = DeiT's distilled model plus one token, one position slot and one head (the paper's counts)."""
    with torch.device("meta"):
        student = vit(preset=preset, tokens=TOKENS)
        dim = student.embed_dim
        heads = [linear(in_features=dim, num_classes=1000) for _ in TOKENS]
        deit_count = count(timm.create_model(deit))
    assert count(student, *heads) == expected
    assert expected == deit_count + dim + dim + (dim * 1000 + 1000)


@torch.no_grad()
def test_initialised_as_deit():
    """Learned tokens, position embedding and linear layers: truncated normal, std 0.02."""
    student = vit(preset="ti", tokens=TOKENS, img_size=32, patch_size=4, depth=1)
    learned = torch.cat([token.flatten() for token in student.dist_tokens.values()])
    for tensor in (learned, student.pos_embed, student.blocks[0].attn.qkv.weight):
        assert 0.015 < tensor.std() < 0.025


@pytest.mark.parametrize("preset, dim, heads", [("ti", 192, 3), ("s", 384, 6)])
def test_presets_are_deit_ti_and_s(preset, dim, heads):
    """224 px, 16 px patches, 12 blocks, DeiT's widths and heads, and drop path rising to 0.1 (DeiT's recipe)."""
    with torch.device("meta"):
        student = vit(preset=preset)
    assert (student.patch_embed.img_size, student.patch_embed.patch_size) == ((224, 224), (16, 16))
    assert (student.embed_dim, len(student.blocks), student.blocks[0].attn.num_heads) == (dim, 12, heads)
    assert student.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert isinstance(student.head, torch.nn.Identity)  # kdkit's heads classify, not timm's


@torch.no_grad()
def test_the_class_token_starts_as_each_kind_of_reference_started_it():
    """Learned tokens: today's timm (std 1e-6); stem tokens: the released code's timm (std 0.02), the stems'
    convolutions Kaiming normal (std sqrt(2 / fan_in); PyTorch's default has 1 / sqrt(3 fan_in)) and their
    biases (the involution's kernel generation) at zero, as mmcv started them."""
    assert small_vit("learned").cls_token.std() < 1e-5
    stem = small_vit("stem")
    assert 0.015 < stem.cls_token.std() < 0.025
    biases = [m.bias for m in stem.stems.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None]
    stem_biases = [m.bias for s in stem.stems.values() for m in s.stem.modules()
                   if isinstance(m, torch.nn.Conv2d) and m.bias is not None]
    assert stem_biases and all(not b.any() for b in stem_biases)
    assert any(b.any() for b in biases)  # the projections keep PyTorch's initial bias
    projection = stem.stems["conv"].proj.weight
    assert projection.std() == pytest.approx((2 / projection[0].numel()) ** 0.5, rel=0.05)


def test_only_a_released_civt_checkpoint_is_converted():
    """Both stems' projections mark the released layout; a checkpoint with one of them is someone else's."""
    both = {"conv_embed.proj.weight": torch.zeros(1), "inv_embed.proj.weight": torch.zeros(1)}
    assert set(kdkit_convert_checkpoint(both)) == {"student.stems.conv.proj.weight", "student.stems.inv.proj.weight"}
    for key in both:
        assert kdkit_convert_checkpoint({key: torch.zeros(1)}) is None


@pytest.mark.parametrize("token_kind", KINDS)
def test_one_embedding_per_token_in_order(token_kind):
    student = small_vit(token_kind, tokens=["inv", "cls", "conv"])
    out = student(images(2))
    assert list(out) == ["inv", "cls", "conv"]
    assert all(e.shape == (2, 48) for e in out.values())
    assert student.embedding_dims == {"inv": 48, "cls": 48, "conv": 48}


@pytest.mark.parametrize("token_kind", KINDS)
def test_position_embedding_covers_every_token(token_kind):
    for tokens in (["cls"], TOKENS):
        student = small_vit(token_kind, tokens)
        assert student.pos_embed.shape == (1, (32 // 4) ** 2 + len(tokens), 48)


def test_learned_tokens_without_class_token():
    student = small_vit("learned", tokens=["teacher", "aux"])  # names either side of "cls" in sort order
    assert student.cls_token is None
    assert list(student(images(2))) == ["teacher", "aux"]
    assert student.no_weight_decay() == {"pos_embed", "dist_tokens.teacher", "dist_tokens.aux"}


@pytest.mark.parametrize("token_kind, expected", [
    ("learned", {"pos_embed", "cls_token", "dist_tokens.conv", "dist_tokens.inv"}),
    ("stem", {"pos_embed", "cls_token"}),
])
def test_no_weight_decay_names_parameters(token_kind, expected):
    student = small_vit(token_kind)
    assert student.no_weight_decay() == expected
    assert expected <= dict(student.named_parameters()).keys()


@pytest.mark.parametrize("token_kind", KINDS)
def test_every_token_gets_gradient(token_kind):
    student = small_vit(token_kind)
    sum(e.sum() for e in student(images()).values()).backward()
    assert student.cls_token.grad.abs().sum() > 0
    if token_kind == "learned":
        assert set(student.dist_tokens) == {"conv", "inv"}
        assert all(t.grad.abs().sum() > 0 for t in student.dist_tokens.values())
    else:
        for stem in student.stems.values():
            grads = [p.grad for p in stem.parameters()]
            assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("token_kind", KINDS)
def test_trains_a_step(token_kind):
    """A few AdamW steps on one fixed batch lower the summed CE of the three token heads."""
    student = small_vit(token_kind)
    heads = torch.nn.ModuleDict({t: linear(in_features=48, num_classes=4) for t in TOKENS})
    optimizer = torch.optim.AdamW([*student.parameters(), *heads.parameters()], lr=1e-3)
    x, labels = images(8), torch.arange(8) % 4
    losses = []
    for _ in range(5):
        out = student(x)
        loss = sum(F.cross_entropy(heads[t](out[t]), labels) for t in TOKENS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_stem_tokens_are_the_means_of_their_stems():
    """The sequence entering the blocks: each stem token is its stem's mean, the patches both stems' sum."""
    tokens = ["inv", "cls", "conv"]
    student = small_vit("stem", tokens).eval()
    seen = {}
    student.blocks.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    x = images(2)
    with torch.no_grad():
        student(x)
        sequence = seen["x"] - student.pos_embed
        stems = {name: stem(x) for name, stem in student.stems.items()}
    for name in ("conv", "inv"):
        torch.testing.assert_close(sequence[:, tokens.index(name)], stems[name].mean(1))
    torch.testing.assert_close(sequence[:, len(tokens):], stems["conv"] + stems["inv"])
    assert not hasattr(student, "patch_embed")


@pytest.mark.parametrize("kwargs, message", [
    (dict(tokens=[]), "at least one"),
    (dict(tokens=["cls", "conv", "cls"]), "unique"),
    (dict(tokens=["cls", "a.b"]), "identifiers"),
    (dict(tokens=["cls", "conv", "mlp"], token_kind="stem"), "subset"),
    (dict(tokens=["cls"], token_kind="stem", img_size=36, patch_size=3), "even patch_size"),
    (dict(tokens=["cls"], token_kind="stem", img_size=32, patch_size=6), "even patch_size"),
    (dict(tokens=["cls"], embed_dim=50, num_heads=3), "multiple of num_heads"),
])
def test_bad_configurations_raise(kwargs, message):
    with pytest.raises(KdkitError, match=message):
        vit(**{**SMALL, **kwargs})


def test_build_model_from_a_recipe_table():
    student = kdkit.build_model("student", plugin="vit", preset="ti", tokens=TOKENS, img_size=32,
                                patch_size=4, depth=2)
    out = student(images(2))
    assert {name: e.shape for name, e in out.items()} == {t: (2, 192) for t in TOKENS}


def test_registered_with_its_keys():
    plugins = default_plugins()
    rows = {r["name"]: r for r in plugins.describe() if r["kind"] == "student"}
    keys = {k["key"] for k in rows["vit"]["keys"]}
    assert {"preset", "tokens", "token_kind", "patch_size", "depth", "embed_dim", "num_heads"} <= keys
    assert not keys & {"num_classes", "img_size", "in_chans"}  # context keys the engine fills
