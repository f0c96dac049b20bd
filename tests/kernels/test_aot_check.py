"""The TTIR 32-bit offset check and the JIT-faithful specialisation of ``kernels/_aot.py``, on hand-written TTIR
and specs (fast: no compilation)."""

import pytest
from ragkern.kernels import _aot
from ragkern.kernels._aot import AotSpec, int32_offset_overflows

HEAD = """#loc = loc("/src/k.py":1:0)
#loc3 = loc("/src/k.py":7:20)
#loc4 = loc("/src/k.py":9:30)
module {
  tt.func public @k(%X: !tt.ptr<f16> {tt.divisibility = 16 : i32} loc("X"(#loc)), %stride: i32 loc("stride"(#loc)), %L: i32 loc("L"(#loc))) attributes {noinline = false} {
    %c0_i32 = arith.constant 0 : i32 loc(#loc)
    %c64_i32 = arith.constant 64 : i32 loc(#loc)
    %cst = arith.constant dense<16> : tensor<64x1xi32> loc(#loc)
    %pid = tt.get_program_id x : i32 loc(#loc)
    %hid = tt.get_program_id y : i32 loc(#loc)
    %r = tt.make_range {end = 64 : i32, start = 0 : i32} : tensor<64xi32> loc(#loc)
    %r2 = tt.expand_dims %r {axis = 1 : i32} : tensor<64xi32> -> tensor<64x1xi32> loc(#loc)
    %p = tt.splat %X : !tt.ptr<f16> -> tensor<64x1x!tt.ptr<f16>> loc(#loc)
"""
TAIL = """    tt.return loc(#loc)
  } loc(#loc)
} loc(#loc)
"""


def check(body):
    return int32_offset_overflows(HEAD + body + TAIL)


def test_block_local_arange_times_constant_is_small():
    body = """    %o = arith.muli %r2, %cst : tensor<64x1xi32> loc(#loc3)
    %a = tt.addptr %p, %o : tensor<64x1x!tt.ptr<f16>>, tensor<64x1xi32> loc(#loc3)
"""
    assert check(body) == []


def test_arange_times_stride_argument_is_reported():
    body = """    %s = tt.splat %stride : i32 -> tensor<64x1xi32> loc(#loc)
    %o = arith.muli %r2, %s : tensor<64x1xi32> loc(#loc3)
    %a = tt.addptr %p, %o : tensor<64x1x!tt.ptr<f16>>, tensor<64x1xi32> loc(#loc3)
"""
    assert [line.split(":")[:2] for line in check(body)] == [["k.py", "7"]]


def test_loop_token_index_times_stride():
    """The attention bug: inside ``for n0 in range(0, L, 64)``, ``(n0 + arange) * stride`` in 32 bits is reported;
    the same product in 64 bits (stride extended first) is not; a multiply that only feeds a comparison is not."""
    loop = """    scf.for %n0 = %c0_i32 to %L step %c64_i32  : i32 {
      %n = tt.splat %n0 : i32 -> tensor<64x1xi32> loc(#loc)
      %offs = arith.addi %n, %r2 : tensor<64x1xi32> loc(#loc)
      %s = tt.splat %stride : i32 -> tensor<64x1xi32> loc(#loc)
      %o = arith.muli %offs, %s : tensor<64x1xi32> loc(#loc4)
      %cmp = arith.cmpi slt, %o, %s : tensor<64x1xi32> loc(#loc)
      %a = tt.addptr %p, %o : tensor<64x1x!tt.ptr<f16>>, tensor<64x1xi32> loc(#loc4)
    } loc(#loc)
"""
    assert [line.split(":")[1] for line in check(loop)] == ["9"]
    wide = loop.replace(
        "%o = arith.muli %offs, %s : tensor<64x1xi32> loc(#loc4)",
        "%o64 = arith.extsi %offs : tensor<64x1xi32> to tensor<64x1xi64> loc(#loc)\n"
        "      %s64 = arith.extsi %s : tensor<64x1xi32> to tensor<64x1xi64> loc(#loc)\n"
        "      %o = arith.muli %o64, %s64 : tensor<64x1xi64> loc(#loc4)",
    ).replace(
        "tensor<64x1x!tt.ptr<f16>>, tensor<64x1xi32> loc(#loc4)",
        "tensor<64x1x!tt.ptr<f16>>, tensor<64x1xi64> loc(#loc4)",
    )
    wide = wide.replace("%cmp = arith.cmpi slt, %o, %s : tensor<64x1xi32> loc(#loc)\n", "")
    assert check(wide) == []
    only_compared = loop.replace("%a = tt.addptr %p, %o", "%a = tt.addptr %p, %r2")
    assert check(only_compared) == []


