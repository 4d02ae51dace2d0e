import pytest
from hypothesis import given, strategies as st

from csd_compile.config import SUPPORTED_BITS, CSDConfig, OptionError


def test_defaults_are_valid_and_frozen():
    cfg = CSDConfig.from_options(None)
    assert cfg == CSDConfig()
    with pytest.raises(Exception):
        cfg.bits = 4


@pytest.mark.parametrize("key, value, where", [
    ("acceptance", "csd", "acceptance='csd'"), ("lambda", 6, "lam="), ("tau", 0.3, "tau="),
])
def test_decoding_loop_keys_are_refused_with_where_they_belong(key, value, where):
    """The backend compiles graphs; the acceptance rule lives in the decoding loop (csd_compile.generate)."""
    with pytest.raises(OptionError, match=rf"'{key}' is not a backend option.*csd_compile.generate.*{where}.*valid "
                                          r"options are \['bits'"):
        CSDConfig.from_options({key: value})
    assert key not in CSDConfig.option_keys()


def test_every_option_is_a_field_that_something_reads():
    """No option is accepted that changes nothing: each key is read outside config.py."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "csd_compile"
    code = "\n".join(p.read_text() for p in root.rglob("*.py") if p.name != "config.py")
    for key in CSDConfig.option_keys():
        assert re.search(rf"\bcfg\.{key}\b", code), f"option {key!r} is never read as cfg.{key}"


def test_unknown_key_names_it_and_lists_valid_ones():
    with pytest.raises(OptionError, match=r"unknown csd option 'bitz'.*'bits'.*'group_size'"):
        CSDConfig.from_options({"bitz": 4})


def test_options_dict_is_not_mutated():
    opts = {"bits": 4, "group_size": 32}
    before = dict(opts)
    CSDConfig.from_options(opts)
    assert opts == before


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"bits": 5}, r"'bits'=5 is not supported.*\[2, 3, 4, 8\]"),
        ({"bits": "4"}, r"'bits'='4'"),
        ({"bits": True}, r"'bits'=True"),
        ({"group_size": 48}, r"'group_size'=48.*\[32, 64, 128\]"),
        ({"group_size": 64.0}, r"'group_size'=64.0 has type float; expected int"),
        ({"quantize_lm_head": 1}, r"'quantize_lm_head'=1 has type int; expected bool"),
        ({"fuse_gating": 1}, r"'fuse_gating'=1 has type int; expected bool"),
        ({"avg_bits": 5.0}, r"'avg_bits' needs bits='dynamic'"),
        ({"bits": "dynamic", "avg_bits": 1.0, "calibration": "t.json"}, r"'avg_bits'=1.0 is outside \[2, 16\]"),
        ({"bits": "dynamic", "avg_bits": float("nan"), "calibration": "t.json"}, r"'avg_bits'=nan"),
        ({"bits": "dynamic"}, r"bits='dynamic' needs 'calibration'.*csd-compile calibrate --model"),
        ({"calibration": 3}, r"'calibration'=3 has type int"),
        ({"bits": "dynamic", "calibration": "/no/table.json"}, r"'calibration'='/no/table.json': no such file.*csd-compile calibrate"),
    ],
)
def test_bad_values_raise_value_error_naming_them(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        CSDConfig.from_options(options)


def test_options_must_be_a_mapping():
    with pytest.raises(OptionError, match="options must be a dict, got list"):
        CSDConfig.from_options([("bits", 4)])


@given(bits=st.one_of(st.integers(-4, 20), st.sampled_from([None, "dynamic"])))
def test_bits_accepts_exactly_the_ladder(bits):
    ok = bits is None or bits == "dynamic" or bits in SUPPORTED_BITS
    opts = {"bits": bits, "calibration": __file__} if bits == "dynamic" else {"bits": bits}  # (only its existence is checked here)
    if ok:
        assert CSDConfig.from_options(opts).bits == bits
    else:
        with pytest.raises(OptionError):
            CSDConfig.from_options(opts)
