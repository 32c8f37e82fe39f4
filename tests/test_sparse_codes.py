"""The sparse-code kernels (actors/sae/sparse_codes.py) and the TopK family's sparse forward against dense
references: values and gradients, with tied pre-activations, rows with fewer than k positive latents (entries of
value 0), and rows with no entries at all."""

import pytest
import torch
import torch.nn.functional as F

from actors.sae import ARCHITECTURES
from actors.sae.base import fraction_of_variance_unexplained
from actors.sae.sparse_codes import SparseCodes, decode, encode_selected

B, D, N = 9, 6, 13


def _problem(dtype):
    g = torch.Generator().manual_seed(0)
    x, W_enc, b_enc, W_dec, b_dec, probe = (torch.randn(*shape, generator=g).to(dtype)
                                            for shape in ((B, D), (N, D), (N,), (N, D), (D,), (B, D)))
    W_enc[3], b_enc[3] = W_enc[5], b_enc[5]  # latents 3 and 5 tie in every row
    b_enc[8:] = -50.0  # latents 8.. are always clipped to 0 by the relu
    return [t.requires_grad_() for t in (x, W_enc, b_enc, W_dec, b_dec)], probe


def _grads(out, inputs):
    return torch.autograd.grad(out, inputs)


def _check(codes_of, dtype, tol):
    (x, W_enc, b_enc, W_dec, b_dec), probe = _problem(dtype)
    with torch.no_grad():
        pre_plain = F.relu(F.linear(x - b_dec, W_enc, b_enc))
    codes = codes_of(pre_plain)
    # Dense reference: the selected pre-activations scattered into [B, N], decoded by a dense matmul.
    pre = F.relu(F.linear(x - b_dec, W_enc, b_enc))
    mask = codes.to_dense(torch.ones_like(codes.values)).bool()
    z_ref = torch.where(mask, pre, torch.zeros_like(pre))
    x_hat_ref = z_ref @ W_dec + b_dec
    loss_ref = (x_hat_ref * probe).sum() + x_hat_ref.pow(2).sum()  # a generic loss of the reconstruction
    # Sparse kernels.
    values = encode_selected(codes, x, W_enc, b_enc, b_dec)
    x_hat = decode(codes, values, W_dec) + b_dec
    loss = (x_hat * probe).sum() + x_hat.pow(2).sum()
    torch.testing.assert_close(codes.to_dense(values.detach()), z_ref.detach(), rtol=0, atol=0)
    torch.testing.assert_close(x_hat, x_hat_ref, rtol=tol, atol=tol)
    inputs = (x, W_enc, b_enc, W_dec, b_dec)
    for name, got, want in zip(("x", "W_enc", "b_enc", "W_dec", "b_dec"), _grads(loss, inputs),
                               _grads(loss_ref, inputs)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=name)
    return codes


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_topk_rows_match_the_dense_computation(dtype, tol):
    k = 6  # more than the positive latents of some rows: those rows select zeros
    codes = _check(lambda pre: SparseCodes.from_rows(*pre.topk(k, dim=-1, sorted=False), N), dtype, tol)
    assert (codes.values == 0).any() and (codes.values > 0).any()
    assert set(codes.latents.tolist()) & {3, 5}  # the tied pair took part


def test_variable_rows_including_empty_and_full_ones_match_the_dense_computation():
    def codes_of(pre):
        mask = pre > pre.median()
        mask[1] = False  # a row without entries
        mask[2] = True  # a row with every latent, clipped zeros included
        return SparseCodes.from_mask(pre, mask)

    codes = _check(codes_of, torch.float64, 1e-10)
    assert codes.row_starts[1] == codes.row_starts[2]
    assert int((codes.rows == 2).sum()) == N


def test_subset_and_layout():
    pre = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.5]])
    codes = SparseCodes.from_mask(pre, pre > 0)
    assert codes.rows.tolist() == [0, 0, 1, 1] and codes.latents.tolist() == [1, 2, 0, 2]
    assert codes.row_starts.tolist() == [0, 2]
    # grouped by latent, equal latents in row order: latent 0 <- entry 2; latent 1 <- 0; latent 2 <- 1, 3
    assert codes.by_latent.tolist() == [2, 0, 1, 3] and codes.latent_starts.tolist() == [0, 1, 2]
    part = codes.subset(codes.latents == 2)
    assert part.rows.tolist() == [0, 1] and part.values.tolist() == [1.0, 0.5]
    assert torch.equal(codes.to_dense(), pre)


def _dense_topk_loss(sae, x, dead, nested_sizes=None):
    """The TopK family's loss written densely, as the architectures computed it before sparse codes."""
    pre = F.relu(sae.encoder(x - sae.b_dec))
    if sae.name == "topk":
        values, indices = pre.topk(sae.params.k, dim=-1, sorted=False)
        z = torch.zeros_like(pre).scatter(-1, indices, values)
    else:  # batch-level top k
        flat = pre.flatten()
        values, indices = flat.topk(sae.params.k * x.shape[0], sorted=False)
        z = torch.zeros_like(flat).scatter(-1, indices, values).view_as(pre)
    x_hat = z @ sae.W_dec + sae.b_dec
    if nested_sizes:
        parts = [zg @ wg for zg, wg in zip(z.split(nested_sizes, -1), sae.W_dec.split(nested_sizes, 0))]
        prefixes = torch.stack(parts).cumsum(0) + sae.b_dec
        loss = torch.stack([fraction_of_variance_unexplained(x, p) for p in prefixes]).mean()
    else:
        loss = fraction_of_variance_unexplained(x, x_hat)
    num_dead = int(dead.sum())
    if sae.params.auxk_alpha > 0 and num_dead:
        k_aux = min(sae.d_in // 2, num_dead)
        v, i = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        residual_hat = torch.zeros_like(pre).scatter(-1, i, v) @ sae.W_dec
        # As sparsify divides it: the residual's squared error over the input's total variance.
        aux = (x - x_hat.detach() - residual_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        loss = loss + sae.params.auxk_alpha * min(num_dead / (sae.d_in // 2), 1.0) * aux
    return loss, z


@pytest.mark.parametrize("name,params", [
    ("topk", {"k": 4, "auxk_alpha": 0.5}),
    ("batchtopk", {"k": 4, "auxk_alpha": 0.5}),
    ("matryoshka", {"k": 4, "group_sizes": [8, 8, 16]}),
])
def test_sparse_forward_matches_the_dense_loss_and_gradients(name, params):
    arch = ARCHITECTURES[name]
    torch.manual_seed(0)
    sae = arch(16, 32, arch.Params.model_validate(params)).double()
    x = torch.randn(64, 16, dtype=torch.float64)
    sae.init_from_batch(x)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::3] = True
    sae.dead_mask = dead
    threshold = getattr(sae, "threshold", None)
    before = None if threshold is None else threshold.clone()
    out = sae(x)
    got = torch.autograd.grad(out.loss, list(sae.parameters()))
    want_loss, z = _dense_topk_loss(sae, x, dead, params.get("group_sizes"))
    want = torch.autograd.grad(want_loss, list(sae.parameters()))
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-10, atol=1e-12)
    for (pname, _), g, w in zip(sae.named_parameters(), got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=pname)
    assert out.l0.item() == pytest.approx((z > 0).sum(-1).double().mean().item())
    assert torch.equal(out.fired, (z > 0).any(0))
    if before is not None:  # the training forward updated BatchTopK's threshold once
        assert not torch.equal(before, sae.threshold) and int(sae.threshold_steps) == 1
