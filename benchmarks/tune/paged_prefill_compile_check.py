"""Compile the rolling-prefill kernels (LSE / flash pass, pooling, select, sparse) for sm_90a without a
GPU and print each one's resource usage (registers, stack) and SASS instruction count, contiguous and
PAGED=True (vLLM packed varlen queries + paged KV), with the launch settings of kascade.ops.prefill for
bf16, GQA 4, head_dim 128, T=32. Pointers and strides get the 16-divisibility a real launch gives them.
Compare two checkouts (e.g. before / after a kernel change):

    git archive <rev> src | tar -x -C /tmp/base
    python benchmarks/tune/paged_prefill_compile_check.py new $PWD/src
    python benchmarks/tune/paged_prefill_compile_check.py base /tmp/base/src

argv[1] names the Triton cache folder (/tmp/paged_prefill_cc/cache_<name>), argv[2] the src folder to
import. Uses Triton's ASTSource and the cuobjdump bundled with Triton (checked with Triton 3.9).
"""
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = "/tmp/paged_prefill_cc/cache_" + sys.argv[1]
sys.path.insert(0, sys.argv[2])
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kascade.kernels import prefill as K  # noqa: E402

PTR = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16", "lse_ptr": "*fp32",
       "pooled_ptr": "*fp16", "tile_k_ptr": "*i32", "idx_ptr": "*i32", "head_map_ptr": "*i32",
       "kv_start_ptr": "*i64", "kv_end_ptr": "*i64", "qsl_ptr": "*i64", "bt_ptr": "*i64"}
STRIDES = {"sqb", "sqh", "sqt", "skb", "skh", "skt", "svb", "svh", "svt", "sob", "soh", "sot", "slb", "slh",
           "spb", "sph", "spt", "sib", "sih", "sit", "sbt", "skblk", "svblk"}


def sig(fn, consts, paged):
    s = {}
    for name in fn.arg_names:
        if name in consts:
            s[name] = "constexpr"
        elif name in PTR:
            s[name] = PTR[name]
            if paged and name in ("kv_start_ptr", "kv_end_ptr", "qsl_ptr", "bt_ptr"):
                s[name] = "*i32"  # seq_lens, query_start_loc, block_table
        elif name == "qk_scale":
            s[name] = "fp32"
        else:
            s[name] = "i32"
    return s


def build(fn, consts, paged, nw, ns, maxnreg=None):
    sg = sig(fn, consts, paged)
    div = {n for n in fn.arg_names if sg[n].startswith("*") or (n in STRIDES and sg[n] == "i32")}
    div -= set(getattr(fn, "do_not_specialize", ()) or ())
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
    src = ASTSource(fn, sg, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    options = {"num_warps": nw, "num_stages": ns, **({"maxnreg": maxnreg} if maxnreg else {})}
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if "REG" in x]
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    n_instr = sum(1 for x in sass.splitlines() if x.strip().startswith("/*") and "*/" in x and ";" in x)
    return (line[0].strip() if line else out.stdout[-300:] + out.stderr[-300:]) + f" | sass instr {n_instr}"


D, T = 128, 32
attn = dict(D=D, G_BLOCK=4, BLOCK_T=32, DOT_PREC="tf32")
pool = dict(D=D, G_BLOCK=4, T=T, BLOCK_N=64, ATOMIC=False, DOT_PREC="tf32")
select = dict(BLOCK=2048, KEY16=True, B2=7, B3=7)
sparse = dict(D=D, G_BLOCK=4, T=T, BLOCK_N=64, DOT_PREC="tf32")
has_paged = "PAGED" in K._sparse_kernel.arg_names
res = {}
for name, fn, consts, nw, ns, maxnreg in (
    ("flash", K._attn_fwd_kernel, {**attn, "BLOCK_N": 64, "WITH_V": True, "STORE_LSE": False}, 8, 3, None),
    ("lse", K._attn_fwd_kernel, {**attn, "BLOCK_N": 128, "WITH_V": False, "STORE_LSE": True}, 8, 2, None),
    ("pool", K._pool_kernel, pool, 4, 3, None),
    ("select", K._select_kernel, select, 8, 3, None),
    ("sparse", K._sparse_kernel, {**sparse, "MAPPED": False}, 8, 2, 128),
    ("sparse-mapped", K._sparse_kernel, {**sparse, "MAPPED": True}, 8, 2, 128),
):
    for paged in ([False, True] if has_paged else [False]):
        c = dict(consts)
        if has_paged:
            c["PAGED"] = paged
            if "PAGE" in fn.arg_names:
                c["PAGE"] = 16
        res[f"{name}{'-paged' if paged else ''}"] = build(fn, c, paged, nw, ns, maxnreg)
for k, v in res.items():
    print(k, v)
