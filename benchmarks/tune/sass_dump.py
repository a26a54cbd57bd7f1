"""Compile every kernel variant of a kascade src tree for sm_90 without a GPU (Triton ASTSource + the
ptxas / cuobjdump bundled with Triton) and write its normalised SASS (register line first), PTX (debug
info dropped) and TTGIR (locations dropped) to /tmp/kascade_sass_NAME/, to compare two checkouts
instruction by instruction after a kernel refactor:

    git archive <rev> src | tar -x -C /tmp/base
    python benchmarks/tune/sass_dump.py base /tmp/base/src
    python benchmarks/tune/sass_dump.py new $PWD/src [d-,t-,p-]   # optional tag prefixes
    diff -r /tmp/kascade_sass_base /tmp/kascade_sass_new

TRITON_DISABLE_LINE_INFO=1 removes line info, which can make ptxas number registers differently for
the same PTX. Checked with Triton 3.9.
"""
import inspect, os, subprocess, sys, tempfile, re
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = "/tmp/kascade_sass_cache_" + sys.argv[1]
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, sys.argv[2])
only = sys.argv[3].split(",") if len(sys.argv) > 3 else None
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kascade.kernels import decode as kd, prefill as kp, topk as kt

F32 = {"SCORES", "M_PART", "L_PART", "O_PART", "POOLED", "lse_ptr"}
I32 = {"COUNTER", "BT", "IDX", "HEAD_MAP", "HIST", "PART", "BAR", "tile_k_ptr", "idx_ptr", "head_map_ptr"}
BF = {"Q", "K", "V", "OUT", "q_ptr", "k_ptr", "v_ptr", "out_ptr"}
I64 = {"KV_START", "KV_END", "kv_start_ptr", "kv_end_ptr", "qsl_ptr", "bt_ptr"}
FP16P = {"pooled_ptr"}
OUT = "/tmp/kascade_sass_" + sys.argv[1]
os.makedirs(OUT, exist_ok=True)
tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")

