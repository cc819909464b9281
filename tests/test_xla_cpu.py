"""The kernel-library choice for CPU inference programs (`embedjax.xla_cpu`, issue 17): the choice
is read and checked, oneDNN programs really call oneDNN for their dots and nothing else, the
programs that abort jaxlib 0.10.2 under oneDNN's fused dots run under the chosen options, and a
real encoder's embeddings do not depend on the library (MiniLM on STS-B sentences and scifact
abstracts long enough for the blocked attention kernel's pairwise reductions)."""
import contextlib
import inspect
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax import xla_cpu


@pytest.fixture(autouse=True)
def library_inference_options(monkeypatch):
    """The library's own inference options: tests/conftest.py adds XLA's default LLVM level to them
    for the rest of the suite."""
    monkeypatch.setattr(xla_cpu, "_inference_options_for", inspect.unwrap(xla_cpu._inference_options_for))


def test_the_choice_is_read_from_the_environment_and_checked(monkeypatch):
    monkeypatch.delenv(xla_cpu.ENV, raising=False)
    assert xla_cpu.requested() == "auto"
    monkeypatch.setenv(xla_cpu.ENV, " oneDNN ")
    assert xla_cpu.requested() == "onednn"
    monkeypatch.setenv(xla_cpu.ENV, "mkl")
    with pytest.raises(ValueError, match="EMBEDJAX_CPU_GEMM='mkl'.*'auto', 'onednn', 'xla'"):
        xla_cpu.requested()
    assert xla_cpu.resolved("gpu", "onednn") == "xla" and xla_cpu.compiler_options("tpu", "onednn") is None
    assert xla_cpu.resolved("cpu", "xla") == "xla" and xla_cpu.compiler_options("cpu", "xla") is None
    assert xla_cpu.resolved("cpu", "onednn") == "onednn"


def test_onednn_inference_takes_the_loop_emitter_where_this_jaxlib_accepts_it(monkeypatch):
    """oneDNN inference programs ask for XLA's loop emitter (its fusions ran the attention softmax
    15x faster on msmarco passages, `embedjax.xla_cpu`); the training step's options do not (its
    backward ran 12 % slower); a jaxlib that rejects the option still gets oneDNN's dots."""
    loop = {**xla_cpu.ONEDNN_DOTS, "xla_cpu_use_fusion_emitters": False}
    assert xla_cpu.inference_options("cpu", "onednn") == loop
    assert xla_cpu.compiler_options("cpu", "onednn") == xla_cpu.ONEDNN_DOTS
    assert xla_cpu.inference_options("cpu", "xla") is None and xla_cpu.inference_options("gpu", "onednn") is None
    monkeypatch.setenv(xla_cpu.ENV, "onednn")
    asked, jit = [], jax.jit
    monkeypatch.setattr(jax, "jit", lambda fn, **kwargs: asked.append(kwargs["compiler_options"]) or jit(fn, **kwargs))
    xla_cpu.inference_jit(lambda x: x + 1, "cpu")
    assert asked == [loop]  # what Encoder's programs are compiled with
    monkeypatch.setattr(jax, "jit", jit)
    assert xla_cpu._accepted((("xla_cpu_no_such_option", True),)) is not None  # rejection is seen
    accepted = xla_cpu._accepted

    def without_the_emitter_option(options):
        return "unknown option" if "xla_cpu_use_fusion_emitters" in dict(options) else accepted(options)

    monkeypatch.setattr(xla_cpu, "_accepted", without_the_emitter_option)
    assert xla_cpu.inference_options("cpu", "onednn") == xla_cpu.ONEDNN_DOTS
    assert xla_cpu.resolved("cpu", "onednn") == "onednn"


@contextlib.contextmanager
def _compilation_cache(folder):
    """JAX's persistent cache folder set to ``folder`` (None: off) within the block. The training
    tests' session fixture turns it on for the rest of their worker's session, which may include
    this file."""
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", folder)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


def test_auto_means_onednn_on_x86_64_unless_the_persistent_compilation_cache_is_on(tmp_path):
    """jaxlib 0.10.2 cannot write a oneDNN program to the cache: auto then keeps XLA's defaults,
    an explicit onednn still gets oneDNN."""
    with _compilation_cache(None):
        assert not xla_cpu.persistent_cache_on()
        assert xla_cpu.resolved("cpu", "auto") == ("onednn" if xla_cpu._is_x86_64() else "xla")
    with _compilation_cache(str(tmp_path)):
        assert xla_cpu.persistent_cache_on()
        assert xla_cpu.resolved("cpu", "auto") == "xla" and xla_cpu.resolved("cpu", "onednn") == "onednn"


def test_a_onednn_program_calls_onednn_for_its_dots_and_tells_its_tracing(monkeypatch, hold_for_session):
    monkeypatch.setenv(xla_cpu.ENV, "onednn")
    seen = []

    def mlp(x, w):
        seen.append(xla_cpu.tracing_library())
        return jax.nn.gelu(x @ w, approximate=False).max(axis=-1)

    x, w = jnp.ones((64, 32)), jnp.full((32, 48), 0.01)
    onednn = hold_for_session(xla_cpu.inference_jit(mlp, "cpu"))
    hlo = onednn.lower(x, w).compile().as_text()
    assert "__onednn_fusion" in hlo and "__ynn_fusion" not in hlo
    assert seen == ["onednn"] and xla_cpu.tracing_library() == "xla"
    monkeypatch.setenv(xla_cpu.ENV, "xla")
    default = xla_cpu.inference_jit(mlp, "cpu")
    assert "__onednn_fusion" not in default.lower(x, w).compile().as_text() and seen[-1] == "xla"
    np.testing.assert_allclose(np.asarray(onednn(x, w)), np.asarray(default(x, w)), rtol=1e-6)


