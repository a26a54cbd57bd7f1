"""Compile the decode split / sparse kernels for sm_90a without a GPU and print each one's resource
usage (registers, stack) and SASS instruction count, contiguous and PAGED=True. Pointers and strides get
the 16-divisibility a real launch gives them. Compare two checkouts (e.g. before / after a kernel change):

    git archive <rev> src | tar -x -C /tmp/base
    python benchmarks/tune/paged_compile_check.py new $PWD/src
    python benchmarks/tune/paged_compile_check.py base /tmp/base/src

argv[1] names the Triton cache folder (/tmp/paged_cc/cache_<name>), argv[2] the src folder to import.
Uses Triton's ASTSource and the cuobjdump bundled with Triton (checked with Triton 3.9).
"""
import sys, os, json
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = "/tmp/paged_cc/cache_" + sys.argv[1]
sys.path.insert(0, sys.argv[2])
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from kascade.kernels import decode as kd

PTR = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "OUT": "*bf16", "KV_START": "*i64", "KV_END": "*i64",
       "SCORES": "*fp32", "M_PART": "*fp32", "L_PART": "*fp32", "O_PART": "*fp32", "COUNTER": "*i32",
       "BT": "*i32", "IDX": "*i32", "HEAD_MAP": "*i32"}

def sig(fn, consts, paged):
    s = {}
    for name in fn.arg_names:
        if name in consts:
            s[name] = "constexpr"
        elif name in PTR:
            s[name] = PTR[name]
            if paged and name in ("KV_START", "KV_END"):
                s[name] = "*i32"
        elif name == "qk_scale":
            s[name] = "fp32"
        else:
            s[name] = "i32"
    return s

def build(fn, consts, paged, nw):
    sg = sig(fn, consts, paged)
    # what the JIT sees at a real launch: 16-aligned pointers, strides that are multiples of 16
    div = {n for n in fn.arg_names if sg[n].startswith("*") or (n.startswith("stride") and sg[n] == "i32")}
    div -= set(getattr(fn, "do_not_specialize", ()) or ())
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
    src = ASTSource(fn, sg, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw, "num_stages": 3})
    import subprocess, tempfile, os
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
    line = [l for l in out.stdout.splitlines() if "REG" in l]
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    n_instr = sum(1 for l in sass.splitlines() if l.strip().startswith("/*") and "*/" in l and ";" in l)
    return (line[0].strip() if line else out.stdout[-300:] + out.stderr[-300:]) + f" | sass instr {n_instr}"

G, D = 4, 128
base = dict(G=G, GP=16, D=D, BLOCK_N=128, WRITE_SCORES=True, ACC_V=False, PRECISION="tf32", FUSE_COMBINE=False,
            GQ=4, SP=4, SB=2, ALIGN=128)
sp = dict(G=G, GP=16, D=D, BLOCK_N=64, PRECISION="tf32", FROM_SCORES=False, FUSE_COMBINE=True, GQ=4, SP=4, SB=2, ALIGN=64,
          DIRECT=False, MAPPED=True, BUDGET_BOUND=True)
has_paged = "PAGED" in kd.decode_split_kernel.arg_names
res = {}
for name, fn, consts in (("split-anchor", kd.decode_split_kernel, base),
                         ("split-dense", kd.decode_split_kernel, {**base, "WRITE_SCORES": False, "ACC_V": True, "FUSE_COMBINE": True}),
                         ("sparse-reuse", kd.decode_sparse_kernel, sp),
                         ("sparse-scores", kd.decode_sparse_kernel, {**sp, "FROM_SCORES": True, "MAPPED": False})):
    for paged in ([False, True] if has_paged else [False]):
        c = dict(consts)
        if has_paged:
            c.update(PAGED=paged, PAGE=16)
        # the kernels' stride args that are 1 get specialised by the JIT; none here
        res[f"{name}{'-paged' if paged else ''}"] = build(fn, c, paged, 4)
for k, v in res.items():
    print(k, v)
