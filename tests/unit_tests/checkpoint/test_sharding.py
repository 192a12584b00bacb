"""Global <-> per-rank model state: the tensor index, sharding, merging and resharding (CPU, no processes)."""

import dataclasses

import pytest
import torch

from megatron_lite.arguments import pad_vocab_size
from megatron_lite.checkpoint.reshard.sharding import (build_tensor_index, merge_to_global, rank_params, reshard_rank_state,
                                               shard_global_state, skeleton_state)
from megatron_lite.config import ModelConfig
from megatron_lite.model.gpt import GPTModel
from megatron_lite.parallel.tensor import shard

LLAMA = ModelConfig(num_layers=4, hidden_size=16, ffn_hidden_size=24, num_attention_heads=8,
                    group_query_attention=True, num_query_groups=4, vocab_size=100, make_vocab_size_divisible_by=8,
                    normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_bias_linear=False,
                    untie_embeddings_and_output_weights=True)
GPT2 = ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=4, vocab_size=100, seq_length=8,
                   max_position_embeddings=8, make_vocab_size_divisible_by=8)


def padded(cfg: ModelConfig, tp: int) -> ModelConfig:
    return dataclasses.replace(cfg, padded_vocab_size=pad_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by,
                                                                       tp))


def random_global_state(cfg: ModelConfig, tp: int) -> dict:
    """Random global tensors of `cfg` padded for `tp`, in model order."""
    g = torch.Generator().manual_seed(0)
    index = build_tensor_index(padded(cfg, tp), tp, 1)
    return {name: torch.randn(e["shape"], generator=g) for name, e in index.items()}


def split(cfg, global_state, tp, pp):
    """{(tp_rank, pp_rank): state_dict} through shard_global_state."""
    out = {}
    for pp_rank, dicts in shard_global_state(iter(global_state.items()), padded(cfg, tp), tp, pp):
        for tp_rank, sd in enumerate(dicts):
            out[tp_rank, pp_rank] = sd
    return out


def reader_of(index, rank_dicts):
    def read_piece(file, key):
        piece = next(p for e in index.values() for p in e["pieces"] if p["file"] == file and p["key"] == key)
        return rank_dicts[piece["tp_rank"], piece["pp_rank"]][key]
    return read_piece


def test_index_lists_every_rank_parameter_once_with_its_ranges():
    cfg = padded(LLAMA, 2)
    index = build_tensor_index(cfg, 2, 2)
    for tp_rank in range(2):
        for pp_rank in range(2):
            keys = [p.key for p in rank_params(cfg, 2, 2, tp_rank, pp_rank)]
            listed = [pc["key"] for e in index.values() for pc in e["pieces"]
                      if (pc["tp_rank"], pc["pp_rank"]) == (tp_rank, pp_rank)]
            assert sorted(listed) == sorted(keys)
    fc1 = index["decoder.layers.3.mlp.linear_fc1.weight"]
    assert fc1["shape"] == [48, 16] and fc1["partition_chunks"] == 2
    assert [p["ranges"] for p in fc1["pieces"]] == [[[0, 12], [24, 36]], [[12, 24], [36, 48]]]
    assert {(p["pp_rank"], p["key"]) for p in fc1["pieces"]} == {(1, "decoder.layers.1.mlp.linear_fc1.weight")}
    assert index["decoder.final_layernorm.weight"]["partition_dim"] == -1
    assert list(index)[0] == "embedding.word_embeddings.weight" and list(index)[-1] == "output_layer.weight"


