"""benchmarks.fixed_cost_ab refuses bad arguments before loading anything."""

import pytest

from benchmarks import fixed_cost_ab


@pytest.mark.parametrize("argv, match", [
    (["--lever", "decode_attention", "--rounds", "0"], "--rounds and --threads must be >= 1"),
    (["--lever", "decode_attention", "--cache-slots", "100"], "--cache-slots must be >= 150"),
    (["--lever", "direct", "--nll-tokens", "50"], "--nll-tokens must be >= 2, for a lever that changes the values"),
    (["--lever", "decode_attention", "--nll-tokens", "1"], "--nll-tokens must be >= 2"),
    (["--lever", "group_linears", "--threads", "0"], "--rounds and --threads must be >= 1"),
    (["--lever", "scale_layout", "--rounds", "0"], "--rounds and --threads must be >= 1"),
    (["--lever", "bf16_dot", "--cache-slots", "149"], "--cache-slots must be >= 150"),
    (["--lever", "attention_loops", "--rounds", "0"], "--rounds and --threads must be >= 1"),
    (["--lever", "metadata_prefetch", "--options", "bits=4"], "acts on CPU graphs: add mode=reduce-overhead"),
    (["--lever", "bound_replay", "--options", "bits=4"], "bound_replay acts on CPU graphs: add mode=reduce-overhead"),
    (["--lever", "native_loop", "--options", "bits=4"], "native_loop acts on CPU graphs: add mode=reduce-overhead"),
])
def test_bad_arguments_exit_with_a_message(argv, match):
    with pytest.raises(SystemExit, match=match):
        fixed_cost_ab.main(argv)


