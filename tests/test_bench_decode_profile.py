"""decode_profile's settings on the CPU: its GPU run is measured on a device; what it is told
to compare is checked here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_prefetch_settings_name_products_and_bytes():
    from decode_profile import prefetch_setting

    from hogwild_ray.model.decoder import PRODUCTS

    assert prefetch_setting("default") == {}
    assert prefetch_setting("o=8192+qkv=4096") == {"o": 8192, "qkv": 4096}
    assert prefetch_setting("all=4096+o=8192") == {**dict.fromkeys(PRODUCTS, 4096), "o": 8192}
    assert prefetch_setting("keys=512+o=128") == {"keys": 512, "o": 128}
    assert prefetch_setting("ahead=0") == {"ahead": 0}
    assert prefetch_setting("next=2048+all=512") == {"next": 2048, **dict.fromkeys(PRODUCTS, 512)}
    for bad in ("keys=0", "keys=96"):
        with pytest.raises(ValueError, match="power of two"):
            prefetch_setting(bad)
    for bad in ("o", "o=", "o=-1", "o=big", "merge=4096", ""):
        with pytest.raises(ValueError, match="PRODUCT=BYTES"):
            prefetch_setting(bad)


def test_tile_settings_reach_the_partial_kernels_launch():
    """pages_ahead, num_stages, heads_first, split_rows, longest_first and long_unit (TILE_KNOBS): what
    the attention passes its partial kernel and its plan: the attributes attend and prepare read
    and the launch's stages."""
    import torch
    from decode_profile import TILE_KNOBS, apply_attention_setting, attention_setting

    from hogwild_kernels import TritonAttention

    knobs = attention_setting("pages_ahead=1+num_stages=3+programs_per_sm=2+heads_first=0+split_rows=0"
                              "+longest_first=0+long_unit=4096")
    assert knobs == {"pages_ahead": 1, "num_stages": 3, "programs_per_sm": 2, "heads_first": 0, "split_rows": 0,
                     "longest_first": 0, "long_unit": 4096}
    assert set(TILE_KNOBS) <= set(knobs)
    tri = TritonAttention(torch.ones(4), 1.0, 1.0, kv_heads=1)
    assert tri.pages_ahead is None and "num_stages" not in tri.launch and tri.heads_first is tri.longest_first is True
    assert tri.row_tiles(80, 128) == (64, 16)
    apply_attention_setting(tri, knobs)
    assert tri.pages_ahead is True and tri.launch["num_stages"] == 3 and tri.programs_per_sm == 2
    assert tri.heads_first is False and tri.split_rows is False and tri.row_tiles(80, 128) == (128, 0)
    assert tri.longest_first is False and tri.long_unit == 4096
    assert not tri.long_keys(2048) and tri.long_keys(4096) == (tri.long_block_n is not None)
    apply_attention_setting(tri, attention_setting("pages_ahead=0+heads_first=1+split_rows=1+longest_first=1"))
    assert tri.pages_ahead is False and tri.heads_first is True and tri.row_tiles(80, 128) == (64, 16)
    assert tri.longest_first is True


def test_attention_settings_name_the_kernels_unit_counts():
    """--attention names the attention's unit counts, whole numbers of at least one program, and
    each is an attribute the engine's attention reads when it cuts a pass (the run sets them)."""
    import torch
    from decode_profile import ATTENTION_KNOBS, attention_setting

    from hogwild_kernels import TritonAttention

    assert attention_setting("default") == {}
    assert attention_setting("short_programs_per_sm=2") == {"short_programs_per_sm": 2}
    assert attention_setting("programs_per_sm=3+short_programs_per_sm=4") == {"programs_per_sm": 3,
                                                                            "short_programs_per_sm": 4}
    for bad in ("programs_per_sm=0", "programs_per_sm=-1", "programs_per_sm", "block_n=32", "", "pages_ahead=2",
                "heads_first=2", "split_rows=2", "longest_first=2", "num_stages=0", "long_unit=0"):
        with pytest.raises(ValueError, match="KNOB=N"):
            attention_setting(bad)
    cpu = torch.device("cpu")
    for knob in ATTENTION_KNOBS:  # 8 SMs off CUDA, one KV head: 4 programs an SM at most by default
        tri = TritonAttention(torch.ones(4), 1.0, 1.0, kv_heads=1)
        assert tri.target_units(cpu) == 32
        setattr(tri, knob, 5)
        assert tri.target_units(cpu) == 40


def test_page_settings_name_a_page_size_and_the_descriptor_tiles():
    """--pages: the engine's pages or N tokens, `+tma` for the tiles read a page at a time, refused
    where the descriptors could not serve the pages (the kernel would quietly read them by address)."""
    from decode_profile import page_setting

    assert page_setting("default") == (None, False) and page_setting("default+tma") == (None, True)
    assert page_setting("64") == (64, False) and page_setting("32+tma") == (32, True)
    for bad in ("0", "x", "64+fast", "", "-16"):
        with pytest.raises(ValueError, match="is not default, TOKENS or TOKENS"):
            page_setting(bad)
    for unserved in ("8+tma", "128+tma", "48+tma"):
        with pytest.raises(ValueError, match="need pages of 16, 32 or 64 tokens"):
            page_setting(unserved)


@pytest.mark.parametrize("args, named", [(["--prefetch", "default,o=x"], "'o=x' is not PRODUCT=BYTES"),
                                         (["--attention", "default,pps=3"], "'pps=3' is not KNOB=N"),
                                         (["--pages", "default,128+tma"], "need pages of 16, 32 or 64"),
                                         (["--skinny", "fast"], "--skinny: unknown setting(s) ['fast']")])
def test_bad_settings_are_refused_by_name_before_anything_runs(capsys, args, named):
    import decode_profile

    with pytest.raises(SystemExit) as stop:
        decode_profile.main(args)
    assert stop.value.code == 2 and named in capsys.readouterr().err


def test_batched_runs_keep_files_of_their_own():
    """A 32 x 4 run the same day as a 1-worker one wrote over its files."""
    from decode_profile import result_name

    assert result_name(1, [1, 16]) == "decode_profile"
    assert result_name(32, [4]) == "decode_profile_32x4" and result_name(8, [2, 4]) == "decode_profile_8x2-4"