def test_tile_start_idiom_and_small_grid_axes():
    """program_id(x) * BLOCK is a tile's first index (the grid is cdiv(n, BLOCK), n < 2^31): trusted; a program id
    along y (<= 65535) times 16 is small; but program id y times an argument is not."""
    body = """    %m0 = arith.muli %pid, %c64_i32 : i32 loc(#loc)
    %c16 = arith.constant 16 : i32 loc(#loc)
    %h16 = arith.muli %hid, %c16 : i32 loc(#loc)
    %t = arith.addi %m0, %h16 : i32 loc(#loc)
    %a = tt.addptr %X, %t : !tt.ptr<f16>, i32 loc(#loc)
    %hs = arith.muli %hid, %stride : i32 loc(#loc3)
    %b = tt.addptr %X, %hs : !tt.ptr<f16>, i32 loc(#loc3)
"""
    assert [line.split(":")[1] for line in check(body)] == ["7"]


def test_comparison_result_is_a_bit():
    """``(L > x).to(int32) * 64``: a comparison is 0 or 1 (its printed type is the operands' i32)."""
    body = """    %cmp = arith.cmpi sgt, %L, %stride : i32 loc(#loc)
    %one = arith.extui %cmp : i1 to i32 loc(#loc)
    %o = arith.muli %one, %c64_i32 : i32 loc(#loc3)
    %a = tt.addptr %X, %o : !tt.ptr<f16>, i32 loc(#loc3)
"""
    assert check(body) == []


def _spec(**kw):
    sig = {"X": "*fp16", "n": "i32", "m": "i32", "group": "i32", "BLOCK": "constexpr"}
    return AotSpec("k", None, sig, {"BLOCK": 64}, **kw)


def test_values_specialise_like_the_jit():
    """1 -> constant, multiple of 16 -> divisibility hint, odd -> neither, >= 2^31 -> i64; pointers stay aligned."""
    sig, consts, attrs = _aot._specialised(_spec(values={"n": 4096, "m": 4099, "group": 1}))
    assert sig["group"] == "constexpr" and consts["group"] == 1
    assert sig["n"] == sig["m"] == "i32"
    names = list(sig)
    hinted = {names[k[0]] for k in attrs}
    assert hinted == {"X", "n"}
    sig, _, _ = _aot._specialised(_spec(values={"n": 2**31 + 16}))
    assert sig["n"] == "i64"
    assert _aot.describe_values({"n": 4096, "m": 4099, "group": 1}) == "n%16 m~ group=1"
    with pytest.raises(_aot.AotError, match="names no integer argument"):
        _aot._specialised(_spec(values={"BLOCK": 16}))


def test_old_specs_compile_as_before():
    """A spec without ``values`` (as other modules write them) keeps its hints: every pointer, or ``aligned``."""
    _, _, attrs = _aot._specialised(_spec())
    assert list(attrs) == [(0,)]
    _, _, attrs = _aot._specialised(_spec(aligned=("X", "m")))
    assert sorted(attrs) == [(0,), (2,)]


def test_hgmma_shapes_and_async_copies():
    sass = "HGMMA.64x64x16.F32.BF16 R0, gdesc[UR4], R0 ;\n HGMMA.64x128x16.F32 R1 ;\n HGMMA.64x64x16.F32.BF16 R2 ;"
    assert _aot.hgmma_shapes(sass) == {"64x64x16": 2, "64x128x16": 1}
    ttgir = "%1 = ttg.async_copy_global_to_local %a, %b\n%2 = ttg.async_copy_global_to_local %c, %d\n"
    assert _aot.async_copies(ttgir) == 2


def _sass(*instrs):
    """cuobjdump -sass lines: /*addr*/ instr ; /* encoding */, 16 bytes apart."""
    return "\n".join(
        f"        /*{16 * i:04x}*/   {ins} ;   /* 0x000fe2000001ff00 */" for i, ins in enumerate(instrs)
    )


def test_spills_in_loops_counts_only_spills_between_a_back_branch_and_its_target():
    body = [
        "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24",
        "LDL.LU R3, [R1+0x8]",
        "ISETP.GE.AND P0, PT, R2, R5, PT",
    ]
    once = _sass("STL [R1], R17", "MOV R2, RZ", *body[::2], "@!P0 BRA 0x0010", "LDL.LU R203, [R1]", "EXIT")
    assert _aot.spills_in_loops(once) == 0  # saved before the loop (0x10-0x30), reloaded after it
    looped = _sass("STL [R1], R17", "MOV R2, RZ", *body, "@!P0 BRA 0x0010", "STL.64 [R1+0x10], R20", "EXIT")
    assert _aot.spills_in_loops(looped) == 1  # the LDL at 0x30 runs on every iteration
    forward_only = _sass("MOV R2, RZ", "@P0 BRA 0x0030", "LDL R3, [R1]", "EXIT", "BRA 0x0040")
    # a forward branch and the trailing self-loop enclose no spill
    assert _aot.spills_in_loops(forward_only) == 0
