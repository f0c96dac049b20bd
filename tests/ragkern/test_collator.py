import pytest
import torch

from ragkern import PackingCollator


def test_collator_packs_one_row_with_boundaries():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "block_ids": [0, 1, 1]},
        {"input_ids": [8, 9], "labels": [8, 9], "block_ids": [0, 0]},
    ]
    batch = PackingCollator()(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    # The first token of every example is never a target: 8 must not be predicted from 7.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5] == batch["cu_seq_lens_k"].tolist()
    assert batch["max_length_q"] == 3 == batch["max_length_k"]
    assert "block_ids" not in batch and "attention_mask" not in batch


def test_collator_block_ids_only_with_block_attention():
    examples = [{"input_ids": [5, 6, 7], "block_ids": [0, 1, 2]}, {"input_ids": [8], "block_ids": [0]}]
    batch = PackingCollator(block_attention=True)(examples)
    assert batch["block_ids"].dtype == torch.int32
    assert batch["block_ids"].tolist() == [[0, 1, 2, 0]]
    # Labels default to the inputs (every token a target), still masked at example starts.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100]]


def test_collator_errors():
    with pytest.raises(ValueError, match="example 1: 1 labels for 2 input_ids"):
        PackingCollator()([{"input_ids": [1]}, {"input_ids": [1, 2], "labels": [2]}])
    with pytest.raises(ValueError, match="block_attention needs block_ids"):
        PackingCollator(block_attention=True)([{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="empty batch"):
        PackingCollator()([])


def test_collator_source_ids_per_token():
    examples = [{"input_ids": [5, 6, 7], "source": "raft"}, {"input_ids": [8, 9], "source": "dap"}]
    batch = PackingCollator(source_names=("dap", "raft"))(examples)
    assert batch["source_ids"].tolist() == [[1, 1, 1, 0, 0]]
    assert "source_ids" not in PackingCollator()(examples)


def test_collator_unknown_source_names_it_and_the_fix():
    examples = [{"input_ids": [5, 6], "source": "dap"}, {"input_ids": [8, 9], "source": "chat"}]
    with pytest.raises(
        ValueError,
        match=r"example 1 of the batch has source 'chat', not one of the source_names "
        r"\['dap', 'raft'\]; .*PackingCollator\(source_names=\.\.\.\)",
    ):
        PackingCollator(source_names=("dap", "raft"))(examples)
    with pytest.raises(ValueError, match="source 'default'"):  # an untagged example
        PackingCollator(source_names=("dap",))([{"input_ids": [5, 6]}])
