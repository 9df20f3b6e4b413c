"""The Triton kernels on CUDA tensors with the GPU tiles, against the materialised fp32 references.

The tolerance yardstick is PyTorch's own SDPA (flash attention for fp16/bf16) on the same inputs: its
error against the same fp32 reference tells what rounding that dtype costs an exact flash kernel; ours
may be at most twice that, plus a few ulps of the tensor's scale so that exact zeros (dq, dk at T = 1,
where every row sees one key) do not demand exact zeros back.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

import sa_train.kernels as sk  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [  # (B, H, Hkv, T, D)
    (2, 16, 16, 1024, 64),
    (3, 8, 4, 2048, 64),
    (2, 8, 2, 777, 128),
    (1, 8, 2, 4096, 128),
    (1, 4, 4, 100, 32),
    (1, 2, 2, 33, 16),
    (1, 4, 4, 1, 64),
    (1, 8, 2, 1, 128),
    (2, 4, 1, 2, 16),
]


def _close_to_yardstick(name: str, got: torch.Tensor, yard: torch.Tensor, ref: torch.Tensor) -> None:
    ours = (got.float() - ref).abs().max().item()
    theirs = (yard.float() - ref).abs().max().item()
    floor = 4 * torch.finfo(got.dtype).eps * max(ref.abs().max().item(), 1.0)
    assert ours <= 2 * theirs + floor, f"{name}: error {ours:.3g}, SDPA's {theirs:.3g} (floor {floor:.3g})"


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """k, v repeated to q's heads so that every SDPA backend (flash included) takes GQA."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    backends = [SDPBackend.FLASH_ATTENTION] if q.dtype != torch.float32 else [SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel([*backends, SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(("b", "h", "hkv", "t", "d"), SHAPES)
def test_group_forward_and_backward(dtype: torch.dtype, b: int, h: int, hkv: int, t: int, d: int) -> None:
    """Anchor + one shared layer, both outputs in the loss: out, lse and dq, dk, dv, dv_shared."""
    gen = torch.Generator(device="cuda").manual_seed(t * d)

    def make(heads: int) -> torch.Tensor:  # (B, T, heads, D) viewed as (B, heads, T, D), as a model does
        return torch.randn(b, t, heads, d, device="cuda", generator=gen).transpose(1, 2)

    q, k, v, v2 = make(h), make(hkv), make(hkv), make(hkv)
    go1, go2 = make(h), make(h)
    scale = d**-0.5

    def run(attend, shared, cast: torch.dtype):
        leaves = [x.detach().to(cast).requires_grad_() for x in (q, k, v, v2)]
        out, lse, link = attend(*leaves[:3])
        out2 = shared(leaves[0], leaves[1], lse, link, leaves[3])
        ((out.float() * go1).sum() + (out2.float() * go2).sum()).backward()
        return [out, out2, *(x.grad for x in leaves)], lse

    def kernel_anchor(q_, k_, v_):
        out, lse, (link,) = sk.anchor_attention(q_, k_, v_, scale, followers=1)
        return out, lse, link

    want, _ = run(
        lambda q_, k_, v_: (*sk.reference_anchor(q_, k_, v_, scale), None),
        lambda q_, k_, lse, _link, v_: sk.reference_shared(q_, k_, lse, v_, scale),
        torch.float32,
    )
    got, lse = run(
        kernel_anchor,
        lambda q_, k_, lse, link, v_: sk.shared_attention(q_, k_, lse, link, v_, scale),
        dtype,
    )
    yard, _ = run(
        lambda q_, k_, v_: (_sdpa(q_, k_, v_, scale), None, None),
        lambda q_, k_, _lse, _link, v_: _sdpa(q_, k_, v_, scale),
        dtype,
    )
    assert all(g.dtype == dtype for g in got)
    # lse has no SDPA counterpart: against the reference on the same rounded q, k it differs by fp32 sums
    _, rounded_lse = sk.reference_anchor(q.to(dtype).float(), k.to(dtype).float(), v, scale)
    torch.testing.assert_close(lse, rounded_lse, atol=1e-5 * max(1.0, rounded_lse.abs().max().item()), rtol=0)
    for name, g, y, r in zip(
        ["out", "out_shared", "dq", "dk", "dv", "dv_shared"], got, yard, want, strict=True
    ):
        _close_to_yardstick(name, g, y, r)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    ("b", "h", "hkv", "t", "d", "layers"),
    [(4, 16, 16, 1024, 64, 4), (2, 32, 8, 4097, 128, 3), (1, 8, 8, 1, 64, 2), (2, 8, 2, 300, 16, 2)],
)
def test_decode_group(dtype: torch.dtype, b: int, h: int, hkv: int, t: int, d: int, layers: int) -> None:
    """Every layer's finished one-token output against softmax attention over the whole cache."""
    gen = torch.Generator(device="cuda").manual_seed(t)
    q = torch.randn(b, h, 1, d, device="cuda", generator=gen)
    k_cache = torch.randn(b, hkv, t, d, device="cuda", generator=gen)
    v_full = torch.randn(layers, b, hkv, t, d, device="cuda", generator=gen)
    scale = d**-0.5
    partials, p_last = sk.decode_group_partial(
        q.to(dtype), k_cache.to(dtype), v_full[:, :, :, :-1].to(dtype), scale
    )
    rep = h // hkv
    for layer in range(layers):
        got = sk.decode_finish(partials[layer], p_last, v_full[layer, :, :, -1:].to(dtype))
        k_rep, v_rep = k_cache.repeat_interleave(rep, dim=1), v_full[layer].repeat_interleave(rep, dim=1)
        want = torch.softmax(q @ k_rep.transpose(-1, -2) * scale, dim=-1) @ v_rep
        yard = F.scaled_dot_product_attention(q.to(dtype), k_rep.to(dtype), v_rep.to(dtype), scale=scale)
        assert got.dtype == dtype
        _close_to_yardstick(f"layer {layer}", got, yard, want)


def test_tiles_that_do_not_fit_fall_back_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton refuses a 256 x 128 fp32 forward tile at D = 128 (524288 bytes of shared memory, compiled for
    sm_90) before it runs anything; the launch takes the next tiles, gets the right answer, keeps them."""
    from sa_train.kernels import tiles

    original = tiles.candidates
    too_big = tiles.Tiles(256, 128, 8, 3)
    monkeypatch.setattr(tiles, "_FIRST_FIT", {})
    monkeypatch.setattr(
        tiles,
        "candidates",
        lambda kernel, d: (too_big, *original(kernel, d)) if kernel == "forward" else original(kernel, d),
    )
    q, k, v = (torch.randn(1, 2, 300, 128, device="cuda") for _ in range(3))
    out, _, _ = sk.anchor_attention(q, k, v, 128**-0.5)
    torch.testing.assert_close(out, sk.reference_anchor(q, k, v, 128**-0.5)[0], atol=1e-4, rtol=1e-4)
    (rank,) = [rank for key, rank in tiles._FIRST_FIT.items() if key[0] == "forward"]
    assert rank >= 1  # 1 where the shipped first tiles fit (Triton 3.9); Triton 3.6 needed 2 for fp32
