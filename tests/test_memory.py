"""llmbench.memory: the native backend's weight arena on huge pages."""

from __future__ import annotations

import torch

from llmbench import memory


class _Part:
    __module__ = "llmbench.quant.linears"  # the walker follows llmbench's own objects only
    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        self.weight = weight
        self.scales = scales
        self.name = "not a tensor"


class _Holder:
    __module__ = "llmbench.backends.native"
    def __init__(self, parts: list[_Part], shared: torch.Tensor) -> None:
        self.parts = parts
        self.shared = shared
        self.strided = torch.arange(12.0).view(3, 4).t()  # not contiguous: left where it is


def test_place_in_arena_copies_in_order_and_shares_tied_tensors():
    tied = torch.randn(5, 7)
    first = _Part(torch.randn(3, 3).bfloat16(), torch.tensor([1, 2, 3], dtype=torch.int8))
    second = _Part(tied, torch.randn(5))
    holder = _Holder([first, second], tied)
    before = {name: t.clone() for name, t in (("w1", first.weight), ("s1", first.scales),
                                              ("w2", second.weight), ("s2", second.scales))}
    strided = holder.strided

    placement = memory.place_in_arena([holder])

    arena = placement["arena"]
    start = arena.data_ptr()
    moved = [first.weight, first.scales, second.weight, second.scales]
    assert all(start <= t.data_ptr() < start + arena.numel() for t in moved)
    assert [t.data_ptr() for t in moved] == sorted(t.data_ptr() for t in moved)
    assert all(t.data_ptr() % memory.ALIGN_BYTES == 0 for t in moved)
    assert start % memory.HUGE_PAGE_BYTES == 0 or not placement["madvise_hugepage"]
    for name, t in zip(("w1", "s1", "w2", "s2"), moved, strict=True):
        assert t.dtype == before[name].dtype and torch.equal(t, before[name])
    assert holder.shared.data_ptr() == second.weight.data_ptr()  # one copy of a tied tensor
    assert placement["tensors"] == 4
    assert holder.strided is strided and first.name == "not a tensor"

    summary = memory.placement_summary(placement)
    assert "arena" not in summary and summary["arena_bytes"] == arena.numel()
    if summary["huge_page_bytes"] is not None:
        assert 0 <= summary["huge_page_bytes"] <= arena.numel()


def test_thp_mode_reads_the_bracketed_setting(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    monkeypatch.setattr(memory, "THP_SETTING", setting)
    assert memory.thp_mode() == "madvise"
    monkeypatch.setattr(memory, "THP_SETTING", tmp_path / "missing")
    assert memory.thp_mode() is None
