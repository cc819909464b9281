"""Every Pallas kernel lowers for CUDA through the Triton backend, checked on a CPU machine.

`jax.export` lowers a function for a platform this machine lacks: with the kernels traced as for
a GPU (`dispatch.default_backend` reports "gpu", so they are not in interpret mode and take
`dispatch.pallas_compiler_params`), each lowered module must hold Triton kernel calls, one per
``pallas_call``. This catches what a GPU would refuse at lowering (operations Triton lacks, block
shapes it cannot take) without one; compiling the Triton IR to machine code, and the kernels'
numbers, still need a GPU (`bench kernels`, `bench loss --ring-impl pallas`).
Under Mosaic GPU, JAX's default for a ``pallas_call`` without parameters since 0.10, the ring
loss's fused tiles cannot lower at all: they stage whole operands in shared memory.
"""
import jax
import jax.numpy as jnp
import pytest
from jax import export

from embedjax.kernels import dispatch, flash_attention
from embedjax.kernels.hamming import hamming_topk
from embedjax.kernels.lowbit import int8_topk
from embedjax.kernels.maxsim import maxsim_rerank
from embedjax.kernels.rescore import rescore_topk
from embedjax.losses import ring

TRITON_CALL = "__gpu$xla.gpu.triton"
Q, N, WORDS, DIM = 8, 1000, 32, 96


@pytest.fixture
def traced_for_gpu(monkeypatch):
    monkeypatch.setattr(dispatch, "default_backend", lambda: "gpu")


def _lowered_for_cuda(fn, *shapes):
    """The StableHLO text of ``fn`` lowered for CUDA (Triton calls carry no compatibility promise,
    which only matters for serialised exports; this one is read and dropped)."""
    unchecked = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    return export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=unchecked)(*shapes).mlir_module()


def _spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _ring_loss_and_grads(q, d):
    mesh = jax.make_mesh((1,), ("data",))
    loss = lambda q, d: ring.ring_infonce(q, d, mesh=mesh, temperature=0.05, impl="pallas")  # noqa: E731
    return jax.value_and_grad(loss, argnums=(0, 1))(q, d)


