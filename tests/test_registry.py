"""Spec strings: parsing, round trip through describe(), and clear errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest

import vtc
from vtc.options import parse_option
from vtc.reducers import REDUCERS, EViT, Pool, RandomDrop, ToMe, parse_reducer, to_spec
from vtc.sites import EncoderReducer


def test_registry_names():
    assert sorted(REDUCERS) == ["dymu", "dyvte", "evit", "exit", "holov", "m3", "mqt", "pool", "random", "tome", "vtu"]


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("tome:r=8", ToMe(r=8)),
        ("tome", ToMe()),
        ("ToMe : r = 8 ", ToMe(r=8)),
        ("tome:r=5;0;0;0", ToMe(r=(5, 0, 0, 0))),
        ("tome:r=5;", ToMe(r=(5,))),
        ("tome:r=16,inflect=-1", ToMe(r=16, inflect=-1.0)),
        ("tome:r=4,schedule=linear,prop_attn=false,strict=TRUE", ToMe(r=4, schedule="linear", prop_attn=False, strict=True)),
        ("evit:keep=0.7,layers=3;6;9", EViT(keep=0.7, layers=(3, 6, 9))),
        ("evit:keep=0.5,layers=2,fuse=false", EViT(keep=0.5, layers=(2,), fuse=False)),
        ("evit:tokens=30;20,layers=1;2", EViT(tokens=(30, 20), layers=(1, 2))),
        ("evit:layers=none", EViT()),
        ("random:keep=0.5,seed=3", RandomDrop(keep=0.5, seed=3)),
        ("pool:kernel=2", Pool(kernel=2)),
        ("pool:tokens=16,layer=1,prop_attn=false", Pool(tokens=16, layer=1, prop_attn=False)),
    ],
)
def test_parse(spec, expected):
    assert parse_reducer(spec) == expected


def test_objects_pass_through():
    tome = ToMe(r=3)
    assert parse_reducer(tome) is tome


@pytest.mark.parametrize(
    "reducer",
    [
        ToMe(),
        ToMe(r=13),
        ToMe(r=(5, 0, 3)),
        ToMe(r=[1, 2]),
        ToMe(r=16, inflect=-1.0),
        ToMe(r=16, inflect=0.5),
        ToMe(r=3, schedule="reverse-linear", prop_attn=False, strict=True),
        EViT(),
        EViT(keep=0.5, layers=(3,), fuse=False),
        EViT(keep=1.0),
        EViT(tokens=50),
        EViT(layers=(1, 2), tokens=(30, 20)),
        RandomDrop(keep=0.6, seed=3, layers=(0, 2)),
        RandomDrop(tokens=10),
        Pool(kernel=2, layer=1, prop_attn=False),
        Pool(tokens=16),
        ToMe(r=(5,)),  # a one-entry list is written "r=5;" (not the constant "r=5")
        EViT(layers=(2,), tokens=(40,)),
    ],
    ids=lambda r: r.describe(),
)
def test_describe_round_trip(reducer):
    assert parse_reducer(reducer.describe()) == reducer
    assert to_spec(reducer) == reducer.describe()


def test_describe_lists_only_non_defaults():
    assert ToMe(r=8).describe() == "tome:r=8"
    assert ToMe(r=(8,)).describe() == "tome:r=8;"
    assert EViT(keep=0.5, layers=(3, 6, 9)).describe() == "evit:keep=0.5,layers=3;6;9"
    assert Pool(kernel=2).describe() == "pool:kernel=2"
    assert ToMe().describe() == "tome"


def test_unknown_reducer():
    with pytest.raises(ValueError, match=r"unknown reducer 'fancy' in 'fancy:r=1'; known reducers: dymu, dyvte, evit, exit, holov, m3, mqt, pool, random, tome, vtu"):
        parse_reducer("fancy:r=1")


def test_unknown_option_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"tome: bad option 'k=1' .* options are inflect, prop_attn, r, schedule, strict"):
        parse_reducer("tome:k=1")
    with pytest.raises(ValueError, match=r"evit: bad option 'keep' .*option=value"):
        parse_reducer("evit:keep")


def test_non_string_spec_is_a_type_error():
    with pytest.raises(TypeError, match="a reducer is a vtc reducer object or a spec string like 'tome:r=8', got int"):
        parse_reducer(8)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("tome:r=-2", r"tome: r must be a non-negative integer \(or a list of them\), got -2"),
        ("tome:r=1.5", r"tome: r must be a non-negative integer"),
        ("tome:r=3;-1", r"tome: r must be a non-negative integer"),
        ("tome:schedule=cosine", r"tome: unknown schedule 'cosine'; allowed: constant, linear, reverse-linear"),
        ("tome:inflect=2", r"tome: inflect must be in \[-1, 1\], got 2"),
        ("evit:keep=0", r"evit: keep rate must be in \(0, 1\], got 0"),
        ("evit:keep=1.5", r"evit: keep rate must be in \(0, 1\], got 1.5"),
        ("evit:keep=-0.2", r"evit: keep rate must be in \(0, 1\], got -0.2"),
        ("random:keep=2", r"random: keep rate must be in \(0, 1\], got 2"),
        ("evit:tokens=0", r"evit: tokens must be positive integers, got 0"),
        ("random:tokens=4;0", r"random: tokens must be positive integers"),
        ("pool", r"pool: give exactly one of kernel=<patches> or tokens=<count>"),
        ("pool:kernel=2,tokens=4", r"pool: give exactly one of kernel"),
        ("pool:kernel=0", r"pool: kernel must be a positive integer, got 0"),
        ("pool:tokens=-3", r"pool: tokens must be a positive integer, got -3"),
    ],
)
def test_bad_values_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_reducer(spec)


def test_top_level_exports():
    assert vtc.parse_reducer is parse_reducer
    assert vtc.ToMe is ToMe and vtc.EViT is EViT and vtc.RandomDrop is RandomDrop and vtc.Pool is Pool


def test_dual_site_reducers_take_a_site_option():
    from vtc.sites import Site

    pool = parse_reducer("pool:tokens=16")
    assert pool.resolve_site((Site.ENCODER, Site.CONNECTOR, Site.DECODER), "llava") is Site.CONNECTOR
    assert pool.resolve_site((Site.ENCODER,), "timm") is Site.ENCODER
    forced = parse_reducer("random:tokens=16,site=encoder")
    assert forced.resolve_site((Site.ENCODER, Site.CONNECTOR), "llava") is Site.ENCODER
    assert to_spec(forced) == "random:tokens=16,site=encoder"
    with pytest.raises(ValueError, match="pool: site must be one of connector, encoder, got 'decoder'"):
        parse_reducer("pool:tokens=4,site=decoder")
    with pytest.raises(ValueError, match="random: layers is an encoder-site option"):
        parse_reducer("random:layers=2;,site=connector")
    with pytest.raises(ValueError, match="tome acts at the encoder site, but a llava-only model only has the connector site"):
        parse_reducer("tome:r=2").resolve_site((Site.CONNECTOR,), "llava-only")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("tome:r=2,prop_attn=flase", r"tome: prop_attn must be true or false, got 'flase'"),
        ("tome:strict=1", r"tome: strict must be true or false, got '1'"),
        ("tome:r=abc", r"tome: r must be a non-negative integer \(or a ;-separated list of them\), got 'abc'"),
        ("evit:keep=most", r"evit: keep must be a number, got 'most'"),
        ("evit:layers=3;x", r"evit: layers must be a ;-separated list of integers or none, got '3;x'"),
        ("holov:k=nan", r"holov: k must be an integer, got 'nan'"),
        ("dymu:thresholds=1.5", r"dymu: thresholds are cosine similarities in \[-1, 1\]"),
        ("dymu:thresholds=0.9;-1.2", r"dymu: thresholds are cosine similarities in \[-1, 1\]"),
        ("random:tokens=16,keep=0.5", r"random: give one of keep or tokens, not keep and tokens"),
        ("evit:keep=0.7,tokens=16", r"evit: give one of keep or tokens, not keep and tokens"),
    ],
)
def test_values_are_read_as_their_option_type(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_reducer(spec)


def test_objects_with_two_exclusive_options_are_refused_at_apply():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3)
    with pytest.raises(ValueError, match="random: give one of keep or tokens, not keep and tokens"):
        vtc.apply(model, RandomDrop(tokens=4, keep=0.5))
    with pytest.raises(TypeError, match=r"vtc.apply: foo is not an option of a timm model; its options: execution= \(auto or padded or split or nested\)"):
        vtc.apply(model, "tome:r=1", foo=1)


def test_the_no_op_default_says_so():
    assert "no-op" in ToMe.__doc__ and ToMe().describe() == "tome"



@dataclass
class Choosy(EncoderReducer, register=False):
    """A reducer with options of allowed values (a Literal type)."""

    name: ClassVar[str] = "choosy"
    order: Literal["raster", "score"] = "raster"
    budget: int | Literal["auto"] = "auto"


def test_a_literal_option_names_its_allowed_values():
    assert parse_option(Choosy, "order", "score") == "score"
    assert parse_option(Choosy, "budget", "12") == 12 and parse_option(Choosy, "budget", "auto") == "auto"
    with pytest.raises(ValueError, match="choosy: order must be one of raster, score, got 'best'"):
        parse_option(Choosy, "order", "best")
    with pytest.raises(ValueError, match="choosy: budget must be an integer or one of auto, got '1.5'"):
        parse_option(Choosy, "budget", "1.5")
