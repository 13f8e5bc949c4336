"""EngineConfig's shape buckets: every size has one, and none is larger than the engine can use."""

import pytest

from engine.config import EngineConfig, bucket, default_token_budget, powers_of_two_upto


@pytest.mark.parametrize("limit,start,expected", [
    (64, 1, (1, 2, 4, 8, 16, 32, 64)),
    (48, 1, (1, 2, 4, 8, 16, 32, 48)),
    (33, 16, (16, 32, 33)),
    (16, 16, (16,)),
    (1, 1, (1,)),
])
def test_powers_of_two_end_at_the_limit(limit, start, expected):
    assert powers_of_two_upto(limit, start) == expected


def test_every_size_gets_the_smallest_fitting_bucket():
    buckets = powers_of_two_upto(100)
    for n in range(1, 101):
        b = bucket(n, buckets)
        assert b >= n and all(x < n for x in buckets if x < b)
    with pytest.raises(ValueError, match="exceeds the largest shape bucket 100"):
        bucket(101, buckets)


def test_engine_buckets_cover_max_model_len_without_doubling_it():
    config = EngineConfig(max_model_len=512, page_size=16, decode_steps=4, max_num_seqs=48, prefill_chunk=512,
                          max_num_batched_tokens=2048)
    assert config.page_buckets == (16, 32, 33)  # 516 tokens need 33 pages, not a 64-page table
    assert config.batch_buckets[-1] == 48
    assert config.token_buckets == (8, 16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024, 1152, 1280, 1408, 1536,
                                    1664, 1792, 1920, 2048)  # multiples of 128 past 128


def test_token_budget_and_chunk_default_by_platform():
    assert default_token_budget("cpu") == 512 and default_token_budget("gpu") == 2048
    config = EngineConfig(max_model_len=512)  # these tests run on the CPU backend
    assert (config.max_num_batched_tokens, config.prefill_chunk) == (512, 512)
    assert EngineConfig(max_model_len=512, max_num_batched_tokens=256).prefill_chunk == 256
    assert EngineConfig(max_model_len=512, prefill_chunk=128).max_num_batched_tokens == 512
    with pytest.raises(ValueError, match="prefill_chunk=1024 exceeds max_num_batched_tokens=512"):
        EngineConfig(max_model_len=512, prefill_chunk=1024)