def test_tied_embedding_lists_the_last_stage_copy_as_a_second_holder():
    cfg = padded(GPT2, 2)
    index = build_tensor_index(cfg, 2, 2)
    pieces = index["embedding.word_embeddings.weight"]["pieces"]
    assert [(p["pp_rank"], p["tp_rank"], p["key"]) for p in pieces] == [
        (0, 0, "embedding.word_embeddings.weight"), (0, 1, "embedding.word_embeddings.weight"),
        (1, 0, "output_layer.weight"), (1, 1, "output_layer.weight")]
    assert "output_layer.weight" not in index


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_shards_load_into_the_rank_model_and_merge_back_bitwise(cfg, tp, pp):
    global_state = random_global_state(cfg, tp)
    rank_dicts = split(cfg, global_state, tp, pp)
    for (tp_rank, pp_rank), sd in rank_dicts.items():
        model = GPTModel(padded(cfg, tp), skeleton_state(tp, pp, tp_rank, pp_rank), None, init_weights=False)
        model.load_state_dict(sd, strict=True)
        for key, p in model.named_parameters():
            full = global_state[model.global_name(key)]
            want = shard(full, p.partition_dim, tp_rank, tp, p.partition_chunks) if p.tensor_model_parallel else full
            assert torch.equal(p.detach(), want), key
    index = build_tensor_index(padded(cfg, tp), tp, pp)
    merged = dict(merge_to_global(index, reader_of(index, rank_dicts)))
    assert list(merged) == list(global_state)
    assert all(torch.equal(merged[k], global_state[k]) for k in global_state)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("target", [(1, 1), (4, 1), (1, 2), (4, 2)])
def test_reshard_equals_sharding_the_global_state_with_vocab_cut_or_extended(cfg, target):
    # vocab 100, divisible by 8: padded to 112 at TP 2, 104 at TP 1, 128 at TP 4
    global_state = random_global_state(cfg, 2)
    source = split(cfg, global_state, 2, 2)
    index = build_tensor_index(padded(cfg, 2), 2, 2)
    tp, pp = target
    new_cfg = padded(cfg, tp)
    rows = new_cfg.padded_vocab_size
    expected_global = dict(global_state)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in global_state:
            t = global_state[name]
            expected_global[name] = torch.cat([t, t[-1:].expand(max(rows - len(t), 0), -1)])[:rows]
    expected = split(cfg, expected_global, tp, pp)
    for tp_rank in range(tp):
        for pp_rank in range(pp):
            got = reshard_rank_state(index, reader_of(index, source), new_cfg, tp, pp, tp_rank, pp_rank)
            want = expected[tp_rank, pp_rank]
            assert list(got) == list(want)
            assert all(torch.equal(got[k], want[k]) for k in want), (tp_rank, pp_rank)


def test_reshard_reads_only_the_overlapping_pieces():
    global_state = random_global_state(LLAMA, 2)
    source = split(LLAMA, global_state, 2, 2)
    index = build_tensor_index(padded(LLAMA, 2), 2, 2)
    read = reader_of(index, source)
    touched = set()

    def counting(file, key):
        touched.add(file)
        return read(file, key)

    reshard_rank_state(index, counting, padded(LLAMA, 2), 2, 1, 1, 0)
    assert touched == {"mp_rank_01_000/model_optim_rng.pt", "mp_rank_01_001/model_optim_rng.pt"}


def test_stages_stream_out_before_the_input_ends():
    global_state = random_global_state(LLAMA, 1)
    consumed = []

    def stream():
        for item in global_state.items():
            consumed.append(item[0])
            yield item

    stages = shard_global_state(stream(), padded(LLAMA, 1), 1, 2)
    pp_rank, _ = next(stages)
    assert pp_rank == 0 and "decoder.layers.2.input_layernorm.weight" not in consumed
    assert [s for s, _ in stages] == [1]
    assert len(consumed) == len(global_state)


def test_a_missing_or_misshapen_tensor_is_named():
    global_state = random_global_state(LLAMA, 1)
    del global_state["decoder.layers.3.mlp.linear_fc2.weight"]
    with pytest.raises(ValueError, match=r"stage 1 is complete; missing \['decoder.layers.3.mlp.linear_fc2.weight'\]"):
        split(LLAMA, global_state, 1, 2)
    global_state = random_global_state(LLAMA, 1)
    global_state["decoder.layers.0.self_attention.linear_proj.weight"] = torch.zeros(16, 15)
    with pytest.raises(ValueError, match=r"decoder.layers.0.self_attention.linear_proj.weight has shape \(16, 15\)"):
        split(LLAMA, global_state, 1, 1)
    index = build_tensor_index(padded(LLAMA, 1), 1, 1)
    source = split(LLAMA, random_global_state(LLAMA, 1), 1, 1)
    wider = dataclasses.replace(padded(LLAMA, 1), ffn_hidden_size=32)
    with pytest.raises(ValueError, match="decoder.layers.0.mlp.linear_fc1.weight has shape"):
        reshard_rank_state(index, reader_of(index, source), wider, 1, 1, 0, 0)
