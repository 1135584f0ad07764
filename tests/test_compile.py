"""torch.compile(fullgraph=True) over flows built on the fused coupling op: no graph breaks, eager results.

Compiling is slow on CPU, so there are few tests here: the fused ("auto") RealNVP goes through
Inductor, the way users compile; the others use the cheaper "aot_eager" backend, which still traces
the whole graph with dynamo and AOTAutograd (fake kernels, registered autograd).
"""
from __future__ import annotations

import pytest
import torch

import flowops
from flowops.models import RealNVP
from flowops.nn import AffineCoupling


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _randomize(module, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _flowops_nodes(explanation):
    return [str(n.target) for g in explanation.graphs for n in g.graph.nodes if "flowops" in str(n.target)]


def _eager_and_compiled(module, fn, x, compiled_fn):
    """(output, x.grad, param grads) of fn eagerly and of compiled_fn, under the same upstream gradient."""
    results = []
    for f in (fn, compiled_fn):
        module.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        out = f(xx)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters()}
        results.append(([o.detach() for o in outs], xx.grad, grads))
    return results


def _assert_match(results):
    (outs, gx, grads), (c_outs, c_gx, c_grads) = results
    for a, b in zip(outs, c_outs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_gx, gx, rtol=1e-5, atol=1e-5)
    assert grads.keys() == c_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("backend,compiler", [("auto", "inductor"), ("reference", "aot_eager")])
def test_realnvp_log_prob_compiles(backend, compiler):
    model = _randomize(RealNVP(4, layers=3, hidden=16))
    x = torch.randn(8, 4)
    with flowops.use_backend(backend):
        explanation = torch._dynamo.explain(model.log_prob)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        nodes = _flowops_nodes(explanation)
        if backend == "auto" and flowops._backend.has_cpp():
            assert nodes.count("flowops.affine_coupling_fwd") == 3, nodes
        if backend == "reference":
            assert nodes == []
        torch._dynamo.reset()
        compiled = torch.compile(model.log_prob, fullgraph=True, backend=compiler)
        results = _eager_and_compiled(model, model.log_prob, x, compiled)
        # a second batch of the same shape reuses the compiled graph and still matches
        x2 = torch.randn(8, 4)
        torch.testing.assert_close(compiled(x2), model.log_prob(x2), rtol=1e-5, atol=1e-5)
    _assert_match(results)


def test_compiled_module_sample_direction():
    """torch.compile on the module itself, and on the generative (inverse) direction."""
    model = _randomize(RealNVP(4, layers=3, hidden=16), seed=2)
    z = torch.randn(6, 4)
    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = _eager_and_compiled(model, model, z, compiled_model)  # forward: (z, logdet)
    _assert_match(results)
    compiled_inverse = torch.compile(model.inverse, fullgraph=True, backend="aot_eager")
    results = _eager_and_compiled(model, model.inverse, z, compiled_inverse)
    _assert_match(results)


def test_image_checkerboard_coupling_compiles():
    layer = _randomize(AffineCoupling((3, 4, 5), mask="checkerboard", hidden=8, scale="softclamp"), std=0.1)
    x = torch.randn(2, 3, 4, 5)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    if flowops._backend.has_cpp():
        assert _flowops_nodes(explanation) == ["flowops.affine_coupling_fwd"]
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    _assert_match(_eager_and_compiled(layer, layer, x, compiled))
    compiled_inverse = torch.compile(layer.inverse, fullgraph=True, backend="aot_eager")
    _assert_match(_eager_and_compiled(layer, layer.inverse, x, compiled_inverse))
