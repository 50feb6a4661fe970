"""The whole model with the Triton path forced equals the PyTorch path: logits, and the gradients
of a loss w.r.t. every parameter; plus ``torch.compile(fullgraph=True)`` through the registered ops.

Without CUDA the Triton kernels run on CPU tensors through Triton's interpreter (fp32 only), and
sliding-window attention's "triton" implementation falls back to the blocked PyTorch form on CPU.
"""

import os

import pytest
import torch

# Triton picks the interpreter when a kernel is decorated, i.e. when the kernel module is imported:
# the flag must be set before that import (and before importing triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from titans_lnn import TitansLNN, TitansLNNConfig
from titans_lnn.kernels import dispatch, liquid_scan, ops
from titans_lnn.kernels.liquid import liquid_scan_ref
from titans_lnn.kernels.liquid import triton as lst
from titans_lnn.kernels.titans_memory import triton as mut
from titans_lnn.kernels.window_attention import cuda as attention_cuda

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = 1e-4  # relative RMS; the kernels accumulate in fp32 in another order than PyTorch


def run_model(variant, impl, monkeypatch, T=29, seed=0):
    monkeypatch.setenv(dispatch.ENV_VAR, impl)
    torch.manual_seed(0)
    model = TitansLNN(TitansLNNConfig.from_preset("debug", variant=variant)).to(DEVICE)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=g).to(DEVICE)
    labels = torch.randint(0, model.config.vocab_size, (2, T), generator=g).to(DEVICE)
    out = model(ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def spy(monkeypatch, module, name, calls):
    fn = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm", "liquid"])
def test_triton_path_equals_torch_path(close, monkeypatch, variant):
    logits_ref, grads_ref = run_model(variant, "torch", monkeypatch)
    calls = []
    spy(monkeypatch, lst, "liquid_scan_triton", calls)
    spy(monkeypatch, mut, "memory_update_triton", calls)
    spy(monkeypatch, attention_cuda, "sliding_window_attention_cuda", calls)
    logits, grads = run_model(variant, "triton", monkeypatch)
    parts = TitansLNNConfig.from_preset("debug", variant=variant).parts
    expected = {"liquid": "liquid_scan_triton", "memory": "memory_update_triton",
                "attention": "sliding_window_attention_cuda"}
    assert {expected[p] for p in parts} <= set(calls), (parts, sorted(set(calls)))
    close(logits_ref, logits, RTOL, "logits")
    assert grads.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        close(g, grads[name], RTOL, name)


def test_triton_path_streaming(close, monkeypatch):
    """Triton path: reading in pieces (calls starting mid-chunk) equals one pass."""
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    torch.manual_seed(0)
    model = TitansLNN(TitansLNNConfig.from_preset("debug", variant="mac")).to(DEVICE)
    ids = torch.randint(0, 256, (1, 23), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        whole = model(ids).logits
        state, pieces = model.init_state(1), []
        for a, b in ((0, 6), (6, 15), (15, 23)):
            out = model(ids[:, a:b], state=state)
            state = out.state
            pieces.append(out.logits)
    close(whole, torch.cat(pieces, 1), RTOL, "streamed")


# torch.compile through the registered ops (kernels/ops.py). Compiling is slow on a small CPU: keep the
# graphs tiny.


def test_liquid_scan_op_compiles_fullgraph(close):
    """liquid_scan under torch.compile(fullgraph=True): forward and backward through the custom op."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    log_a = (-torch.rand(2, 37, 5, generator=g)).requires_grad_()
    b = torch.randn(2, 37, 5, generator=g, requires_grad=True)
    h0 = torch.randn(2, 5, generator=g, requires_grad=True)

    def f(log_a, b, h0):
        h, h_last = liquid_scan(log_a, b, h0, impl="torch")
        return (h * h).sum() + h_last.sum()

    torch._dynamo.reset()  # earlier compiles in the same process (attention tests) must not count against limits
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(log_a, b, h0)
    grads = torch.autograd.grad(loss, (log_a, b, h0))
    h, h_last = liquid_scan_ref(log_a, b, h0)
    ref_loss = (h * h).sum() + h_last.sum()
    ref_grads = torch.autograd.grad(ref_loss, (log_a, b, h0))
    close(ref_loss.detach(), loss.detach(), 1e-5, "loss")
    for name, r, o in zip(("d_log_a", "db", "dh0"), ref_grads, grads):
        close(r, o, 1e-5, name)


def test_ops_eager_match_impls(close):
    """The registered ops (called directly, eagerly) equal the dispatched functions, with gradients."""
    g = torch.Generator().manual_seed(1)
    log_a = (-torch.rand(1, 9, 3, generator=g)).requires_grad_()
    b = torch.randn(1, 9, 3, generator=g, requires_grad=True)
    h, h_last = torch.ops.titans_lnn.liquid_scan(log_a, b, None, "ref")
    h_ref, h_last_ref = liquid_scan_ref(log_a, b)
    close(h_ref, h, 1e-6, "h")
    close(h_last_ref, h_last, 1e-6, "h_last")
    w = torch.randn_like(h)
    for r, o in zip(torch.autograd.grad((h_ref * w).sum(), (log_a, b)), torch.autograd.grad((h * w).sum(), (log_a, b))):
        close(r, o, 1e-6, "grad")
    assert ops.OPS == ("liquid_scan", "memory_update", "sliding_window_attention")


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm", "liquid"])
def test_model_compiles_fullgraph(close, variant):
    """The whole model traces without graph breaks, forward and backward, and computes the same
    (aot_eager backend: no C++ code generation on the CPU; 2-10 s per variant here)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TitansLNN(TitansLNNConfig.from_preset("debug", variant=variant))
    ids = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(2))
    eager = model(ids, labels=ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(ids, labels=ids)
    close(eager.logits.detach(), out.logits.detach(), 1e-5, "logits")
    params = [p for p in model.parameters() if p.requires_grad]
    for r, o in zip(torch.autograd.grad(eager.loss, params, allow_unused=True),
                    torch.autograd.grad(out.loss, params, allow_unused=True)):
        if r is not None:
            close(r, o, 1e-4, "grad")