def _flash_attention_and_grads(q, k, v, key_ids):
    def loss(q, k, v):
        out = flash_attention.flash_attention(q, k, v, jnp.ones_like(key_ids), key_ids, causal=True, window=40,
                                              dropout_rate=0.1, seed=jnp.int32(5))
        return jnp.sum(out.astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


CASES = {  # name: (function, input shapes, pallas_calls it makes)
    "hamming running": (lambda q, x: hamming_topk(q, x, 10, impl="pallas", select="running"),
                        (_spec((Q, WORDS), jnp.uint32), _spec((N, WORDS), jnp.uint32)), 1),
    "hamming two_pass": (lambda q, x: hamming_topk(q, x, 10, impl="pallas", select="two_pass"),
                         (_spec((Q, WORDS), jnp.uint32), _spec((N, WORDS), jnp.uint32)), 1),
    "int8 running": (lambda q, x, s: int8_topk(q, s[:Q], x, s, 10, impl="pallas"),
                     (_spec((Q, DIM), jnp.int8), _spec((N, DIM), jnp.int8), _spec((N,), jnp.float32)), 1),
    "int8 two_pass": (lambda q, x, s: int8_topk(q, s[:Q], x, s, 10, impl="pallas", select="two_pass"),
                      (_spec((Q, DIM), jnp.int8), _spec((N, DIM), jnp.int8), _spec((N,), jnp.float32)), 1),
    "rescore": (lambda q, c, x: rescore_topk(q, c, x, 5, impl="pallas"),
                (_spec((Q, DIM), jnp.float32), _spec((Q, 40), jnp.int32), _spec((N, DIM), jnp.float32)), 1),
    "maxsim rerank": (lambda q, qm, c, x, xm: maxsim_rerank(q, qm, c, x, xm, 5, impl="pallas"),
                      (_spec((Q, 12, 64), jnp.float32), _spec((Q, 12), jnp.bool_), _spec((Q, 20), jnp.int32),
                       _spec((200, 30, 64), jnp.float32), _spec((200, 30), jnp.bool_)), 1),
    # forward, then the key-side and query-side gradient kernels; bf16, GQA 8 over 4, 100 tokens
    "flash attention value and grads": (_flash_attention_and_grads,
                                        (_spec((2, 100, 8, 64), jnp.bfloat16), _spec((2, 100, 4, 64), jnp.bfloat16),
                                         _spec((2, 100, 4, 64), jnp.bfloat16), _spec((2, 100), jnp.int32)), 3),
    # forward statistics, then the anchor-side and key-side gradient kernels
    "ring infonce value and grads": (_ring_loss_and_grads, (_spec((256, 768), jnp.float32),) * 2, 3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_lower_for_cuda_through_triton(name, traced_for_gpu):
    fn, shapes, calls = CASES[name]
    text = _lowered_for_cuda(fn, *shapes)
    assert text.count(TRITON_CALL) == calls
    assert "mosaic_gpu" not in text
    if name.startswith("ring"):  # unpipelined: at Triton's 3 stages an H200 refused their shared memory
        assert text.count("num_stages = 1 : i32") == calls


def _corpus_copies(text: str) -> list[str]:
    """Ops of a lowered module that move a corpus-sized array (a dimension of 7+ digits)."""
    import re

    return re.findall(r"stablehlo\.(transpose|pad|concatenate|slice|dynamic_slice) [^\n]*[<x]\d{7,}x", text)


def test_a_corpus_at_scan_rows_reaches_the_hamming_kernel_without_a_copy(traced_for_gpu):
    """Every search over row-major codes first transposes (and pads) the whole corpus, a copy as
    large as the corpus, before the kernel reads it; a word-major corpus stored at
    `scan_rows` goes to the kernel as it is (its uint32 -> int32 bitcast is no copy). 10M codes."""
    from embedjax.kernels.hamming import hamming_topk_pallas
    from embedjax.kernels.two_pass_topk import scan_rows

    n = 10_000_000
    rows = scan_rows(n)
    for layout, corpus_shape, copies in (("rows", (n, 32), 1), ("words", (32, rows), 0)):
        text = _lowered_for_cuda(lambda q, x: hamming_topk_pallas(q, x, 10, n, select="two_pass", layout=layout),
                                 _spec((64, 32), jnp.uint32), _spec(corpus_shape, jnp.uint32))
        corpus_ops = _corpus_copies(text)
        assert len(corpus_ops) >= copies and (copies or not corpus_ops), (layout, corpus_ops)
        assert text.count(TRITON_CALL) == 1


@pytest.mark.parametrize("select", ["running", "two_pass"])
def test_int8_codes_at_scan_rows_reach_the_kernel_without_a_copy(select, traced_for_gpu):
    """The int8 scan reads row-major codes [N, D] as they are stored (its tiles contract q with x^T):
    a corpus of `scan_rows` rows and whole depth blocks (384) goes to the kernel uncopied; one of 5M
    rows is padded to whole splits (a copy). 4.1M-5M x 384 codes."""
    from embedjax.kernels import lowbit
    from embedjax.kernels.two_pass_topk import scan_rows

    n = 5_000_000
    for rows, copies in ((scan_rows(4_100_000), 0), (n, 1)):
        shapes = (_spec((64, 384), jnp.int8), _spec((rows, 384), jnp.int8), _spec((64,), jnp.float32),
                  _spec((rows,), jnp.float32))
        text = _lowered_for_cuda(lambda q, x, qs, xs: lowbit._lowbit_pallas(q, qs, x, xs, qs, 10, rows, kind="int8",
                                                                            select=select), *shapes)
        corpus_ops = _corpus_copies(text)
        assert len(corpus_ops) >= copies and (copies or not corpus_ops), (rows, corpus_ops)


def test_the_gpu_backend_is_chosen_by_environment(traced_for_gpu, monkeypatch):
    """Mosaic GPU on request; there the ring tiles cannot lower (the reason Triton is the default).
    The choice is read when a kernel is traced, so the jitted kernels' traces are dropped first."""
    from jax.experimental.pallas import mosaic_gpu, triton

    assert isinstance(dispatch.pallas_compiler_params(), triton.CompilerParams)
    monkeypatch.setenv(dispatch.GPU_BACKEND_ENV, "mosaic")
    assert isinstance(dispatch.pallas_compiler_params(), mosaic_gpu.CompilerParams)
    jax.clear_caches()
    fn, shapes, _ = CASES["ring infonce value and grads"]
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        _lowered_for_cuda(fn, *shapes)
    jax.clear_caches()
    monkeypatch.setenv(dispatch.GPU_BACKEND_ENV, "cutlass")
    with pytest.raises(ValueError, match=r"EMBEDJAX_PALLAS_GPU must be one of \('triton', 'mosaic'\)"):
        dispatch.pallas_compiler_params()


def test_off_the_gpu_kernels_take_their_backends_defaults():
    assert dispatch.default_backend() == "cpu" and dispatch.pallas_compiler_params() is None


def test_scans_past_32_bit_offsets_are_refused_and_auto_searches_them_with_xla(traced_for_gpu):
    """Triton offsets are 32-bit: on an H200 the int8 scan over 10M x 384 codes (3.8e9 elements)
    returned wrong neighbours for every query. The scan refuses such a corpus, naming the fix;
    int8_topk(impl="pallas") scans it in pieces (`tests/kernels/test_lowbit_kernels.py` checks
    them exact) and impl="auto" hands it to the XLA twin; 5M x 384 still fits. Shapes only
    (`jax.eval_shape`)."""
    from embedjax.kernels import lowbit
    from embedjax.kernels.pallas_topk import addressable_pieces, scan_fits

    assert scan_fits(5_000_000, 384) and not scan_fits(10_000_000, 384) and scan_fits(10_000_000, 32)
    rows = 6_000_000
    assert addressable_pieces(rows, 384) == 2
    shapes = (_spec((4, 384), jnp.int8), _spec((rows, 384), jnp.int8), _spec((4,), jnp.float32),
              _spec((rows,), jnp.float32))
    with pytest.raises(ValueError, match=r"32-bit offsets.*impl='xla'.*shards of at most 2,796,202 rows"):
        jax.eval_shape(lambda q, x, qs, xs: lowbit._lowbit_pallas(q, qs, x, xs, qs, 10, rows, kind="int8"), *shapes)
    pieces = jax.eval_shape(lambda q, x, qs, xs: lowbit.int8_topk(q, qs, x, xs, 10, impl="pallas"), *shapes)
    assert pieces[1].shape == (4, 10)
    seen = []
    original = lowbit._lowbit_xla
    try:
        lowbit._lowbit_xla = lambda *a, **kw: seen.append("xla") or original(*a, **kw)
        out = jax.eval_shape(lambda q, x, qs, xs: lowbit.int8_topk(q, qs, x, xs, 10), *shapes)
    finally:
        lowbit._lowbit_xla = original
    assert seen == ["xla"] and out[1].shape == (4, 10)


def test_hamming_scans_past_32_bit_offsets_go_in_pieces_or_to_xla(traced_for_gpu):
    """The Hamming scan has the same limit: 70M codes of 1024 bits (2.2e9 words) take two pieces
    with impl="pallas" (`tests/kernels/test_hamming_kernel.py` checks pieces exact) and the XLA
    twin with impl="auto". Shapes only (`jax.eval_shape`)."""
    from embedjax.kernels import hamming
    from embedjax.kernels.pallas_topk import addressable_pieces

    rows = 70_000_000
    assert addressable_pieces(rows, WORDS, target_splits=2048) == 2
    shapes = (_spec((4, WORDS), jnp.uint32), _spec((rows, WORDS), jnp.uint32))
    pieces = []
    original_scores, original_xla = hamming._hamming_pallas_scores, hamming.hamming_topk_xla
    try:
        hamming._hamming_pallas_scores = lambda q, x, *a, **kw: pieces.append(x.shape) or original_scores(q, x, *a, **kw)
        hamming.hamming_topk_xla = lambda *a, **kw: pieces.append("xla") or original_xla(*a, **kw)
        out = jax.eval_shape(lambda q, x: hamming_topk(q, x, 10, impl="pallas"), *shapes)
        assert pieces == [(35_000_000, WORDS)] * 2 and out[1].shape == (4, 10)
        pieces.clear()
        jax.eval_shape(lambda q, x: hamming_topk(q, x, 10), *shapes)
        assert pieces == ["xla"]
    finally:
        hamming._hamming_pallas_scores, hamming.hamming_topk_xla = original_scores, original_xla


def test_auto_selection_on_a_gpu_is_the_two_pass_scan(traced_for_gpu):
    """Measured on an H200 at 10M codes (`two_pass_topk.DEFAULT_SPLITS`): the two-pass scan at 2048
    splits, 1.3-1.5x the XLA twin, where the running one at 64 splits took 0.18-0.34x."""
    from embedjax.kernels import hamming, two_pass_topk

    text = _lowered_for_cuda(lambda q, x: hamming_topk(q, x, 10), _spec((Q, WORDS), jnp.uint32),
                             _spec((200_000, WORDS), jnp.uint32))
    assert 'name = "tile_maxima"' in text and 'name = "running_topk"' not in text
    assert "grid_y = 1563 : i32" in text  # 1,563 tiles of 128 rows, one per program (64 splits: 49)
    assert hamming._selection("auto", "xla", None) == "two_pass" and hamming._selection("auto", "xla", 1) == "running"
    assert two_pass_topk.DEFAULT_SPLITS == {"running": 64, "two_pass": 2048}


def test_the_offline_triton_compile_captures_each_kernel_with_its_launch_settings(traced_for_gpu):
    """`benchmarks/triton_resources.py` compiles each kernel's Triton IR for sm_90 with pip's Triton
    (not installed here). Its capture half runs anywhere: one Triton module per pallas_call, named
    as the call, with the warps and stages the call was lowered with (the ring's tiles unpipelined)."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
    import triton_resources

    cases = triton_resources._cases()
    flash = next(v for k, v in cases.items() if k.startswith("flash attention, MiniLM"))
    kernels = triton_resources.capture(*flash)
    assert [k["kernel"] for k in kernels] == ["flash_attention_forward", "flash_attention_key_side",
                                              "flash_attention_query_side"]
    assert all(k["num_warps"] == 4 and k["num_stages"] == 3 and k["ttir"].startswith("module @") for k in kernels)
    assert "tt.dot" in kernels[0]["ttir"] and "tt.func" in kernels[0]["ttir"]
    ring_tiles = triton_resources.capture(*cases["ring InfoNCE fused tiles, 4096 x 768, block 64"])
    assert [k["num_stages"] for k in ring_tiles] == [1, 1, 1]