def test_unknown_lever_is_refused(capsys):
    with pytest.raises(SystemExit):
        fixed_cost_ab.main(["--lever", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_bf16_dot_lever_needs_a_cpu_with_the_path(monkeypatch):
    """Where the kernel has no avx512bf16 path (this CPU or another), the lever says so before loading
    the model."""
    from csd_compile.kernels import native

    monkeypatch.setattr(native, "load", lambda: True)
    monkeypatch.setattr(native, "supported_isas", lambda: ["scalar", "avx2"])
    with pytest.raises(SystemExit, match=r"needs a CPU with AVX-512 BF16 and VBMI; this one runs \['scalar', 'avx2'\]"):
        fixed_cost_ab.main(["--lever", "bf16_dot"])


@pytest.mark.parametrize("argv, match", [
    (["--lever", "attention_loops"], r"--lever attention_loops needs the C\+\+ kernels, which did not build here"),
    (["--lever", "metadata_prefetch", "--options", "bits=4,mode=reduce-overhead"],
     r"--lever metadata_prefetch needs the C\+\+ kernels \(CPU graphs\)"),
    (["--lever", "bound_replay", "--options", "bits=4,mode=reduce-overhead"],
     r"--lever bound_replay needs the C\+\+ kernels \(CPU graphs\)"),
    (["--lever", "packed_scales"], r"--lever packed_scales needs the C\+\+ kernels, which did not build here"),
    (["--lever", "fp16_scales"], r"--lever fp16_scales needs the C\+\+ kernels, which did not build here"),
    (["--lever", "file_grid"], r"--lever file_grid needs the C\+\+ kernels, which did not build here"),
])
def test_kernel_levers_need_the_cpp_kernels(monkeypatch, argv, match):
    """Without a C++ compiler there is nothing to switch: the lever says so before loading the model."""
    from csd_compile.kernels import native

    monkeypatch.setattr(native, "load", lambda: False)
    with pytest.raises(SystemExit, match=match):
        fixed_cost_ab.main(argv)


def test_options_are_read_as_the_cli_reads_them():
    """``--options`` values as ``csd-compile generate -o``: numbers and booleans as JSON, else strings."""
    from benchmarks.llama_cpp_decode import _parse_options

    assert _parse_options("bits=8,quantize_lm_head=true,mode=reduce-overhead, group_size=32") == {
        "bits": 8, "quantize_lm_head": True, "mode": "reduce-overhead", "group_size": 32}
    assert _parse_options("bits=auto") == {"bits": "auto"}
    with pytest.raises(SystemExit, match=r"--options 'bits=4,mode': expected KEY=VALUE, got 'mode'"):
        _parse_options("bits=4,mode")


def test_an_isa_the_machine_cannot_run_is_refused(monkeypatch):
    from csd_compile.kernels import native

    monkeypatch.setattr(native, "load", lambda: False)
    with pytest.raises(SystemExit, match="--isa avx2: this machine's C\\+\\+ kernels run"):
        fixed_cost_ab.main(["--lever", "packed_scales", "--isa", "avx2"])


def test_llama_cpp_decode_prints_both_rooflines_from_the_bandwidth_of_the_same_run(monkeypatch, capsys):
    """Each side's limit is the bandwidth over its bytes per decoded token (ours at the options'
    precision, llama.cpp at the file's formats), and each median is given as a fraction of ours."""
    import argparse

    from benchmarks import llama_cpp_decode
    from csd_compile.bench import roofline as rl
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(seed=3)
    bw = {"gb_s": 12.5, "gb_s_best": 13.0, "bytes": 1 << 28, "threads": 2, "repeats": 5, "llc_bytes": None}
    monkeypatch.setattr(rl, "measure_bandwidth", lambda threads=None: bw)
    args = argparse.Namespace(threads=2, prompt=53, tokens=96)
    rows = llama_cpp_decode.roofline(model, {"bits": 4, "group_size": 32, "mode": "reduce-overhead"}, args,
                                     {"ours": 200.0, "llama.cpp": 120.0})
    context = 53 + 95 / 2
    ours = rl.step_bytes(model, bits=4, group_size=32, dtype="bf16", context_len=context)["total"]
    theirs = rl.step_bytes(model, dtype="fp32", weight_format=rl.GGUF_Q4_1, head_format=rl.GGUF_Q8_0,
                           kv_dtype="fp16", context_len=context)["total"]
    assert ours != theirs
    assert rows["ours"]["roofline_tok_s"] == pytest.approx(12.5e9 / ours)
    assert rows["llama.cpp"]["roofline_tok_s"] == pytest.approx(12.5e9 / theirs)
    assert rows["llama.cpp"]["roofline_fraction"] == pytest.approx(120.0 * theirs / 12.5e9)
    out = capsys.readouterr().out
    assert "12.5 GB/s" in out
    assert f"= {200.0 * ours / 12.5e9:.0%} of ours" in out and f"= {120.0 * ours / 12.5e9:.0%} of ours" in out

    # the rounds' own samples, when given: their median, the range printed, nothing measured now
    monkeypatch.setattr(rl, "measure_bandwidth", lambda threads=None: pytest.fail("measured again"))
    samples = [{**bw, "gb_s": g, "repeats": 3} for g in (30.0, 50.0, 20.0, 45.0, 35.0)]
    rows = llama_cpp_decode.roofline(model, {"bits": 4, "group_size": 32}, args, {"ours": 200.0, "llama.cpp": 120.0},
                                     samples)
    assert rows["ours"]["roofline_tok_s"] == pytest.approx(35e9 / ours)
    assert rows["llama.cpp"]["roofline_fraction"] == pytest.approx(120.0 * theirs / 35e9)
    out = capsys.readouterr().out
    assert "median of 5 rounds' samples (each the median of 3), range 20.0-50.0): 35.0 GB/s" in out
    monkeypatch.setattr(rl, "measure_bandwidth", lambda threads=None: bw)

    # bits="dynamic" reads other bytes at every token: no roofline of ours, llama.cpp's still printed
    rows = llama_cpp_decode.roofline(model, {"bits": "dynamic"}, args, {"ours": 200.0, "llama.cpp": 120.0})
    out = capsys.readouterr().out
    assert rows["ours"]["roofline_tok_s"] is None and "ours: no roofline (bits=dynamic: its bytes change" in out
    assert f"{120.0 * theirs / 12.5e9:.0%} of its own" in out and "of ours" not in out
