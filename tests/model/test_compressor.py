"""Compressor: token counts, balanced grouping, and attention checked against hand computation."""

import math

import pytest
import torch

from model.compressor import HicomCompressor
from model.config import CompressorConfig
from model.global_compressor import position_encoding_3d
from model.local_compressor import divide, group_index, group_starts


def small_cfg(**kw) -> CompressorConfig:
    base = dict(spec="local43_global32", vision_dim=8, key_dim=8, text_dim=8, llm_dim=6, head_dim=4)
    base.update(kw)
    return CompressorConfig(**base)


def release_balance_groups(n: int, k: int) -> list[list[int]]:
    """Port of the release's divide_feature/balance_divide_feature index logic, used as an oracle."""
    items = list(range(n))
    if n % k == 0:
        return [items[i * k:(i + 1) * k] for i in range(n // k)]
    split = math.ceil(n / k)
    no_repeat = n % split or split
    sizes = [k - (0 if i < no_repeat else 1) for i in range(split)]
    start, groups = 0, []
    for size in sizes:
        end = start + size
        if size < k:
            start -= 1
        groups.append(items[start:end])
        start = end
    return groups


@pytest.mark.parametrize("t,h,w,expected", [(32, 27, 27, 680), (1, 27, 27, 113), (128, 27, 27, 2624),
                                            (8, 8, 8, 50), (6, 10, 7, 2 * 4 * 3 + 32)])
def test_token_counts(t, h, w, expected):
    cfg = small_cfg()
    model = HicomCompressor(cfg)
    out = model(torch.randn(1, t, h, w, 8), torch.randn(1, t, h, w, 8), torch.randn(1, 8))
    assert out.shape == (1, expected, 6)
    assert cfg.num_tokens(t, h, w) == expected


def test_release_dims_on_meta_device():
    """32 x 27 x 27 x 1152 -> 680 x 3584 and an image -> 113, shape-checked without any weights."""
    with torch.device("meta"):
        model = HicomCompressor(CompressorConfig())
        v = torch.empty(2, 32, 27, 27, 1152)
        out = model(v, v, torch.empty(2, 1152))
        img = model(v[:, :1], v[:, :1], torch.empty(2, 1152))
    assert out.shape == (2, 680, 3584)
    assert img.shape == (2, 113, 3584)


def test_balanced_groups_match_release_where_release_works():
    checked = 0
    for k in range(1, 6):
        for n in range(1, 60):
            mine = group_index(n, k).tolist()
            # invariants everywhere: ceil(n/k) full groups, ascending, every item covered
            assert len(mine) == math.ceil(n / k)
            assert all(len(g) == min(n, k) and g == sorted(g) for g in mine)
            assert sorted({i for g in mine for i in g}) == list(range(n))
            assert all(a[0] < b[0] for a, b in zip(mine, mine[1:]))
            ref = release_balance_groups(n, k)
            if all(len(g) == min(n, k) for g in ref):  # the release only handles these n
                assert mine == ref, (n, k)
                checked += 1
    assert checked > 150
    assert group_starts(27, 3) == tuple(range(0, 27, 3))
    assert group_starts(8, 3) == (0, 3, 5)
    assert group_starts(10, 4) == (0, 3, 6)


def test_divide_orders_groups_t_h_w():
    t, h, w = 8, 6, 6
    grid = torch.zeros(1, t, h, w, 3)
    grid[..., 0] = torch.arange(t)[:, None, None]
    grid[..., 1] = torch.arange(h)[None, :, None]
    grid[..., 2] = torch.arange(w)[None, None, :]
    groups = divide(grid, (4, 3, 3))[0]  # (G, K, 3)
    assert groups.shape == (2 * 2 * 2, 36, 3)
    for g in range(8):
        gt, gh, gw = g // 4, (g // 2) % 2, g % 2
        assert set(groups[g, :, 0].tolist()) == set(range(4 * gt, 4 * gt + 4))
        assert set(groups[g, :, 1].tolist()) == set(range(3 * gh, 3 * gh + 3))
        assert set(groups[g, :, 2].tolist()) == set(range(3 * gw, 3 * gw + 3))


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [x / sum(e) for x in e]


def test_local_attention_matches_hand_computation():
    """Direct guide: each group's output = sum_k softmax(k . g / sqrt(d)) v, groups in (t, h, w) order.

    Uses an uneven h (5 with kernel 3 -> rows {0,1,2} and {2,3,4}) to cover the balanced split.
    """
    torch.manual_seed(0)
    cfg = small_cfg(spec="local43")
    model = HicomCompressor(cfg).double()
    t, h, w, d = 8, 5, 6, 8
    value = torch.randn(1, t, h, w, d, dtype=torch.float64)
    key = torch.randn(1, t, h, w, d, dtype=torch.float64)
    guide = torch.randn(1, d, dtype=torch.float64)
    out = model(value, key, guide)[0]

    h_groups = [[0, 1, 2], [2, 3, 4]]
    expected = []
    for gt in range(2):
        for gh in range(2):
            for gw in range(2):
                cells = [(ti, hi, wi) for ti in range(4 * gt, 4 * gt + 4) for hi in h_groups[gh]
                         for wi in range(3 * gw, 3 * gw + 3)]
                scores = [sum(float(key[0][c][i]) * float(guide[0, i]) for i in range(d)) / math.sqrt(d)
                          for c in cells]
                weights = _softmax(scores)
                vec = [sum(wt * float(value[0][c][i]) for wt, c in zip(weights, cells)) for i in range(d)]
                expected.append(vec)
    expected = model.local_compressor.readout(torch.tensor(expected, dtype=torch.float64))
    assert out.shape == (8, 6)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_position_encoding_formula():
    pe = position_encoding_3d(3, 4, 5, 6)
    assert pe.shape == (3, 4, 5, 6) and pe.dtype == torch.float32

    def table(pos, i, d=6):
        angle = pos / 10000 ** (2 * (i // 2) / d)
        return math.sin(angle) if i % 2 == 0 else math.cos(angle)

    for (t, h, w, i) in [(0, 0, 0, 0), (2, 3, 4, 5), (1, 2, 3, 2), (2, 0, 4, 1)]:
        assert pe[t, h, w, i].item() == pytest.approx(table(t, i) + table(h, i) + table(w, i), abs=1e-6)
    # a slice of a bigger table is the same table (no max size needed)
    torch.testing.assert_close(position_encoding_3d(6, 6, 6, 6)[:3, :4, :5], pe)


def _hand_mha(layer, query, kv, heads):
    """Explicit per-head attention with the layer's weights (float64, loops over heads)."""
    def lin(m, x):
        return x @ m.weight.T + m.bias

    q, k, v = lin(layer.q_proj, query), lin(layer.k_proj, kv), lin(layer.v_proj, kv)
    hd = q.shape[-1] // heads
    outs = []
    for hh in range(heads):
        sl = slice(hh * hd, (hh + 1) * hd)
        a = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(hd), dim=-1)
        outs.append(a @ v[:, sl])
    return lin(layer.out_proj, torch.cat(outs, dim=-1))


@pytest.mark.parametrize("guide_mode", ["none", "direct"])
def test_global_attention_matches_hand_computation(guide_mode):
    torch.manual_seed(1)
    cfg = small_cfg(spec="global4", use_guide=guide_mode)
    model = HicomCompressor(cfg).double()
    with torch.no_grad():
        model.global_compressor.query.normal_()
    t, h, w, d = 2, 2, 3, 8
    value = torch.randn(1, t, h, w, d, dtype=torch.float64)
    guide = torch.randn(1, d, dtype=torch.float64)
    out = model(value, None, guide)[0]
    gc = model.global_compressor
    kv = (value[0] + position_encoding_3d(t, h, w, d).double()).reshape(-1, d)
    query = gc.query if guide_mode == "none" else guide.expand(4, d)
    expected = gc.readout(query + _hand_mha(gc.attn_layer, query, kv, heads=2))
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    if guide_mode == "direct":  # release quirk: all global tokens equal
        assert torch.allclose(out, out[:1].expand_as(out))
    else:
        assert not torch.allclose(out[0], out[1])


def test_coarse_film_matches_hand_computation():
    torch.manual_seed(2)
    cfg = small_cfg(spec="global4", behaviour="paper")
    assert cfg.global_guide_mode == "coarse"
    model = HicomCompressor(cfg).double()
    gc = model.global_compressor
    with torch.no_grad():
        gc.query.normal_()
        for p in gc.guide_injector.parameters():
            p.normal_()
    guide = torch.randn(1, 8, dtype=torch.float64)
    p0, p2 = gc.guide_injector.coarse_proj[0], gc.guide_injector.coarse_proj[2]
    hidden = torch.nn.functional.gelu(guide[0] @ p0.weight.T + p0.bias)
    film = hidden @ p2.weight.T + p2.bias
    scale, shift = film[:8], film[8:]
    x = gc.query * (1 + scale) + shift
    norm = gc.guide_injector.coarse_norm
    expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    expected = expected * norm.weight + norm.bias
    torch.testing.assert_close(gc.queries(1, guide, None)[0], expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("local_mode,global_mode", [("none", "none"), ("coarse", "coarse"), ("fine", "fine"),
                                                    ("direct", "fine")])
def test_all_guide_modes_run_and_backprop(local_mode, global_mode):
    cfg = small_cfg(local_guide=local_mode, global_guide=global_mode, text_dim=12)  # text2qk_proj path
    model = HicomCompressor(cfg)
    value = torch.randn(2, 4, 5, 5, 8)
    out = model(value, torch.randn(2, 4, 5, 5, 8), torch.randn(2, 12), torch.randn(2, 7, 12))
    assert out.shape == (2, cfg.num_tokens(4, 5, 5), 6)
    out.square().mean().backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    # only `direct` leaves the learned global queries unused (they are replaced by the instruction)
    assert no_grad == ({"global_compressor.query"} if global_mode == "direct" else set())


def test_batch_equals_single_examples():
    torch.manual_seed(3)
    model = HicomCompressor(small_cfg(behaviour="paper"))
    value, key, guide = torch.randn(3, 8, 6, 6, 8), torch.randn(3, 8, 6, 6, 8), torch.randn(3, 8)
    batched = model(value, key, guide)
    for i in range(3):
        torch.testing.assert_close(batched[i:i + 1], model(value[i:i + 1], key[i:i + 1], guide[i:i + 1]))


def test_position_table_is_built_once_per_shape_on_the_device():
    from model.global_compressor import MAX_POS_TABLES, GlobalCompressor

    gc = GlobalCompressor(CompressorConfig(spec="global4", vision_dim=32, key_dim=32, text_dim=32, llm_dim=16,
                                           head_dim=8, use_guide="none"))
    first = gc.position_table(3, 4, 5, torch.device("cpu"), torch.float32)
    assert gc.position_table(3, 4, 5, torch.device("cpu"), torch.float32) is first  # no rebuild, no copy
    torch.testing.assert_close(first, position_encoding_3d(3, 4, 5, 32))
    assert gc.position_table(3, 4, 5, torch.device("cpu"), torch.bfloat16).dtype == torch.bfloat16
    for t in range(2, 2 + MAX_POS_TABLES + 2):
        gc.position_table(t, 4, 5, torch.device("cpu"), torch.float32)
    assert len(gc._pos_tables) == MAX_POS_TABLES and "_pos_tables" not in str(list(gc.state_dict()))
