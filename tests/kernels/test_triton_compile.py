"""Every Triton kernel compiles for real GPUs (sm_80 and sm_90: PTX and cubin), not only in the
interpreter the CPU tests run it in. Triton compiles for a CUDA target without a GPU present."""

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from csd_compile import pair_table
from csd_compile.kernels.attention import _attention_kernel
from csd_compile.kernels.gate import _gate_kernel
from csd_compile.kernels.qlinear import _qlinear_kernel

ARCHS = [80, 90]


def _compile(fn, signature, constexprs, cc):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))
    assert kernel.asm["ptx"] and len(kernel.asm["cubin"]) > 1000
    assert f".target sm_{cc}" in kernel.asm["ptx"]
    return kernel


@pytest.mark.parametrize("cc", ARCHS)
@pytest.mark.parametrize("dtype, precision", [("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "ieee")])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_qlinear_kernel_compiles_for_cuda(cc, dtype, precision, group):
    sig = {"x_ptr": f"*{dtype}", "q_ptr": "*u8", "scale_ptr": "*fp32", "zero_ptr": "*fp32", "bits_ptr": "*i32",
           "out_ptr": f"*{dtype}", "M": "i32", "N": "i32", "K": "i32", "N_FULL": "i32", "stride_xm": "i32",
           "stride_om": "i32", "stride_sn": "i32", "stride_sg": "i32"}
    _compile(_qlinear_kernel, sig, {"GROUP": group, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32,
                                    "PRECISION": precision}, cc)


@pytest.mark.parametrize("cc", ARCHS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("update", [True, False])
def test_gate_kernel_compiles_for_cuda(cc, dtype, update):
    sig = {"draft_ptr": "*i64", "logits_ptr": f"*{dtype}", "keys_ptr": "*i64", "counts_ptr": "*i32",
           "tokens_ptr": "*i64", "nacc_ptr": "*i64", "B": "i32", "K": "i32", "V": "i32", "S": "i32",
           "stride_lb": "i32", "stride_lk": "i32", "lambda_": "fp32", "log_tau": "fp32"}
    _compile(_gate_kernel, sig, {"W": 8, "BLOCK_V": 1024, "UPDATE": update, "COUNT_CAP": pair_table.COUNT_MAX,
                                 "KEY_STRIDE": pair_table.KEY_STRIDE, "H1": pair_table.H1, "H2": pair_table.H2,
                                 "EMPTY": pair_table.EMPTY}, cc)


@pytest.mark.parametrize("cc", ARCHS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("mask", [None, "*i1", "*fp32", "*bf16"])
def test_attention_kernel_compiles_for_cuda(cc, dtype, mask):
    strides = ["sqb", "sqh", "sqt", "skb", "skh", "sks", "svb", "svh", "svs", "smb", "smh", "smt", "sms"]
    sig = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "mask_ptr": mask or f"*{dtype}",
           "out_ptr": f"*{dtype}", "Hq": "i32", "T": "i32", "S": "i32", "D": "i32", "GROUP": "i32", "scale": "fp32",
           **{name: "i32" for name in strides}}
    _compile(_attention_kernel, sig, {"HAS_MASK": mask is not None, "MASK_BOOL": mask == "*i1", "BLOCK_S": 64,
                                      "BLOCK_D": 64}, cc)
