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
    for bad in ("keys=0", "keys=96"):
        with pytest.raises(ValueError, match="power of two"):
            prefetch_setting(bad)
    for bad in ("o", "o=", "o=-1", "o=big", "merge=4096", ""):
        with pytest.raises(ValueError, match="PRODUCT=BYTES"):
            prefetch_setting(bad)


@pytest.mark.parametrize("args, named", [(["--prefetch", "default,o=x"], "'o=x' is not PRODUCT=BYTES"),
                                         (["--skinny", "fast"], "--skinny: unknown setting(s) ['fast']")])
def test_bad_settings_are_refused_by_name_before_anything_runs(capsys, args, named):
    import decode_profile

    with pytest.raises(SystemExit) as stop:
        decode_profile.main(args)
    assert stop.value.code == 2 and named in capsys.readouterr().err
