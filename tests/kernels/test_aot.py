"""Every Triton kernel configuration (``aot_specs()`` of each ``ragkern.kernels`` module) compiles for sm_80 and
sm_90 without a GPU; the attention and LoRA kernels meet the report's acceptance: no 32-bit offset that can wrap,
software-pipelined loads in the block-mask attention kernels, wgmma N >= 64 in every fp16/bf16 attention kernel,
no forward spills, (nearly) no spill inside the loops of the causal backward, each kernel within a block's shared
memory.

Slow on a cold Triton cache (about two minutes on two cores); seconds once cached.
"""

import pytest
from ragkern.kernels import _aot
from ragkern.kernels import attention as attn_mod

pytestmark = [
    pytest.mark.skipif(attn_mod.triton is None, reason="triton is not installed"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def records(aot_records):
    return aot_records


def test_every_config_compiles(records):
    modules = _aot.kernel_modules()
    assert "ragkern.kernels.attention" in modules
    import importlib

    specs = [spec for m in modules for spec in importlib.import_module(m).aot_specs()]
    assert len(records) == sum(len(spec.archs or _aot.ARCHS) for spec in specs)
    for r in records:
        assert set(r) == {
            "kernel", "config", "arch", "registers", "stack_bytes", "shared_bytes", "hgmma", "hgmma_shapes",
            "spills_in_loops", "async_copies", "int32_offsets",
        }  # fmt: skip
        assert 0 < r["registers"] <= 255 and r["arch"] in ("sm_80", "sm_90")


def _attention(records, kernel, dim):
    return [
        r
        for r in records
        if r["kernel"] == kernel and r["config"].startswith(f"D={dim} ") and " fp32 " not in r["config"]
    ]


def test_no_int32_offset_can_wrap(records):
    """No 32-bit multiply feeding a pointer can pass 2^31 (token index x stride, head x total ...)."""
    ours = [r for r in records if r["kernel"].startswith(("attn_", "lora_", "flce_"))]
    assert {r["kernel"][:4] for r in ours} == {"attn", "lora", "flce"}
    assert ours
    bad = [(r["kernel"], r["config"], r["arch"], r["int32_offsets"]) for r in ours if r["int32_offsets"]]
    assert not bad, bad


def test_block_mask_attention_is_pipelined(records):
    """The K/V (forward, dQ) and Q/dO (dK/dV) loads of the block-mask kernels are async copies."""
    blocks = [r for r in records if r["kernel"].startswith("attn_") and " blocks " in r["config"]]
    assert {r["kernel"] for r in blocks} == {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"}
    assert all(r["async_copies"] > 0 for r in blocks), [(r["kernel"], r["config"], r["arch"]) for r in blocks]


def test_attention_wgmma_is_at_least_64_wide(records):
    """Every fp16/bf16 attention kernel with a tl.dot runs wgmma on sm_90, none narrower than N=64."""
    rs = [
        r
        for r in records
        if r["kernel"] in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")
        and r["arch"] == "sm_90"
        and " fp32 " not in r["config"]
    ]
    assert rs
    narrow = [(r["kernel"], r["config"], r["hgmma_shapes"]) for r in rs if not r["hgmma_shapes"]]
    narrow += [
        (r["kernel"], r["config"], shape)
        for r in rs
        for shape in r["hgmma_shapes"]
        if int(shape.split("x")[1]) < 64
    ]
    assert not narrow, narrow


@pytest.mark.parametrize("dim", [64, 80, 96, 128, 256], ids=lambda d: f"d{d}")
def test_attention_forward_has_no_spills(records, dim):
    """Every forward (each dtype, mask and arch) keeps its registers: at D=256 the epilogue addresses its rows from
    per-program scalars, so no per-row value stays live across the key loops (it spilled 8 B before)."""
    fwd = [r for r in records if r["kernel"] == "attn_fwd" and r["config"].startswith(f"D={dim} ")]
    assert fwd and all(r["stack_bytes"] == 0 for r in fwd), fwd


# Dynamic shared memory one block may use: sm_80's configurations also run on sm_86/sm_89 (99 KB there, 163 KB on
# an A100); an H100/H200 allows 227 KB. Triton refuses to launch a kernel that needs more (OutOfResources).
SHARED_LIMIT = {"sm_80": 99 * 1024, "sm_90": 227 * 1024}


def test_every_kernel_fits_the_shared_memory_of_a_block(records):
    """The dQ kernel at head_dim 256 on sm_90 needed 257 KB and could not launch on an H100/H200."""
    big = [(r["kernel"], r["config"], r["arch"], r["shared_bytes"]) for r in records]
    big = [b for b in big if b[3] > SHARED_LIMIT[b[2]]]
    assert not big, big


def test_causal_attention_backward_keeps_its_loops_nearly_free_of_spills(records):
    """The causal backward kernels (the training path) keep what spills outside their loops (saved once per program,
    not on every query or key tile), but for a few instructions where register allocation sits at the edge
    (triton 3.6 leaves 2 in the block-mask dK/dV at head_dim 128). dK/dV at head_dim 256 on sm_90, split over two
    programs of 128 columns each, keeps 12 (triton 3.9) to 26 (3.6) in its loop: 646 / 753 before the split; the
    tiles that keep none need more shared memory than a block may have, or narrower wgmma."""
    rs = [r for r in records if r["kernel"] in ("attn_bwd_dkdv", "attn_bwd_dq") and " causal" in r["config"]]
    assert {int(r["config"].split()[0][2:]) for r in rs} == {64, 80, 96, 128, 256}
    bound = {True: 32, False: 2}  # key: dK/dV at head_dim 256
    over = [
        (r["kernel"], r["config"], r["arch"], r["spills_in_loops"])
        for r in rs
        if r["spills_in_loops"] > bound[r["kernel"] == "attn_bwd_dkdv" and r["config"].startswith("D=256 ")]
    ]
    assert not over, over


@pytest.mark.parametrize("dim", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("kernel", ["attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"])
def test_attention_uses_hgmma_on_sm90(records, kernel, dim):
    rs = [r for r in _attention(records, kernel, dim) if r["arch"] == "sm_90"]
    assert rs and all(r["hgmma"] > 0 for r in rs), rs