def build(tag, fn, consts, nw, ns, maxnreg=None, paged=False, pooled="*fp16", coop=False):
    if only and not any(tag.startswith(o) for o in only):
        return
    # constexprs left out take their defaults (else they would be typed as runtime i32 arguments)
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.name not in consts
                 and p.default is not inspect.Parameter.empty}, **consts}
    sg = {}
    for n in fn.arg_names:
        if n in consts: sg[n] = "constexpr"
        elif n in F32: sg[n] = "*fp32"
        elif n in I32: sg[n] = "*i32"
        elif n in BF: sg[n] = "*bf16"
        elif n in FP16P: sg[n] = pooled
        elif n in I64: sg[n] = "*i32" if paged else "*i64"
        elif n == "qk_scale": sg[n] = "fp32"
        else: sg[n] = "i32"
    dns = set(getattr(fn, "do_not_specialize", ()) or ())
    dns = {fn.arg_names[i] if isinstance(i, int) else i for i in dns}
    div = {n for n in fn.arg_names if sg[n].startswith("*") or (sg[n] == "i32" and (n.startswith("stride") or re.fullmatch(r"s[a-z]{2,4}", n)))} - dns
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
    src = ASTSource(fn, sg, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    opts = {"num_warps": nw, "num_stages": ns}
    if maxnreg: opts["maxnreg"] = maxnreg
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    lines = []
    for l in sass.splitlines():
        l = l.strip()
        m = re.match(r"/\*[0-9a-f]{4,}\*/\s*(.*?);", l)
        if m: lines.append(m.group(1))
    res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    reg = [x.strip() for x in res.splitlines() if "REG" in x]
    ptx = [l for l in k.asm["ptx"].splitlines() if not re.match(r"\s*(\.loc|\.file|//|\$L__|\.b8|\.b32 |\.section|\{|\}|$)", l)]
    with open(f"{OUT}/{tag}.ptx", "w") as f:
        f.write("\n".join(ptx))
    ttgir = re.sub(r"loc\([^\n]*", "", k.asm["ttgir"])
    ttgir = "\n".join(l for l in ttgir.splitlines() if not l.startswith("#loc"))
    with open(f"{OUT}/{tag}.ttgir", "w") as f:
        f.write(ttgir)
    with open(f"{OUT}/{tag}.sass", "w") as f:
        f.write((reg[0] if reg else "") + "\n" + "\n".join(lines) + "\n")
    print(tag, reg[0].split()[0] if reg else "?", len(lines), flush=True)

G, D = 4, 128
split = dict(G=G, GP=16, D=D, BLOCK_N=128, WRITE_SCORES=True, ACC_V=False, PRECISION="tf32", FUSE_COMBINE=False, GQ=4, SP=4, SB=2, ALIGN=128)
sp = dict(G=G, GP=16, D=D, BLOCK_N=64, PRECISION="tf32", FROM_SCORES=False, FUSE_COMBINE=True, GQ=4, SP=4, SB=2, ALIGN=64,
          DIRECT=False, MAPPED=True, BUDGET_BOUND=True)
for paged in (False, True):
    pg = dict(PAGED=paged, PAGE=16); s = "-paged" if paged else ""
    build("d-split-anchor" + s, kd.decode_split_kernel, {**split, **pg}, 4, 3, paged=paged)
    build("d-split-dense" + s, kd.decode_split_kernel, {**split, "WRITE_SCORES": False, "ACC_V": True, "FUSE_COMBINE": True, **pg}, 4, 3, paged=paged)
    build("d-sparse-reuse" + s, kd.decode_sparse_kernel, {**sp, **pg}, 4, 3, paged=paged)
    build("d-sparse-scores" + s, kd.decode_sparse_kernel, {**sp, "FROM_SCORES": True, "MAPPED": False, **pg}, 4, 3, paged=paged)
build("d-sparse-direct", kd.decode_sparse_kernel, {**sp, "DIRECT": True, "FUSE_COMBINE": False, "PAGED": False, "PAGE": 16}, 4, 3)
build("d-sparse-fp32", kd.decode_sparse_kernel, {**sp, "PRECISION": "ieee", "PAGED": False, "PAGE": 16}, 4, 3)
build("d-combine", kd.decode_combine_kernel, dict(G=G, D=D, SP=64, SB=32), 4, 3)
tk = dict(G=G, GP=4, SP=4, BLOCK=2048, NB=256)
build("t-pool", kt.pool_hist_kernel, tk, 8, 3)
build("t-refine2", kt.refine_hist_kernel, dict(LEVEL=2, B2=7, B3=7, NB=128, B=7, SHIFT=23, BLOCK=2048, ATOMIC_MAX=0, ZERO_PART=128), 8, 3)
build("t-refine3", kt.refine_hist_kernel, dict(LEVEL=3, B2=7, B3=7, NB=128, B=7, SHIFT=16, BLOCK=2048, ATOMIC_MAX=64, ZERO_PART=0), 8, 3)
build("t-compact", kt.compact_kernel, dict(B2=7, B3=7, NB3=128, SPP=64, BLOCK=2048), 8, 3)
build("t-fused", kt.select_fused_kernel, dict(tk, B2=7, B3=7, SPP=64, ATOMIC2=0, ATOMIC3=64, ZERO_PART=128), 8, 3)
attn = dict(D=D, G_BLOCK=4, BLOCK_T=32, DOT_PREC="tf32")
for paged in (False, True):
    pg = dict(PAGED=paged, PAGE=16); s = "-paged" if paged else ""
    build("p-flash" + s, kp._attn_fwd_kernel, {**attn, "BLOCK_N": 64, "WITH_V": True, "STORE_LSE": False, **pg}, 8, 3, paged=paged)
    build("p-lse" + s, kp._attn_fwd_kernel, {**attn, "BLOCK_N": 128, "WITH_V": False, "STORE_LSE": True, **pg}, 8, 2, paged=paged)
    build("p-pool" + s, kp._pool_kernel, dict(D=D, G_BLOCK=4, T=32, BLOCK_N=64, ATOMIC=False, DOT_PREC="tf32", **pg), 4, 3, paged=paged)
    build("p-sparse" + s, kp._sparse_kernel, dict(D=D, G_BLOCK=4, T=32, BLOCK_N=64, DOT_PREC="tf32", MAPPED=False, **pg), 8, 2, 128, paged=paged)
for name, extra in (("table", dict(TABLE=True)), ("physical", dict(TABLE=True, PHYSICAL=True))):  # vLLM backend's
    build("p-sparse-paged-" + name, kp._sparse_kernel, dict(D=D, G_BLOCK=4, T=32, BLOCK_N=64, DOT_PREC="tf32", MAPPED=True,
                                                           PAGED=True, PAGE=16, **extra), 8, 2, 128, paged=True)
build("p-sparse-mapped", kp._sparse_kernel, dict(D=D, G_BLOCK=4, T=32, BLOCK_N=64, DOT_PREC="tf32", MAPPED=True, PAGED=False, PAGE=16), 8, 2, 128)
build("p-pool-atomic", kp._pool_kernel, dict(D=D, G_BLOCK=8, T=32, BLOCK_N=64, ATOMIC=True, DOT_PREC="tf32", PAGED=False, PAGE=16), 8, 3, pooled="*fp32")
build("p-sparse-fp32-d64", kp._sparse_kernel, dict(D=64, G_BLOCK=2, T=16, BLOCK_N=64, DOT_PREC="ieee", MAPPED=False, PAGED=False, PAGE=16), 4, 2)
build("p-flash-fp32-d64", kp._attn_fwd_kernel, dict(D=64, G_BLOCK=1, BLOCK_T=64, DOT_PREC="ieee", BLOCK_N=64, WITH_V=True, STORE_LSE=False, PAGED=False, PAGE=16), 4, 3)
sel16 = dict(BLOCK=2048, KEY16=True, KEY_SHIFT=0, B2=7, B3=7)  # KEY_SHIFT: before the one tie rule
sel32 = dict(BLOCK=2048, KEY16=False, KEY_SHIFT=7, B2=7, B3=7)
for paged in (False, True):
    s = "-paged" if paged else ""
    c16 = {k: v for k, v in {**sel16, "PAGED": paged}.items() if k in kp._select_kernel.arg_names}
    c32 = {k: v for k, v in {**sel32, "PAGED": paged}.items() if k in kp._select_kernel.arg_names}
    build("p-select16" + s, kp._select_kernel, c16, 8, 3, paged=paged)
    build("p-select32" + s, kp._select_kernel, c32, 8, 3, paged=paged, pooled="*fp32")