def test_programs_that_abort_under_fused_onednn_dots_run(tmp_path):
    """jaxlib 0.10.2 aborts the process ("partition compile failed") at the first run of a dot that
    reads erf GELU, SiLU, or the exponential of another dot when oneDNN fuses elementwise producers
    into its dots; `xla_cpu.ONEDNN_DOTS` gives it single dots. Their gradients too (the training
    step's programs). A subprocess, since an abort would take the test runner with it."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from embedjax import xla_cpu
        rng = np.random.default_rng(0)
        x, w, u = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((37, 24), (24, 40), (40, 24)))
        programs = {
            "gelu_mlp": lambda x: jax.nn.gelu(x @ w, approximate=False) @ u,
            "swiglu": lambda x: (jax.nn.silu(x @ w) * (x @ w * 0.5)) @ u,
            "attention": lambda x: jnp.exp((x @ x.T) * 0.01) @ x,
        }
        compiled = []  # held to the end: a oneDNN program dropped by its own finishing run aborts
        for name, f in programs.items():
            # forward, and the backward programs the training step compiles with the same options
            for part, g in (("forward", f), ("gradient", jax.grad(lambda x, f=f: jnp.sum(f(x) ** 2)))):
                compiled.append(jax.jit(g, compiler_options=xla_cpu.compiler_options("cpu", "onednn")))
                onednn = compiled[-1](x)
                reference = np.asarray(jax.jit(g)(x))
                # float32 sums: the gradients' entries cancel terms up to ~1e3x larger than themselves
                np.testing.assert_allclose(np.asarray(onednn), reference, atol=2e-6 * np.abs(reference).max())
                print(name, part)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == [word for name in ("gelu_mlp", "swiglu", "attention")
                                   for word in (name, "forward", name, "gradient")]


def test_encoder_embeddings_do_not_depend_on_the_cpu_library(monkeypatch, data_dir, hold_for_session):
    """oneDNN dots (and the attention kernel's pairwise row reductions, which
    tests/models/test_attention_kernels.py checks are traced) against XLA's defaults on real texts;
    2e-6 absolute on unit vectors is a few float32 ulps of their largest entries."""
    import embedjax as ej
    from embedjax.bench.encode import load_texts

    texts = load_texts("stsb", str(data_dir / "stsb" / "sts-test.csv"), 24)
    texts += load_texts("scifact", str(data_dir / "scifact"), 6)
    out, hlo = {}, {}
    for library in ("onednn", "xla"):
        monkeypatch.setenv(xla_cpu.ENV, library)
        enc = hold_for_session(ej.Encoder.from_pretrained("all-MiniLM-L6-v2", max_length=256))
        out[library] = enc.encode(texts, batch_size=16, pack=False)
        batch = enc.tokenizer.pad(enc.tokenizer.token_ids(texts[-6:]), rows=6)
        hlo[library] = enc._jitted.lower(enc.params, batch).compile().as_text()
    assert "__onednn_fusion" in hlo["onednn"] and "__onednn_fusion" not in hlo["xla"]
    assert np.abs(out["onednn"] - out["xla"]).max() <= 2e-6
    assert np.abs(out["onednn"] @ out["xla"].T - np.eye(len(texts))).diagonal().max() <= 1e-5


def test_the_training_step_compiles_with_the_chosen_library(monkeypatch, hold_for_session):
    """`make_train_step` takes the same options (its dots, forward and backward, go to oneDNN), and
    one SGD step's update agrees with XLA's defaults to float32 rounding."""
    import optax

    from embedjax.sharding.mesh import make_mesh
    from embedjax.train.state import create_state, state_shardings
    from embedjax.train.step import Objective, batch_shardings, make_train_step

    rng = np.random.default_rng(1)
    w0 = jnp.asarray(rng.normal(size=(29, 43)) / 6, jnp.float32)
    batch = {"x": jnp.asarray(rng.normal(size=(13, 29)), jnp.float32)}
    objective = Objective(
        embed_columns=lambda params, b, r, shared=None: {"x": jax.nn.gelu(b["x"] @ params["w"], approximate=False)},
        loss_from_embeddings=lambda emb, b: jnp.mean(emb["x"] @ emb["x"].T))
    tx, mesh = optax.sgd(0.1), make_mesh({"data": 1}, devices=jax.devices()[:1])
    updated, hlo = {}, {}
    for library in ("onednn", "xla"):
        monkeypatch.setenv(xla_cpu.ENV, library)
        params = {"w": w0 + 0}  # the step donates its state
        step = hold_for_session(make_train_step(objective, tx, lambda s: 0.1,
                                                state_shardings(params, tx, mesh, ()),
                                                batch_shardings(batch, mesh, None), mesh))
        state = create_state(params, tx, 0)
        hlo[library] = step.lower(state, batch).compile().as_text()
        updated[library] = np.asarray(step(state, batch)[0].params["w"])
    assert hlo["onednn"].count("__onednn_fusion") >= 3 and "__onednn_fusion" not in hlo["xla"]
    assert np.abs(updated["onednn"] - np.asarray(w0)).max() > 1e-3  # the step moved the weights
    np.testing.assert_allclose(updated["onednn"], updated["xla"], rtol=1e-5, atol=1e-6)
