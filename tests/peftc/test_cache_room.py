"""`cache_room.appended`: equal to the concatenation, written in place into the room after the latest view
of a buffer it made, and never into anything a view already shows."""

from __future__ import annotations

import weakref

import torch

from peftc.cache_room import MIN_ROOM, appended, room_for


def layer(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 2, length, 4, generator=torch.Generator().manual_seed(seed))


def test_steps_write_into_the_room_of_one_buffer() -> None:
    past, steps = layer(3, 5), [layer(3, 1, seed) for seed in range(1, 5)]
    with room_for(4):
        cache = appended(layer(3, 0), past)
        buffer = cache._base
        assert buffer.shape[2] == 9  # the prompt and the 4 positions to come
        want = past
        for new in steps:
            cache = appended(cache, new)
            want = torch.cat([want, new], dim=-2)
            assert torch.equal(cache, want)
            assert cache._base is buffer and cache.data_ptr() == buffer.data_ptr()


def test_a_view_given_twice_grows_once_and_stays_as_it_was() -> None:
    """Two continuations of one cache (a shallow copy of a DynamicCache): the first writes in place, the
    second gets a copy; neither sees the other's keys, and the view both started from is unchanged."""
    with room_for(8):
        start = appended(layer(2, 0), layer(2, 4))
        kept = start.clone()
        first = appended(start, layer(2, 1, 1))
        second = appended(start, layer(2, 1, 2))
    assert first._base is start._base and second._base is not start._base
    assert torch.equal(start, kept)
    assert torch.equal(first, torch.cat([kept, layer(2, 1, 1)], dim=-2))
    assert torch.equal(second, torch.cat([kept, layer(2, 1, 2)], dim=-2))


def test_pasts_it_did_not_make_are_copied() -> None:
    """A cropped view (assisted decoding), a reordered beam and a caller's tensor: each into a new buffer."""
    with room_for(8):
        cache = appended(layer(2, 0), layer(2, 6))
        for past in (cache[..., :4, :], cache.index_select(0, torch.tensor([1, 0])), layer(2, 6, 3)):
            before = cache.clone()
            grown = appended(past, layer(2, 1, 4))
            assert grown._base is not cache._base
            assert torch.equal(grown, torch.cat([past, layer(2, 1, 4)], dim=-2))
            assert torch.equal(cache, before)


def test_without_room_each_step_copies_and_dtypes_promote() -> None:
    cache = appended(layer(1, 0), layer(1, 3))
    assert cache._base.shape[2] == 3
    grown = appended(cache, layer(1, 1, 1))
    assert grown._base is not cache._base and torch.equal(grown[..., :3, :], cache)
    half = appended(cache, layer(1, 1, 1).half())
    assert half.dtype == torch.float32 and torch.equal(half, torch.cat([cache, layer(1, 1, 1).half()], dim=-2))


def test_the_room_is_bounded_and_an_outgrown_buffer_is_replaced() -> None:
    """A long generation does not reserve its whole length: the room is a quarter of the buffer's contents,
    at least MIN_ROOM positions; past it, the next step copies into a larger buffer."""
    with room_for(10_000):
        cache = appended(layer(1, 0), layer(1, 300))
        assert cache._base.shape[2] == 300 + 75
        first = cache._base
        for seed in range(75):
            cache = appended(cache, layer(1, 1, seed))
        assert cache._base is first
        cache = appended(cache, layer(1, 1, 75))
        assert cache._base is not first and cache._base.shape[2] == 376 + 94
    with room_for(10_000):
        assert appended(layer(1, 0), layer(1, 8))._base.shape[2] == 8 + MIN_ROOM


def test_a_buffer_goes_with_its_last_view() -> None:
    with room_for(4):
        cache = appended(layer(1, 0), layer(1, 3))
    buffer = weakref.ref(cache._base)
    del cache
    assert buffer() is None  # the registry keeps no buffer alive
