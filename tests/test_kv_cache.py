import torch

from decodekit.runtime.kv_cache import KVCache


def filled_cache() -> KVCache:
    cache = KVCache(layers=2, batch=1, kv_heads=2, capacity=16, head_dim=3, dtype=torch.float32)
    # slot s of layer l holds the value 100*l + s (keys) and -(100*l + s) (values)
    for layer in range(2):
        for s in range(16):
            cache.kv[layer, 0, 0, :, s] = 100 * layer + s
            cache.kv[layer, 1, 0, :, s] = -(100 * layer + s)
    return cache


def test_commit_moves_accepted_path_into_place_for_every_layer():
    cache = filled_cache()
    cache.commit(0, 4)  # a prefill of 4 tokens
    cache.commit(0, torch.tensor([0, 2, 5]))  # tree scratch slots 4.. ; keep nodes 0, 2, 5
    assert cache.lengths == [7]
    for layer in range(2):
        assert cache.kv[layer, 0, 0, 0, :7, 0].tolist() == [100 * layer + s for s in [0, 1, 2, 3, 4, 6, 9]]
        assert cache.kv[layer, 1, 0, 1, :7, 2].tolist() == [-(100 * layer + s) for s in [0, 1, 2, 3, 4, 6, 9]]


def test_commit_of_leading_chain_moves_nothing():
    cache = filled_cache()
    before = cache.kv.clone()
    cache.commit(0, 3)
    cache.commit(0, torch.tensor([0, 1, 2]))
    assert cache.lengths == [6] and torch.equal(cache.kv, before)


def test_write_goes_to_scratch_slots_and_view_covers_width():
    cache = KVCache(layers=1, batch=2, kv_heads=1, capacity=8, head_dim=2, dtype=torch.float32)
    cache.lengths = [1, 3]
    keys = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(2, 1, 2, 2)
    cache.write(0, torch.stack((keys, -keys)))
    assert torch.equal(cache.kv[0, 0, 0, :, 1:3], keys[0]) and torch.equal(cache.kv[0, 0, 1, :, 3:5], keys[1])
    k, v = cache.view(0, 5)
    assert k.shape == (2, 1, 5, 2) and torch.equal(v[1, :, 3:5], -keys[1])
    assert cache.lengths == [1, 3]  # writing never commits


def test_row_views_share_storage_and_lengths_and_rows_move():
    cache = KVCache(layers=1, batch=3, kv_heads=1, capacity=8, head_dim=1, dtype=torch.float32)
    view = cache.rows(1, 3)
    assert view.batch == 2
    view.write(0, torch.stack((torch.full((2, 1, 2, 1), 5.0), torch.full((2, 1, 2, 1), -5.0))))
    view.commit(1, 2)
    assert cache.lengths == [0, 0, 2] and view.lengths == [0, 2]
    assert cache.kv[0, 0, 2, 0, :2, 0].tolist() == [5.0, 5.0] and not cache.kv[0, :, 0].any()
    cache.move_row(2, 0)
    assert cache.lengths == [2, 0, 2] and cache.kv[0, 1, 0, 0, :2, 0].tolist() == [-5.0, -5.0]
    view.reset()
    assert cache.lengths == [2, 0, 0]
